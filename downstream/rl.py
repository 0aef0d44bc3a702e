"""Train a policy purely in imagination, then evaluate it on the real task beside a random policy.

    python downstream/rl.py --task cheetah --algo ppo --steps 300000 --num-envs 32 --gif

1. ``--num-envs`` imagined episodes of ``StructVRNN-Imagined-<task>`` (``--horizon`` steps each) as one
   batch (``envs.sb3.ImaginedSB3VecEnv``) train a stable-baselines3 SAC or PPO agent on the world model's
   hidden states and its learned reward; the agent is saved to ``<out>/<task>-<algo>.zip``.
2. The agent then acts on the real task ``StructVRNN-Real-<task>`` seen through the same world model
   (``envs.through_model.RealTaskThroughModel``: real frames -> detect -> posterior, step by step, after a
   7-step random warm-up like an imagined episode's context) for ``--eval-episodes`` episodes, and so
   does a uniform random policy; both real returns are reported (mean ± std), with the agent's return in
   imagination beside them (how much the model's reward flatters the agent). Results go to
   ``<out>/<task>-<algo>.json``.
   PPO training is saved every ``--save-every`` imagined steps to ``<out>/<task>-ppo.resume.pt``
   (``envs.sb3_snapshot``): the same command run again after a kill continues from there and ends with the
   agent an uninterrupted run would have trained; once training is done, a rerun goes straight to step 2.
3. ``--gif``: one real episode under the agent, each real frame beside the frame the model imagines
   open loop from the same start under the same actions, to ``<out>/<task>-<algo>.gif``.

The world model comes from ``--checkpoint``, else ``$STRUCTVRNN_CHECKPOINT``, else ``runs/world_model``;
its reward predictor from ``<run dir>/reward_predictors/<task>.pt`` (``python downstream/reward.py``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np
import torch
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecMonitor
from tqdm.auto import tqdm

from envs.imagination_batch import ImaginationOptions, decode_frames, prior_step
from envs.imagination_models import ImaginationModels, load_imagination_models
from envs.real import RealPixelEnv
from envs.sb3 import ImaginedSB3VecEnv
from envs.sb3_snapshot import PeriodicSnapshots, SnapshotError, load_snapshot, read_snapshot, save_snapshot
from envs.through_model import RealTaskThroughModel
from worldmodel.atomic import atomic_write, atomic_write_stream, atomic_write_text
from worldmodel.errors import InputError, check_options, run_cli
from worldmodel.options import changed_options, plain_options
from worldmodel.tasks import get_task, pad_actions


@dataclass(frozen=True)
class Args:
    task: str = "cheetah"
    """One task: acrobot, cartpole, cheetah, reacher, walker-stand or walker-walk."""
    algo: Literal["sac", "ppo"] = "sac"
    """stable-baselines3 algorithm trained in imagination."""
    steps: int = 100_000
    """Imagined environment steps to train for (summed over the sub-envs)."""
    num_envs: int = 16
    """Imagined episodes stepped together as one batch."""
    checkpoint: Path | None = None
    """World-model run directory or checkpoint file; default $STRUCTVRNN_CHECKPOINT, else runs/world_model."""
    reward_predictor: Path | None = None
    """Reward predictor file; default <run dir>/reward_predictors/<task>.pt."""
    data: Path | None = None
    """Dataset directory for the imagined episodes' real contexts; default the one recorded in the checkpoint."""
    context: Literal["dataset", "simulator"] = "dataset"
    """Where imagined episodes start: test-split windows, or the real simulator under random actions."""
    start_share: float = 0.0
    """Share of the test-split windows that are an episode's first 8 frames: the real task's initial states, where real evaluation episodes hand over to the agent after their random warm-up. For tasks whose random data rarely shows the states a good policy keeps (cartpole's upright pole)."""
    observe_keypoints: bool = False
    """Let the agent see the current keypoints beside the hidden state."""
    horizon: int | None = 12
    """Imagined steps per training episode, each from a fresh real context. 12 = the open-loop length the reward predictor is fit and tested on (downstream/reward.py); over the task's full horizon (None) the agent learns to exploit the model's errors instead (docs/DECISIONS.md)."""
    eval_episodes: int = 5
    """Real episodes for the agent and for the random policy each (and imagined ones for the agent)."""
    refilter: bool = True
    """On the real task, the agent's observation after each frame comes from the last 8 frames filtered afresh, as an imagined episode's context is (--no-refilter: one filter over the whole episode, as before 2026-12-04)."""
    gif: bool = False
    """Write a GIF of one real episode under the agent beside the model's open-loop imagination of it."""
    out: Path = Path("runs/rl")
    """Where the agent, the results and the GIF go."""
    seed: int = 0
    """Seeds the agent, the imagined and the real episodes."""
    device: str = "auto"
    """Device of the world model: 'auto' (cuda if available), 'cpu', 'cuda'."""
    agent_device: str = "cpu"
    """Device of the agent's networks (small MLPs: the CPU is usually faster)."""
    init_agent: Path | None = None
    """Start from this agent's weights (and optimizer state), a .zip of downstream/rl.py with the same --algo and observations, instead of a new agent: e.g. the RL loop's previous round (downstream/loop.py --keep-agent)."""
    save_every: int = 20_000
    """PPO: save the training state every this many imagined steps (at the next update), so that rerunning a killed run continues it exactly; 0 never saves. SAC runs are not saved (their replay buffer would have to be) and start over."""


