"""Episodes acted by a trained agent on the real task, seen through a world model (``collect/dmcs.py --policy``).

An agent of ``downstream/rl.py`` (a stable-baselines3 PPO or SAC zip) acts on the real task exactly as in
its evaluation: ``envs.through_model.RealTaskThroughModel`` turns each real frame into the world model's hidden
state. A planner file (JSON, ``worldmodel.planning.save_planner``) acts instead by planning each action in the
world model (``worldmodel.planning.CEMPlanner``), as ``downstream/plan.py`` evaluates it. The collector stores
what the real env saw, in the layout of the random datasets (docs/CONTRACTS.md), so the episodes can join a
dataset as a named part (``<task>_<split>.<part>.h5``) and refine the model.

One episode of T agent steps (T as for random episodes: the horizon, or ``--episode-steps``):

1. the real env is reset from the episode's own environment seed (``PolicyEpisodeSeeds.env``);
2. the world model's warm-up: ``WARMUP_STEPS`` (7) uniform random actions (zero actions for a planner whose
   ``warmup`` is "zero"), filtered like an imagined episode's context; they are stored as the episode's first
   actions (drawn from the filter seed, which also seeds the posterior's noise);
3. T - 7 steps of the agent's deterministic action (a planner's planned action) plus Gaussian noise of std ``noise`` (one standard
   normal draw per action dimension and step from the episode's noise generator, also when the std is 0),
   clipped to [-1, 1]; the stored action is the applied one.

Seeds: episode e of part P, task k (its index in the task table), split s derives everything from
``np.random.SeedSequence(seed, spawn_key=(POLICY_SEED_TAG, crc32(P), k, s, e))``; its three children give the
environment seed (lowest bit: the split, as for random episodes), the filter seed and the noise generator (a
planner's draws restart each episode from the first child the noise's seed sequence spawns).
The spawn key starts with a tag no task index takes, so agent episodes never draw the random episodes'
streams (whose key is (k, s, e)), and a part's name enters it, so two parts of the same seed differ.

Provenance: the part's attrs (and its ``collection_settings`` JSON, which also decides resume and refusal)
hold the agent's path, sha256 and algorithm, the noise, and the world model's checkpoint path and
``model_fingerprint`` (the identity of its weights); ``PolicySettings.extra_attrs`` lists them.

Torch, stable-baselines3 and the world model are imported inside the functions that need them: random
collection, which imports this module for ``PolicySettings``, never loads torch.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, SupportsFloat

import gymnasium as gym  # already loaded by envs.simulator's package: no cost for random collection
import numpy as np

from worldmodel import storage
from worldmodel.config import OBSERVED_STEPS
from worldmodel.errors import InputError, detail
from worldmodel.tasks import get_task, task_id

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

    from envs.through_model import RealTaskThroughModel
    from worldmodel.planning import CEMPlanner

POLICY_SEED_TAG = 1_000  # first spawn-key word of agent episodes; random episodes have a task index (0..5) there
WARMUP_STEPS = OBSERVED_STEPS - 1  # RealTaskThroughModel's default: an imagined episode's 8-frame context
# The module of a stable-baselines3 zip's policy class -> the algorithm that loads it.
ALGORITHM_OF_POLICY_MODULE = {
    "stable_baselines3.common.policies": "ppo",  # ActorCriticPolicy
    "stable_baselines3.sac.policies": "sac",
}
PLANNER_ALGORITHM = "cem"  # policy_algorithm of a planner file
COLLECTION_DEVICE = "cpu"  # one frame at a time through a small network: workers give the parallelism


class PolicySettings(NamedTuple):
    """Everything that determines the contents of one file collected with an agent (stored as JSON with it)."""

    format_version: int
    task: str
    split: str
    part: str  # "" writes the main file <task>_<split>.h5 (of a new folder), else <task>_<split>.<part>.h5
    seed: int
    episodes: int
    episode_steps: int  # T, agent steps per stored episode, the warm-up's included
    episode_steps_cap: int | None
    action_repeat: int
    render: dict[str, Any]
    policy: str  # the agent's zip (or planner file), resolved
    policy_sha256: str
    policy_algorithm: str  # "ppo", "sac" or "cem" (a planner file)
    noise: float  # std of the Gaussian noise added to the agent's deterministic action
    world_model_checkpoint: str  # the checkpoint file, resolved
    world_model_fingerprint: str  # worldmodel.fingerprint.model_fingerprint of its weights
    observe_keypoints: bool  # whether the agent sees the keypoints beside the hidden state
    warmup_steps: int
    refilter: bool  # RealTaskThroughModel's: each frame's state from the last 8 frames filtered afresh

    def record(self) -> dict[str, Any]:
        return self._asdict()

    @property
    def name(self) -> str:
        return f"{self.task}_{self.split}" + (f".{self.part}" if self.part else "")

    def env_seed(self, episode: int) -> int:
        return policy_episode_seeds(self, episode).env

    def extra_attrs(self) -> dict[str, Any]:
        """The provenance attrs of the file (beside the attrs every dataset file has)."""
        return {
            "part": self.part,
            "policy": self.policy,
            "policy_sha256": self.policy_sha256,
            "policy_algorithm": self.policy_algorithm,
            "policy_noise": self.noise,
            "world_model_checkpoint": self.world_model_checkpoint,
            "world_model_fingerprint": self.world_model_fingerprint,
            "warmup_steps": self.warmup_steps,
            "refilter": self.refilter,
        }


class PolicyEpisodeSeeds(NamedTuple):
    env: int  # dm_control seed of the reset (stored in episode_seeds)
    filter: int  # seeds the real env's np_random: warm-up actions and the posterior's noise
    noise: np.random.SeedSequence  # the exploration noise


def policy_episode_seeds(settings: PolicySettings, episode: int) -> PolicyEpisodeSeeds:
    """The seeds of one agent episode (module docstring); depend on (seed, part, task, split, episode) only."""
    part_key = zlib.crc32(settings.part.encode())
    split_index = storage.SPLITS.index(settings.split)
    sequence = np.random.SeedSequence(
        settings.seed, spawn_key=(POLICY_SEED_TAG, part_key, task_id(settings.task), split_index, episode)
    )
    env_sequence, filter_sequence, noise_sequence = sequence.spawn(3)
    filter_seed = int(filter_sequence.generate_state(1, np.uint32)[0])
    return PolicyEpisodeSeeds(storage.episode_env_seed(env_sequence, settings.split), filter_seed, noise_sequence)


# ---------------------------------------------------------------------------------------------------
# The agent and the world model, identified (main process, before anything is written)


class PolicyIdentity(NamedTuple):
    policy: str
    policy_sha256: str
    policy_algorithm: str
    world_model_checkpoint: str
    world_model_fingerprint: str
    observe_keypoints: bool


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def policy_algorithm(path: Path) -> str:
    """'ppo' or 'sac', read from the zip's JSON ``data`` (nothing is unpickled), or 'cem' for a planner file (.json);
    InputError for anything else."""
    if path.suffix == ".json":
        from worldmodel.planning import load_planner_config  # torch: only when a planner acts

        try:
            load_planner_config(path)
        except InputError as error:
            raise InputError(f"--policy {error}") from None
        return PLANNER_ALGORITHM
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read("data"))
        module = data["policy_class"]["__module__"]
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(
            f"--policy {path} is not a stable-baselines3 agent ({detail(error)}); give the .zip of downstream/rl.py "
            "or a planner .json"
        ) from None
    if module not in ALGORITHM_OF_POLICY_MODULE:
        raise InputError(f"--policy {path} is an agent of policy module {module}; only PPO and SAC agents are supported")
    return ALGORITHM_OF_POLICY_MODULE[module]


def load_agent(path: Path, algorithm: str) -> BaseAlgorithm:
    from stable_baselines3 import PPO, SAC

    algorithms = {"ppo": PPO, "sac": SAC}
    try:
        return algorithms[algorithm].load(path, device=COLLECTION_DEVICE)
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        raise InputError(f"--policy {path}: unreadable {algorithm.upper()} agent ({detail(error)})") from None


def identify_policy(policy: Path, checkpoint: Path | None, task: str, action_repeat: int) -> PolicyIdentity:
    """Load the agent and the world model once to check that they fit each other, the task and the action
    repeat (InputError otherwise), and return what identifies them."""
    # the imagination modules pull in torch and the world model: imported here so that random collection (which
    # imports this module through collect/dmcs.py) and its worker processes never load them.
    from envs.imagination_batch import observation_space
    from envs.imagination_models import load_imagination_models

    if not policy.is_file():
        raise InputError(f"--policy {policy} is not a file; give the agent .zip written by downstream/rl.py")
    algorithm = policy_algorithm(policy)
    models = load_imagination_models(task, checkpoint, device=COLLECTION_DEVICE)  # absent, foreign: InputError
    if models.action_repeat != action_repeat:
        raise InputError(
            f"the world model {models.checkpoint} was trained on {task} data with action repeat {models.action_repeat}, "
            f"this collection asks {action_repeat}; pass --action-repeat {models.action_repeat}"
        )
    identity = PolicyIdentity(str(policy.resolve()), file_sha256(policy), algorithm, str(models.checkpoint),
                              models.fingerprint, observe_keypoints=False)  # fmt: skip
    if algorithm == PLANNER_ALGORITHM:  # plans with the world model's hidden states and its reward predictor
        return identity
    agent = load_agent(policy, algorithm)
    model = models.world_model
    shapes = {
        keypoints: observation_space(model.dynamics, model.config.feature_size if keypoints else 0).shape
        for keypoints in (False, True)
    }
    matches = [keypoints for keypoints, shape in shapes.items() if shape == agent.observation_space.shape]
    if not matches:
        raise InputError(
            f"--policy {policy} observes {agent.observation_space.shape}, the world model {models.checkpoint} gives "
            f"{shapes[False]} (or {shapes[True]} with keypoints): pass the --checkpoint the agent was trained on"
        )
    action_dim = get_task(task).action_dim
    if agent.action_space.shape != (action_dim,):
        raise InputError(f"--policy {policy} acts with shape {agent.action_space.shape}, {task} takes ({action_dim},)")
    return identity._replace(observe_keypoints=matches[0])


# ---------------------------------------------------------------------------------------------------
# Worker side: one episode


class EpisodeRecorder(gym.Wrapper[np.ndarray, np.ndarray, np.ndarray, np.ndarray]):
    """Sits between the real pixel env and the filter and keeps every frame, applied action, reward and
    state that passes: the filter's warm-up steps and the agent's alike."""

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        frame, info = self.env.reset(seed=seed, options=options)
        self.frames, self.states = [frame], [info["state"]]
        self.actions: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.seed = int(info["episode_seed"])
        return frame, info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        frame, reward, terminated, truncated, info = self.env.step(action)
        self.actions.append(np.asarray(action, np.float32))
        self.frames.append(frame)
        self.rewards.append(float(reward))
        self.states.append(info["state"])
        return frame, reward, terminated, truncated, info

    def episode(self) -> storage.Episode:
        return storage.Episode(
            frames=np.stack(self.frames),
            actions=np.stack(self.actions),
            rewards=np.asarray(self.rewards, np.float32),
            states=np.stack(self.states).astype(np.float32),
            seed=self.seed,
        )


class PolicyRunner(NamedTuple):
    env: RealTaskThroughModel
    recorder: EpisodeRecorder  # inside env, around the real pixel env
    agent: BaseAlgorithm | CEMPlanner
    state_layout: list[tuple[str, int]]


_RUNNERS: dict[tuple[Any, ...], PolicyRunner] = {}  # one per agent, model and task in each worker, reused


def _runner(settings: PolicySettings) -> PolicyRunner:
    key = (settings.policy_sha256, settings.world_model_fingerprint, settings.world_model_checkpoint, settings.task,
           settings.action_repeat, settings.render["fast_render"], settings.observe_keypoints, settings.warmup_steps,
           settings.refilter)  # fmt: skip
    if key not in _RUNNERS:
        # (imported here for the reason given in identify_policy)
        from envs.imagination_models import load_imagination_models
        from envs.real import RealPixelEnv
        from envs.through_model import RealTaskThroughModel

        models = load_imagination_models(settings.task, settings.world_model_checkpoint, device=COLLECTION_DEVICE)
        if models.fingerprint != settings.world_model_fingerprint:
            raise InputError(f"{settings.world_model_checkpoint} changed during the collection; rerun the command")
        real = RealPixelEnv(settings.task, action_repeat=settings.action_repeat,
                            fast_render=bool(settings.render["fast_render"]))  # fmt: skip
        recorder = EpisodeRecorder(real)
        agent: BaseAlgorithm | CEMPlanner
        warmup_actions = "random"
        if settings.policy_algorithm == PLANNER_ALGORITHM:
            from worldmodel.planning import CEMPlanner, load_planner_config

            config = load_planner_config(settings.policy)
            agent = CEMPlanner(models.world_model, models.reward_predictor, get_task(settings.task).action_dim, config)
            warmup_actions = config.warmup
        else:
            agent = load_agent(Path(settings.policy), settings.policy_algorithm)
        env = RealTaskThroughModel(recorder, models, settings.observe_keypoints, warmup_steps=settings.warmup_steps,
                                   warmup_actions=warmup_actions, refilter=settings.refilter)  # fmt: skip
        _RUNNERS[key] = PolicyRunner(env, recorder, agent, list(real.simulator.state_layout))
    return _RUNNERS[key]


def policy_episode(settings: PolicySettings, index: int) -> tuple[storage.Episode, list[tuple[str, int]]]:
    """Act episode ``index`` with the agent (module docstring); returns it and the state layout."""
    runner = _runner(settings)
    seeds = policy_episode_seeds(settings, index)
    noise = np.random.default_rng(seeds.noise)
    import torch  # (loaded by _runner already)

    from worldmodel.devices import cpu_threads
    from worldmodel.planning import CEMPlanner

    agent = runner.agent
    if isinstance(agent, CEMPlanner):  # its own draws, from the episode's seeds
        agent.reset(seed=int(seeds.noise.spawn(1)[0].generate_state(1, np.uint64)[0] >> 1))
    observation, _ = runner.env.reset(seed=seeds.filter, options={"episode_seed": seeds.env})
    while len(runner.recorder.actions) < settings.episode_steps:
        if isinstance(agent, CEMPlanner):
            # One torch thread, as the filter: the workers are the parallelism, and two threads per worker on
            # cores the workers fill spin-wait on each other (a planned step took ~5 s instead of ~1.5 s).
            with cpu_threads(1, torch.device(COLLECTION_DEVICE)):
                action = agent.plan(runner.env.carry, runner.env.context_hidden).action
        else:
            action, _ = agent.predict(observation, deterministic=True)
        draw = noise.standard_normal(np.shape(action))
        noisy = np.clip(np.asarray(action, np.float64) + settings.noise * draw, -1.0, 1.0).astype(np.float32)
        observation, *_ = runner.env.step(noisy)
    return runner.recorder.episode(), runner.state_layout