# Options that do not change the trained agent: a rerun may change them and still continue a saved training.
RESUME_FREE_OPTIONS = frozenset({"eval_episodes", "gif", "out", "save_every", "refilter"})


class Returns(NamedTuple):
    mean: float
    std: float
    values: list[float]


class Report(NamedTuple):
    agent_path: Path
    results_path: Path
    gif_path: Path | None
    real_agent: Returns
    real_random: Returns
    imagined_agent: Returns


class ProgressBar(BaseCallback):
    """A tqdm bar over imagined environment steps, with the mean return of recent imagined episodes."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.bar: tqdm | None = None

    def _on_training_start(self) -> None:
        self.bar = tqdm(total=self.total, initial=self.num_timesteps, desc="imagined steps", unit="step",
                        dynamic_ncols=True)  # fmt: skip

    def _on_step(self) -> bool:
        assert self.bar is not None
        self.bar.update(self.training_env.num_envs)
        episodes = self.model.ep_info_buffer
        if episodes and self.n_calls % 50 == 0:
            self.bar.set_postfix(imagined_return=f"{np.mean([e['r'] for e in episodes]):.2f}")
        return True

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_args(args: Args) -> None:
    """Raise InputError for options that cannot run (the models and data are checked where they are loaded)."""
    get_task(args.task, option="--task")
    check_options(args, 1, "steps", "num_envs", "eval_episodes")
    if args.save_every < 0:
        raise InputError(f"--save-every must be >= 0 (0: never), got {args.save_every}")
    if args.horizon is not None and args.horizon < 1:
        raise InputError(f"--horizon must be positive, got {args.horizon}")
    if not 0.0 <= args.start_share <= 1.0:  # also refuses nan
        raise InputError(f"--start-share must be a fraction in [0, 1], got {args.start_share}")
    check_options(args, 0, "seed")
    if args.checkpoint is not None and not args.checkpoint.exists():
        raise InputError(f"--checkpoint {args.checkpoint} does not exist; give a run directory of train/world_model.py")
    if args.data is not None and not args.data.is_dir():
        raise InputError(f"--data {args.data} is not a directory; give the dataset folder of collect/dmcs.py")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file, not a folder; choose another --out")
    if args.init_agent is not None and not args.init_agent.is_file():
        raise InputError(f"--init-agent {args.init_agent} is not a file; give an agent .zip of downstream/rl.py")


def make_agent(args: Args, venv: VecMonitor) -> BaseAlgorithm:
    if args.algo == "sac":
        return SAC("MlpPolicy", venv, seed=args.seed, device=args.agent_device, verbose=0,
                   learning_starts=min(1000, args.steps // 10), batch_size=256)
    # PPO: ~2048 transitions per update whatever the number of sub-envs (fewer for very short runs).
    n_steps = max(8, min(2048 // args.num_envs, args.steps // args.num_envs))
    return PPO("MlpPolicy", venv, seed=args.seed, device=args.agent_device, verbose=0,
               n_steps=n_steps, batch_size=min(256, n_steps * args.num_envs))


def initial_agent(args: Args, venv: VecMonitor) -> BaseAlgorithm:
    """A new agent (seeded by --seed), with the weights of --init-agent when given."""
    agent = make_agent(args, venv)
    if args.init_agent is not None:
        try:
            agent.set_parameters(str(args.init_agent), exact_match=True, device=args.agent_device)
        except (ValueError, KeyError, RuntimeError, OSError) as error:  # another algorithm, size or no agent
            raise InputError(f"--init-agent {args.init_agent} cannot start this {args.algo.upper()} agent on "
                             f"{args.task}'s observations ({str(error).splitlines()[0][:160]}); give an agent of "
                             "the same --algo trained on a world model with the same hidden state size") from None  # fmt: skip
    return agent


def summarize(values: list[float]) -> Returns:
    return Returns(float(np.mean(values)), float(np.std(values)), [float(v) for v in values])


def imagination_options(args: Args) -> dict[str, Any]:
    """The imagined envs' keyword arguments (``envs.imagination_batch.ImaginationOptions``) these options ask for."""
    return asdict(ImaginationOptions(
        checkpoint=args.checkpoint, reward_predictor=args.reward_predictor, data=args.data, context=args.context,
        start_share=args.start_share, observe_keypoints=args.observe_keypoints, horizon=args.horizon, device=args.device,
    ))


def imagined_returns(agent: BaseAlgorithm, args: Args, episodes: int) -> Returns:
    """The agent's (deterministic) returns in imagination, one batch of ``episodes`` sub-envs."""
    venv = ImaginedSB3VecEnv(args.task, episodes, **imagination_options(args))
    venv.seed(args.seed + 10_000)  # other contexts than the training episodes' first ones
    observations = venv.reset()
    totals = np.zeros(episodes)
    done = np.zeros(episodes, dtype=bool)
    while not done.all():
        actions, _ = agent.predict(observations, deterministic=True)
        observations, rewards, dones, _ = venv.step(actions)
        totals += np.where(done, 0.0, rewards)
        done |= dones
    return summarize(totals.tolist())


# Chooses the action on the real task: (the env, its observation, whether the episode has just started).
RealPolicy = Callable[[RealTaskThroughModel, np.ndarray, bool], np.ndarray]


def real_episode_returns(
    models: ImaginationModels, task: str, seed: int, episodes: int, policy: RealPolicy | None,
    observe_keypoints: bool = False, label: str = "agent", warmup_actions: str = "random", refilter: bool = True,
) -> Returns:
    """Returns on the real task seen through the model, of ``policy``, or of uniform random actions (None).

    A return is the task's whole episode, as published returns are: the warm-up's random steps, which fill
    the posterior before the policy acts (the same steps for every policy: they follow the episode's seed),
    are counted with the policy's steps (``warmup_actions``: random, or zero for a policy that holds still
    then); ``refilter`` as ``RealTaskThroughModel``'s. Episode i starts from seed ``seed + 30_000 + i`` whatever
    the policy."""
    env = RealTaskThroughModel(RealPixelEnv(task, action_repeat=models.action_repeat), models, observe_keypoints,
                               warmup_actions=warmup_actions, refilter=refilter)  # fmt: skip
    action_rng = np.random.default_rng(seed + 20_000)
    totals = []
    for episode in tqdm(range(episodes), desc=f"real episodes {label if policy else 'random'}", leave=False):
        observation, info = env.reset(seed=seed + 30_000 + episode)  # the same starts for every policy
        total, truncated, terminated, started = float(info["warmup_return"]), False, False, True
        while not (truncated or terminated):
            if policy is None:
                action = action_rng.uniform(-1.0, 1.0, env.action_space.shape).astype(np.float32)
            else:
                action = policy(env, observation, started)
            observation, reward, terminated, truncated, _ = env.step(action)
            total, started = total + reward, False
        totals.append(total)
    env.close()
    return summarize(totals)


def agent_policy(agent: BaseAlgorithm) -> RealPolicy:
    """The agent's deterministic action, as a ``RealPolicy``."""
    def act(env: RealTaskThroughModel, observation: np.ndarray, started: bool) -> np.ndarray:
        return agent.predict(observation, deterministic=True)[0]

    return act


def real_returns(
    models: ImaginationModels, args: Args, episodes: int, agent: BaseAlgorithm | None
) -> Returns:
    """``real_episode_returns`` of the agent (deterministic), or of uniform random actions (None)."""
    policy = None if agent is None else agent_policy(agent)
    return real_episode_returns(models, args.task, args.seed, episodes, policy, args.observe_keypoints,
                                refilter=args.refilter)  # fmt: skip


@torch.inference_mode()
def write_gif(
    path: Path, models: ImaginationModels, policy: RealPolicy, task: str, seed: int, observe_keypoints: bool = False,
    warmup_actions: str = "random", refilter: bool = True,
) -> None:
    """One real episode under the policy; each frame: real (left) | imagined open loop, same actions (right)."""
    import imageio.v2 as imageio

    env = RealTaskThroughModel(
        RealPixelEnv(task, action_repeat=models.action_repeat, render_mode="rgb_array"), models, observe_keypoints,
        warmup_actions=warmup_actions, refilter=refilter,
    )
    model = models.world_model
    observation, _ = env.reset(seed=seed + 40_000)
    assert env.first_frame is not None and env.first_keypoints is not None
    first_frame = torch.from_numpy(env.first_frame).to(models.device)[None]
    imagined = env.carry  # imagination starts where the filter stands after the warm-up
    generator = torch.Generator().manual_seed(seed)
    frames = []
    truncated = terminated = False
    started = True
    while not (truncated or terminated):
        action = policy(env, observation, started)
        started = False
        observation, _, terminated, truncated, _ = env.step(action)
        padded = torch.from_numpy(pad_actions(np.clip(action, -1, 1)[None])).to(models.device)
        noise = torch.randn((1, model.dynamics.noise_size), generator=generator).to(models.device)
        imagined = prior_step(model, imagined, padded, noise)
        keypoints = model.normalizer.denormalize(model.dynamics.keypoints(imagined)).view(1, -1, 3)
        dream = decode_frames(model, keypoints, first_frame, env.first_keypoints)[0]
        real = env.render()
        assert real is not None
        frames.append(np.concatenate([real, dream], axis=1).repeat(2, axis=0).repeat(2, axis=1))
    env.close()
    atomic_write(path, lambda temporary: imageio.mimsave(temporary, frames, format="GIF", duration=1000 / 30, loop=0))


def args_record(args: Args) -> dict[str, Any]:
    return plain_options(args)


def finished_report(args: Args) -> Report | None:
    """The report of an earlier run with exactly these options, if it finished (its results file is written
    last); None otherwise."""
    stem = f"{args.task}-{args.algo}"
    results_path = args.out / f"{stem}.json"
    try:
        record = json.loads(results_path.read_text())
        if record["args"] != args_record(args):
            return None
        returns = [Returns(**record[key]) for key in ("real_agent", "real_random", "imagined_agent")]
    except (OSError, ValueError, KeyError, TypeError):  # absent, damaged or of another version: run again
        return None
    gif_path = args.out / f"{stem}.gif" if args.gif else None
    return Report(args.out / f"{stem}.zip", results_path, gif_path, *returns)


def resume_settings(args: Args, fingerprint: str) -> dict[str, Any]:
    """What decides the trained agent: the options (less RESUME_FREE_OPTIONS) and the world model's weights."""
    options = plain_options(args)
    return {**{key: options[key] for key in sorted(options) if key not in RESUME_FREE_OPTIONS},
            "world_model": fingerprint}  # fmt: skip


def train_agent(args: Args, venv: VecMonitor, models: ImaginationModels, snapshot_path: Path) -> BaseAlgorithm:
    """Train the agent in imagination, from the snapshot at ``snapshot_path`` if one exists (PPO), saving
    one every ``--save-every`` steps and at the end."""
    settings = resume_settings(args, models.fingerprint)
    resumable = args.algo == "ppo" and args.save_every > 0
    if resumable and snapshot_path.is_file():
        try:
            snapshot = read_snapshot(snapshot_path)
        except SnapshotError as error:
            raise InputError(str(error)) from None
        # A snapshot of an older version lacks the options added since: their defaults (the behaviour then) stand in.
        defaults = plain_options(Args())
        differences = changed_options(snapshot["settings"], settings, defaults, RESUME_FREE_OPTIONS)
        if differences:
            raise InputError(f"{snapshot_path} continues a run with other settings ({', '.join(differences)}): "
                             "rerun with those, or choose another --out")  # fmt: skip
        agent: BaseAlgorithm = load_snapshot(snapshot, venv, args.agent_device)
        print(f"continuing {args.algo.upper()} from {snapshot_path} at {agent.num_timesteps} of {args.steps} steps")
    else:
        torch.manual_seed(args.seed)
        venv.seed(args.seed)
        agent = initial_agent(args, venv)
        print(f"training {args.algo.upper()} on {args.num_envs} imagined {args.task} episodes "
              f"(model {models.checkpoint}, horizon {venv.unwrapped.horizon})")  # fmt: skip
    if agent.num_timesteps >= args.steps:  # trained before: the evaluation was what was left
        return agent
    callbacks: list[BaseCallback] = [ProgressBar(args.steps)]
    if resumable:
        callbacks.append(PeriodicSnapshots(snapshot_path, args.save_every, settings))
    # Continuing: SB3 keeps the saved last observations and counts on to the same total.
    agent.learn(total_timesteps=args.steps - agent.num_timesteps, callback=callbacks,
                reset_num_timesteps=agent.num_timesteps == 0)  # fmt: skip
    if resumable:
        save_snapshot(snapshot_path, agent, settings)  # a rerun goes straight to the evaluation
    return agent


def main(args: Args) -> Report:
    """Train (or continue from the last snapshot), evaluate, report; bad input raises InputError before
    anything is written, and a rerun of a finished run with the same options does nothing."""
    check_args(args)
    done = finished_report(args)
    if done is not None:
        print(f"{done.results_path} already holds the results of these options: nothing to do")
        return done
    models = load_imagination_models(args.task, args.checkpoint, args.reward_predictor, args.device)  # else InputError
    venv = VecMonitor(ImaginedSB3VecEnv(args.task, args.num_envs, **imagination_options(args)))
    stem = f"{args.task}-{args.algo}"
    agent = train_agent(args, venv, models, args.out / f"{stem}.resume.pt")
    args.out.mkdir(parents=True, exist_ok=True)
    agent_path = args.out / f"{stem}.zip"
    atomic_write_stream(agent_path, agent.save)

    imagined = imagined_returns(agent, args, args.eval_episodes)
    real_agent = real_returns(models, args, args.eval_episodes, agent)
    real_random = real_returns(models, args, args.eval_episodes, None)
    gif_path = args.out / f"{stem}.gif" if args.gif else None
    if gif_path is not None:
        write_gif(gif_path, models, agent_policy(agent), args.task, args.seed, args.observe_keypoints,
                  refilter=args.refilter)  # fmt: skip

    results_path = args.out / f"{stem}.json"
    record = {
        "args": args_record(args),
        "world_model": {"checkpoint": str(models.checkpoint), "fingerprint": models.fingerprint},
        "action_repeat": models.action_repeat,
        "real_agent": real_agent._asdict(),
        "real_random": real_random._asdict(),
        "imagined_agent": imagined._asdict(),
    }
    atomic_write_text(results_path, json.dumps(record, indent=2) + "\n")
    print(f"\n{args.task}: returns over {args.eval_episodes} episodes (mean ± std)")
    print(f"  real, agent trained in imagination  {real_agent.mean:9.2f} ± {real_agent.std:.2f}")
    print(f"  real, random policy                 {real_random.mean:9.2f} ± {real_random.std:.2f}")
    print(f"  imagined, agent                     {imagined.mean:9.2f} ± {imagined.std:.2f}")
    print(f"wrote {agent_path}, {results_path}" + (f", {gif_path}" if gif_path else ""))
    return Report(agent_path, results_path, gif_path, real_agent, real_random, imagined)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
