"""``StructVRNN-Imagined-<task>``: a DeepMind Control task stepped inside a trained Struct-VRNN world model.

An episode starts from a real context (``envs.context``: 8 frames and actions from the dataset's test split
or the real simulator) filtered through the posterior, and then continues in imagination: each action
drives one imagine step of the model's dynamics core (a prior sample), the agent observes the core's hidden
state (``DynamicsCore.hidden_state``: the GRU state of the VRNNs, SRVP's y), and the
task's GRU reward predictor (``downstream/reward.py``), carried as a recurrent state over the same
hidden states, gives the reward. ``render()`` decodes the imagined keypoints into a 64x64 frame. What a step
computes, where the reward comes from, the contexts and the seeding: docs/DESIGN.md section 5.

Which world model (first found wins): the ``checkpoint=`` keyword (a run directory of
``train/world_model.py`` or a checkpoint file in it), the ``STRUCTVRNN_CHECKPOINT`` environment variable,
the trainer's default run directory ``runs/world_model``. Its reward predictor is
``<run dir>/reward_predictors/<task>.pt`` (or ``reward_predictor=``); it must carry the fingerprint of
that model's weights. Models are loaded once per process and device (cache keyed by path and mtime).

All the sub-env machinery (``ImaginationBatch``) works on a batch: the single env here is a batch of one,
``envs.imagined_vector.ImaginedVectorEnv`` and ``envs.sb3.ImaginedSB3VecEnv`` run many sub-envs as one
tensor batch. Every random draw of a sub-env comes from its own ``np_random`` (context choice and a seed
for its own ``torch.Generator``), so a batch gives exactly what its sub-envs give one by one.

``RealTaskThroughModel`` runs the same model as a filter on the real task (``StructVRNN-Real-<task>``):
real frames -> detect -> posterior, step by step, so a policy trained here sees the same observations there.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from envs.context import (
    CONTEXT_LENGTH,
    ContextSource,
    FilteredContext,
    context_source,
    cpu_threads,
    detect_frames,
    filter_context,
    posterior_noise,
    posterior_step,
)
from worldmodel.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    LoadedWorldModel,
    find_checkpoint,
    load_world_model,
)
from worldmodel.config import WARMUP_ACTIONS
from worldmodel.devices import resolve_device
from worldmodel.dynamics_core import CoreCarry, DynamicsCore
from worldmodel.errors import InputError, MissingInputError
from worldmodel.fingerprint import model_fingerprint
from worldmodel.model import WorldModel, inference_autocast
from worldmodel.reward import RewardPredictor, RewardPredictorMismatch, load_reward_predictor
from worldmodel.tasks import CONTROL_STEPS_PER_EPISODE, IMAGE_SIZE, MAX_ACTION_DIM, get_task, pad_actions

CHECKPOINT_ENV = "STRUCTVRNN_CHECKPOINT"
DEFAULT_RUN_DIR = Path("runs/world_model")  # train/world_model.py's default --out
REWARD_PREDICTOR_DIR = "reward_predictors"  # downstream/reward.py writes <run dir>/reward_predictors/<task>.pt
_Loaded = TypeVar("_Loaded")
NOISE_BLOCK = 64  # prior draws fetched per sub-env at a time: one Python call per sub-env every 64 steps
RENDER_MODES = ("rgb_array",)
__all__ = [
    "CHECKPOINT_ENV",
    "ImaginationBatch",
    "ImaginationModels",
    "ImaginationOptions",
    "ImaginedEnv",
    "RealTaskThroughModel",
    "check_actions",
    "decode_frames",
    "load_imagination_models",
    "resolve_device",
]


# ----------------------------------------------------------------------------------------------
# The envs' options
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImaginationOptions:
    """The keyword arguments every imagined env takes besides the task (``ImaginedEnv``'s table explains them)."""

    checkpoint: str | os.PathLike[str] | None = None
    reward_predictor: str | os.PathLike[str] | None = None
    data: str | os.PathLike[str] | None = None
    context: str = "dataset"
    start_share: float = 0.0
    observe_keypoints: bool = False
    horizon: int | None = None
    device: str | torch.device = "auto"
    threads: int | None = 1
    render_mode: str | None = None

    def check(self) -> None:
        """InputError for values no env can run with (models and data are checked where they are loaded)."""
        if self.render_mode is not None and self.render_mode not in RENDER_MODES:
            raise InputError(f"render_mode must be None or 'rgb_array', got {self.render_mode!r}")
        if self.horizon is not None and self.horizon < 1:
            raise InputError(f"horizon must be >= 1, got {self.horizon}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be None or >= 1, got {self.threads}")
        if not 0.0 <= self.start_share <= 1.0:  # also refuses nan
            raise InputError(f"start_share must be a fraction in [0, 1], got {self.start_share}")

    @property
    def keep_frames(self) -> bool:
        """Rendering decodes frames against the context's first frame, which is then kept."""
        return self.render_mode == "rgb_array"


# ----------------------------------------------------------------------------------------------
# Loading the world model and its reward predictor (once per process)
# ----------------------------------------------------------------------------------------------
class ImaginationModels(NamedTuple):
    """A world model, one task's reward predictor fit on its hidden states, and what the checkpoint says."""

    world_model: WorldModel  # eval mode, on `device`; shared: never modify
    reward_predictor: RewardPredictor  # eval mode, on `device`; shared: never modify
    fingerprint: str  # model_fingerprint(world_model)
    checkpoint: Path  # the checkpoint file
    dataset: Path | None  # the training data directory recorded in the checkpoint
    keypoint_cache: Path | None  # a staged run's detected keypoints of that data (train/world_model.py)
    task: str
    action_repeat: int  # the one the model's data of this task was collected with
    device: torch.device


def resolve_checkpoint(checkpoint: str | os.PathLike[str] | None) -> Path:
    """The checkpoint file: the argument, else $STRUCTVRNN_CHECKPOINT, else runs/world_model; one clear error."""
    if checkpoint is not None:
        candidates = [(Path(checkpoint), "checkpoint=")]
    elif os.environ.get(CHECKPOINT_ENV):
        candidates = [(Path(os.environ[CHECKPOINT_ENV]), f"${CHECKPOINT_ENV}")]
    else:
        candidates = [(DEFAULT_RUN_DIR, "the default run directory")]
    path, origin = candidates[0]
    try:
        return find_checkpoint(path).resolve()
    except CheckpointError:
        raise CheckpointError(
            f"no world-model checkpoint at {path} ({origin}; looked for {path} or {path / CHECKPOINT_FILE}): "
            f"train one with `python train/world_model.py --out {DEFAULT_RUN_DIR}`, then fit its reward "
            f"predictors with `python downstream/reward.py --run {DEFAULT_RUN_DIR}`; or pass checkpoint=<run dir> "
            f"or set {CHECKPOINT_ENV}"
        ) from None


# Models loaded in this process, keyed by what they were loaded from (path, mtime, device, ...): every env of
# the process shares them (they are never modified) and a file changed on disk is loaded again.
_LOADED: dict[tuple[Any, ...], Any] = {}
_LOAD_LOCK = threading.Lock()


def _load_once(key: tuple[Any, ...], load: Callable[[], _Loaded]) -> _Loaded:
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = load()
        return _LOADED[key]


def _load_world_model(path: Path, device: torch.device) -> tuple[LoadedWorldModel, str]:
    loaded = load_world_model(path, device)
    loaded.model.requires_grad_(False)
    return loaded, model_fingerprint(loaded.model)


def _load_reward_predictor(
    path: Path, task: str, fingerprint: str, hidden_size: int, device: torch.device
) -> RewardPredictor:
    predictor = load_reward_predictor(path, task, fingerprint, map_location=device)
    if predictor.input_size != hidden_size:
        raise RewardPredictorMismatch(
            f"{path} reads {predictor.input_size} features, the world model's hidden state has {hidden_size}"
        )
    return predictor.to(device).requires_grad_(False)


def load_imagination_models(
    task: str,
    checkpoint: str | os.PathLike[str] | None = None,
    reward_predictor: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    *,
    allow_state_bound: bool = False,
) -> ImaginationModels:
    """The world model and the task's reward predictor, from the per-process cache when unchanged on disk.

    Raises CheckpointError (no model: how to train one), FileNotFoundError (no reward predictor: how to fit
    one), RewardPredictorMismatch (the predictor was fit on another model's hidden states, or another task).
    """
    spec = get_task(task)
    device = resolve_device(device)
    path = resolve_checkpoint(checkpoint)
    model_key = ("world model", str(path), path.stat().st_mtime_ns, str(device))
    loaded, fingerprint = _load_once(model_key, lambda: _load_world_model(path, device))
    if loaded.config.reads_states and not allow_state_bound:  # the envs need frames; action_ranking reads states
        raise CheckpointError(
            f"the world model at {path} is a state-space bound (state-vrnn): it reads true states, not frames, "
            "and has no imagination env; it is a control for downstream/reward.py --state-bound"
        )
    dataset_info = loaded.info.dataset
    repeats = dataset_info.get("action_repeats") or {}
    if spec.name not in repeats:
        trained_on = ", ".join(dataset_info.get("tasks", repeats)) or "unknown tasks"
        raise CheckpointError(
            f"the world model at {path} was not trained on {spec.name} (its tasks: {trained_on}); "
            f"pass checkpoint= a run trained on {spec.name}"
        )
    if loaded.config.image_size != IMAGE_SIZE:
        raise CheckpointError(
            f"the world model at {path} sees {loaded.config.image_size}-pixel frames, the tasks render {IMAGE_SIZE}; "
            "pass checkpoint= a run of train/world_model.py on collect/dmcs.py data"
        )

    predictor_path = Path(reward_predictor) if reward_predictor is not None else (
        path.parent / REWARD_PREDICTOR_DIR / f"{spec.name}.pt"
    )
    if not predictor_path.is_file():
        raise MissingInputError(
            f"no reward predictor for {spec.name} at {predictor_path}; fit one for this world model with "
            f"`python downstream/reward.py --run {path.parent} --tasks {spec.name}` (or pass reward_predictor=)"
        )
    predictor_key = (
        "reward predictor", str(predictor_path.resolve()), predictor_path.stat().st_mtime_ns, fingerprint, spec.name,
        str(device),
    )
    hidden_size = loaded.model.dynamics.hidden_size
    predictor = _load_once(
        predictor_key, lambda: _load_reward_predictor(predictor_path, spec.name, fingerprint, hidden_size, device)
    )
    recorded = dataset_info.get("path")
    cache = dataset_info.get("keypoint_cache")
    return ImaginationModels(
        world_model=loaded.model,
        reward_predictor=predictor,
        fingerprint=fingerprint,
        checkpoint=path,
        dataset=Path(recorded) if recorded else None,
        keypoint_cache=Path(cache) if cache else None,
        task=spec.name,
        action_repeat=int(repeats[spec.name]),
        device=device,
    )


# ----------------------------------------------------------------------------------------------
# Actions
# ----------------------------------------------------------------------------------------------
def check_actions(actions: Any, shape: tuple[int, ...], task: str) -> np.ndarray:
    """Validate a batch of task actions: wrong shape or NaN/inf -> ValueError; out of [-1, 1] -> clipped
    (as dm_control does on the real task). Returns a fresh float32 array of ``shape``."""
    try:
        array = np.array(actions, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"action for {task} must be a float array of shape {shape}: {error}") from None
    if array.shape != shape:
        raise ValueError(f"action for {task} must have shape {shape}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"action for {task} contains NaN or inf: {array}")
    return np.clip(array, -1.0, 1.0, out=array)


# ----------------------------------------------------------------------------------------------
# The batched imagination core
# ----------------------------------------------------------------------------------------------
def prior_step(model: WorldModel, carry: CoreCarry, action: Tensor, noise: Tensor) -> CoreCarry:
    """One imagined frame, as ``WorldModel.imagine`` without targets, with the given prior draw.

    carry: the core's state after the current frame; action (B, 6): the action applied at the current
    frame; noise (B, noise_size): the standard normal draw of the prior sample.
    """
    return model.dynamics.imagine_step(carry, action, noise=noise[None]).carry


class NoiseStreams:
    """One seeded ``torch.Generator`` per sub-env (on the CPU, so results do not depend on the device),
    read in blocks of ``block`` prior draws of ``latent_dim`` (the core's ``noise_size``) numbers; a
    sub-env's k-th draw is the same whatever the batch."""

    def __init__(self, num_envs: int, latent_dim: int, device: torch.device, block: int = NOISE_BLOCK) -> None:
        self.generators = [torch.Generator() for _ in range(num_envs)]
        self.latent_dim, self.device, self.block = latent_dim, device, block
        self.buffer = torch.zeros(num_envs, block, latent_dim, device=device)
        self.position = np.full(num_envs, block)  # block = exhausted: refill before the next draw
        self._rows = torch.arange(num_envs, device=device)

    def reseed(self, index: int, seed: int) -> torch.Generator:
        """Restart sub-env ``index``'s stream; returns its generator (draw the posterior noise from it next)."""
        self.generators[index].manual_seed(seed)
        self.position[index] = self.block
        return self.generators[index]

    def draw(self) -> Tensor:
        """The next prior draw of every sub-env: (N, Z) on the device."""
        empty = np.flatnonzero(self.position >= self.block)
        if len(empty):
            fresh = torch.stack([
                torch.randn((self.block, self.latent_dim), generator=self.generators[i]) for i in empty
            ])
            self.buffer[torch.from_numpy(empty).to(self.device)] = fresh.to(self.device)
            self.position[empty] = 0
        noise = self.buffer[self._rows, torch.from_numpy(self.position).to(self.device)]
        self.position += 1
        return noise

    def state_dict(self) -> dict[str, Any]:
        """Where every stream stands: its generator, and the unread rest of its block."""
        return {
            "generators": [generator.get_state() for generator in self.generators],
            "buffer": self.buffer.cpu().clone(),
            "position": torch.from_numpy(self.position.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for generator, saved in zip(self.generators, state["generators"], strict=True):
            generator.set_state(saved)
        self.buffer = state["buffer"].to(self.device).clone()
        self.position = state["position"].numpy().copy()


class StepBatch(NamedTuple):
    observations: np.ndarray  # (N, D) float32, fresh
    rewards: np.ndarray  # (N,) float32
    truncated: np.ndarray  # (N,) bool: the sub-env reached its horizon with this step


class ResetBatch(NamedTuple):
    observations: np.ndarray  # (n, D) float32 of the reset sub-envs, in the order given
    infos: list[dict[str, Any]]  # one per reset sub-env: where its context came from


class ImaginationBatch:
    """N imagined episodes of one task as one tensor batch on the model's device.

    Observation of a sub-env: the core's hidden state (H,) that predicts the current frame, followed, when
    ``observe_keypoints``, by the current frame's keypoints (K*3,) (x, y, mu per keypoint; imagined
    frames: the decoded prior sample, in the detector's units).
    """

    def __init__(
        self,
        models: ImaginationModels,
        source: ContextSource,
        num_envs: int,
        horizon: int,
        observe_keypoints: bool,
        keep_frames: bool,
        threads: int | None = 1,
        start_share: float = 0.0,
    ) -> None:
        if num_envs < 1:
            raise InputError(f"num_envs must be >= 1, got {num_envs}")
        self.models, self.source = models, source
        self.model = models.world_model
        self.predictor = models.reward_predictor
        self.device = models.device
        self.task = models.task
        self.action_dim = get_task(self.task).action_dim
        self.num_envs, self.horizon = num_envs, horizon
        self.observe_keypoints, self.keep_frames = observe_keypoints, keep_frames
        self.threads, self.start_share = threads, start_share
        config = self.model.config
        core = self.model.dynamics
        self.num_keypoints = config.num_keypoints
        self.observation_space = observation_space(core, config.feature_size if observe_keypoints else 0)
        n, device = num_envs, self.device
        # The recurrence (the core's carry, normalised keypoints) and the reward predictor's state.
        self.carry: CoreCarry = core.initial_carry(n, device)
        self.reward_state = self.predictor.initial_state(n, device)
        self.first_keypoints = torch.zeros(n, config.num_keypoints, 3, device=device)
        self.first_frames = torch.zeros(n, 64, 64, 3, dtype=torch.uint8, device=device) if keep_frames else None
        self.noise = NoiseStreams(n, core.noise_size, device)
        self.steps = np.zeros(n, dtype=np.int64)
        self.started = np.zeros(n, dtype=bool)

    def _fp32(self) -> torch.autocast:
        """The dynamics and the reward predictor run in float32, as the model runs its dynamics (also under a
        caller's autocast; docs/DECISIONS.md); the convolutions (detection, decoding) use bf16 where the
        hardware runs it natively (``worldmodel.precision``)."""
        return torch.autocast(self.device.type, enabled=False)

    # ---- state (to continue an interrupted run exactly) ------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the batch's next observations and rewards (the sub-envs' random
        generators of contexts are their owners'): tensors and plain containers, on the CPU."""
        return {
            "num_envs": self.num_envs,
            "carry": [part.detach().cpu().clone() for part in self.carry],
            "reward_state": self.reward_state.detach().cpu().clone(),
            "first_keypoints": self.first_keypoints.cpu().clone(),
            "first_frames": None if self.first_frames is None else self.first_frames.cpu().clone(),
            "noise": self.noise.state_dict(),
            "steps": torch.from_numpy(self.steps.copy()),
            "started": torch.from_numpy(self.started.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a batch of the same world model, task and number of sub-envs."""
        shapes = [tuple(part.shape) for part in self.carry]
        if state["num_envs"] != self.num_envs or [tuple(part.shape) for part in state["carry"]] != shapes:
            raise ValueError(
                f"the saved imagination state is of {state['num_envs']} sub-envs of another shape; this batch has "
                f"{self.num_envs} sub-envs of {shapes}: continue with the same --num-envs and world model"
            )
        device = self.device
        self.carry = type(self.carry)(*(part.to(device) for part in state["carry"]))
        self.reward_state = state["reward_state"].to(device)
        self.first_keypoints = state["first_keypoints"].to(device)
        if self.first_frames is not None and state["first_frames"] is not None:
            self.first_frames = state["first_frames"].to(device)
        self.noise.load_state_dict(state["noise"])
        self.steps = state["steps"].numpy().copy()
        self.started = state["started"].numpy().copy()

    # ---- observations -------------------------------------------------------------------------------
    def current_keypoints(self) -> Tensor:
        """(N, K, 3) keypoints of every sub-env's current frame, in the detector's units."""
        keypoints = self.model.dynamics.keypoints(self.carry)
        return self.model.normalizer.denormalize(keypoints).view(self.num_envs, self.num_keypoints, 3)

    def observations(self, rows: Tensor | None = None) -> np.ndarray:
        """(N, D) (or the given rows) float32 observations of the current frames, a fresh array."""
        carry = self.carry if rows is None else type(self.carry)(*(part[rows] for part in self.carry))
        return observations_of(self.model, carry, self.observe_keypoints)

    # ---- reset ----------------------------------------------------------------------------------------
    def reset(self, indices: Sequence[int], rngs: Sequence[np.random.Generator]) -> ResetBatch:
        """Start new episodes in sub-envs ``indices``, each drawing from its own generator in ``rngs``."""
        with cpu_threads(self.threads, self.device), self._fp32():
            return self._reset(indices, rngs)

    @torch.inference_mode()
    def _reset(self, indices: Sequence[int], rngs: Sequence[np.random.Generator]) -> ResetBatch:
        if len(indices) != len(rngs):
            raise ValueError("one random generator per reset sub-env")
        contexts, noises, infos = [], [], []
        for index, rng in zip(indices, rngs):
            # Draw order (fixed: it defines the episode): whether it starts at an episode's beginning (only
            # drawn when start_share > 0), the context, then the seed of the torch stream.
            from_start = self.start_share > 0 and bool(rng.random() < self.start_share)
            context = self.source.sample(rng, with_frame=self.keep_frames, from_start=from_start)
            generator = self.noise.reseed(index, int(rng.integers(2**63 - 1)))
            noises.append(posterior_noise(generator, self.model))
            contexts.append(context)
            infos.append(dict(context.info))
        rows = torch.as_tensor(list(indices), device=self.device)
        keypoints = torch.stack([c.keypoints for c in contexts])  # (n, L, K, 3)
        actions = torch.stack([c.actions for c in contexts])  # (n, L, 6)
        filtered = filter_context(self.model, keypoints, actions, torch.stack(noises).to(self.device))
        for mine, theirs in zip(self.carry, filtered.carry):
            mine[rows] = theirs
        # Warm the reward predictor up on the context's hidden states (its outputs there are not rewards
        # of this episode); its state then predicts the reward of the first imagined step.
        _, warm = self.predictor(filtered.hidden, self.predictor.initial_state(len(contexts), self.device))
        self.reward_state[:, rows] = warm
        self.first_keypoints[rows] = keypoints[:, 0]
        if self.first_frames is not None:
            self.first_frames[rows] = torch.stack([c.first_frame for c in contexts if c.first_frame is not None])
        index_array = np.asarray(indices, dtype=np.int64)
        self.steps[index_array] = 0
        self.started[index_array] = True
        return ResetBatch(self.observations(rows), infos)

    # ---- step -----------------------------------------------------------------------------------------
    def step(self, actions: np.ndarray) -> StepBatch:
        """Step every sub-env with already checked task actions (N, A) float32 in [-1, 1]."""
        with cpu_threads(self.threads, self.device), self._fp32():
            return self._step(actions)

    @torch.inference_mode()
    def _step(self, actions: np.ndarray) -> StepBatch:
        if not self.started.all():
            raise RuntimeError("call reset() before step()")
        padded = torch.from_numpy(pad_actions(actions)).to(self.device)  # (N, 6)
        self.carry = prior_step(self.model, self.carry, padded, self.noise.draw())
        # The reward of the step t -> t+1 is read from the state that predicts frame t+1 (align_rewards).
        hidden = self.model.dynamics.hidden_state(self.carry)
        rewards, self.reward_state = self.predictor(hidden[:, None], self.reward_state)
        self.steps += 1
        return StepBatch(
            self.observations(),
            rewards[:, 0].float().cpu().numpy(),
            self.steps >= self.horizon,
        )

    # ---- render ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def render(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """(n, 64, 64, 3) uint8: the current imagined frames, decoded from their keypoints with the
        context's first frame and its detected keypoints as the reference (S5)."""
        if self.first_frames is None:
            raise RuntimeError("this batch keeps no reference frames: create it with render_mode='rgb_array'")
        if not self.started.all():
            raise RuntimeError("call reset() before render()")
        rows = torch.arange(self.num_envs, device=self.device) if indices is None else torch.as_tensor(
            list(indices), device=self.device
        )
        with cpu_threads(self.threads, self.device):
            return decode_frames(
                self.model, self.current_keypoints()[rows], self.first_frames[rows], self.first_keypoints[rows]
            )


@torch.inference_mode()
def decode_frames(model: WorldModel, keypoints: Tensor, first_frames: Tensor, first_keypoints: Tensor) -> np.ndarray:
    """Frames drawn from keypoints (B, K, 3), with reference frames uint8 (B, 64, 64, 3) and their keypoints
    (B, K, 3) (S5) -> uint8 (B, 64, 64, 3) numpy."""
    with inference_autocast(keypoints.device):
        images = model.decode(keypoints[:, None], first_frames, first_keypoints)[:, 0]  # (B, 3, 64, 64)
    frames = ((images.float() + 0.5) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return frames.permute(0, 2, 3, 1).cpu().numpy().copy()


def observations_of(model: WorldModel, carry: CoreCarry, observe_keypoints: bool) -> np.ndarray:
    """(B, D) float32 numpy, fresh: the hidden states [and the current keypoints, de-normalised]."""
    core = model.dynamics
    # A GRU state is a convex mix of tanh outputs, so in [-1, 1]; the clamp only removes float rounding.
    parts = [core.hidden_state(carry).clamp(-core.hidden_bound, core.hidden_bound)]
    if observe_keypoints:
        parts.append(model.normalizer.denormalize(core.keypoints(carry)))
    return torch.cat(parts, dim=-1).float().cpu().numpy().copy()


def observation_space(core: DynamicsCore, keypoint_features: int) -> spaces.Box:
    """The core's hidden state lies in [-bound, bound] (a GRU's in [-1, 1], SRVP's y is unbounded); keypoints,
    decoded by a linear layer and de-normalised, are unbounded."""
    bound = core.hidden_bound
    low = np.concatenate([np.full(core.hidden_size, -bound), np.full(keypoint_features, -np.inf)]).astype(np.float32)
    return spaces.Box(low=low, high=-low, dtype=np.float32)


def default_horizon(action_repeat: int) -> int:
    return CONTROL_STEPS_PER_EPISODE // action_repeat


def build_batch(task: str, num_envs: int, options: ImaginationOptions) -> ImaginationBatch:
    """Check the options, load (or reuse) the models and the context source, and make the batch (shared by
    all env classes)."""
    options.check()
    models = load_imagination_models(task, options.checkpoint, options.reward_predictor, options.device)
    data, context = options.data, options.context
    if data is None and context == "dataset":
        if models.dataset is None:
            raise InputError(f"the checkpoint {models.checkpoint} records no dataset; pass data=<dataset dir>")
        data = models.dataset
    # The trainer's keypoints of its own data spare the detector at every reset (envs.context).
    same_data = data is not None and models.dataset is not None and Path(data).resolve() == models.dataset.resolve()
    cache = models.keypoint_cache if same_data and models.keypoint_cache is not None else None
    source = context_source(
        context, models.task, models.world_model, models.fingerprint, models.action_repeat, data, cache
    )
    return ImaginationBatch(
        models,
        source,
        num_envs,
        default_horizon(models.action_repeat) if options.horizon is None else options.horizon,
        options.observe_keypoints,
        options.keep_frames,
        options.threads,
        options.start_share,
    )


# ----------------------------------------------------------------------------------------------
# The single env
# ----------------------------------------------------------------------------------------------
class ImaginedEnv(gym.Env[np.ndarray, np.ndarray]):
    """A DeepMind Control task imagined by a Struct-VRNN world model, with a learned reward.

    ## Action space
    | | |
    |---|---|
    | type | ``Box(-1, 1, (A,), float32)`` with A the task's action size (1 for acrobot and cartpole, 2 for reacher, 6 for cheetah and walker); zero-padded to 6 for the model |
    | out of bounds | clipped to [-1, 1] (as dm_control does); NaN/inf or a wrong shape raise ``ValueError`` |

    ## Observation space
    | | |
    |---|---|
    | type | ``Box(float32)`` of size H (the dynamics core's ``hidden_size``: the GRU size for the VRNNs, 512 ``paper``, 256 ``cpu``; SRVP's state size), or H + 3K with ``observe_keypoints`` |
    | ``[0, H)`` | the core's hidden state that predicts the current frame: in [-1, 1] for the VRNNs (a GRU state), unbounded for SRVP's y |
    | ``[H, H+3K)`` | with ``observe_keypoints``: the current frame's keypoints (x, y, mu) x K, unbounded |

    ## Rewards
    The task's GRU reward predictor (S2.3, ``downstream/reward.py``), fit on this model's hidden states of
    real test windows, fed the hidden states of the episode (context included) as one sequence: the reward
    of the step t -> t+1 is its output at the state that predicts frame t+1. A float, roughly in the real
    task's range ``[0, action_repeat]`` (a regression, so not bounded).

    ## Starting state
    A context of 8 real frames and the 7 actions between them, filtered through the posterior: a random
    window of the dataset's test split (``context="dataset"``), or the first 8 frames of a real episode
    under uniform random actions (``context="simulator"``), chosen with ``np_random``. With ``start_share``
    p > 0, a share p of the dataset's windows are an episode's first 8 frames: the real task's initial states
    after a random warm-up, where real evaluation episodes (``RealTaskThroughModel``) hand over to the agent.

    ## Episode end
    Never terminated; truncated after ``horizon`` imagined steps (default ``1000 // action_repeat``, the
    action repeat the world model's data of this task was collected with).

    ## Arguments
    | | |
    |---|---|
    | ``task`` | ``acrobot``, ``cartpole``, ``cheetah``, ``reacher``, ``walker-stand``, ``walker-walk`` (set by the id) |
    | ``checkpoint`` | run directory of ``train/world_model.py`` or its checkpoint file; default ``$STRUCTVRNN_CHECKPOINT``, else ``runs/world_model`` |
    | ``reward_predictor`` | the predictor file; default ``<run dir>/reward_predictors/<task>.pt`` (its fingerprint must match the model) |
    | ``data`` | dataset directory for dataset contexts; default: the one recorded in the checkpoint |
    | ``context`` | ``"dataset"`` (test split, default) or ``"simulator"`` (the real task under random actions) |
    | ``start_share`` | share of dataset contexts that are an episode's first frames (default 0: every window alike) |
    | ``observe_keypoints`` | append the current keypoints to the observation (default ``False``) |
    | ``horizon`` | imagined steps per episode; default ``1000 // action_repeat`` |
    | ``device`` | ``"auto"`` (cuda if available), ``"cpu"``, ``"cuda"``, ... |
    | ``threads`` | torch CPU threads inside the env's calls (default 1: its tensors are small, see ``envs.context.cpu_threads``); ``None`` leaves torch's setting |
    | ``render_mode`` | ``"rgb_array"``: the imagined 64x64 frame decoded from the current keypoints |

    ``info`` at reset says where the context came from: ``context_episode`` and ``context_start`` (dataset)
    or ``context_seed`` (simulator). For many envs at once use ``gym.make_vec`` (one tensor batch).
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 30}

    def __init__(self, task: str, **options: Any) -> None:
        """``options``: the fields of ``ImaginationOptions`` (the table above)."""
        settings = ImaginationOptions(**options)
        self.batch = build_batch(task, 1, settings)
        self.render_mode = settings.render_mode
        self.task = self.batch.task
        self.horizon = self.batch.horizon
        self.action_repeat = self.batch.models.action_repeat
        self.action_space = spaces.Box(-1.0, 1.0, (self.batch.action_dim,), np.float32)
        self.observation_space = self.batch.observation_space

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        result = self.batch.reset([0], [self.np_random])
        return result.observations[0], result.infos[0]

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.batch.started[0]:
            raise RuntimeError("call reset() before step()")
        checked = check_actions(action, self.action_space.shape, self.task)
        result = self.batch.step(checked[None])
        return result.observations[0], float(result.rewards[0]), False, bool(result.truncated[0]), {}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self.batch.render([0])[0]


# ----------------------------------------------------------------------------------------------
# The real task seen through the model
# ----------------------------------------------------------------------------------------------
class RealTaskThroughModel(gym.Wrapper[np.ndarray, np.ndarray, np.ndarray, np.ndarray]):
    """The real pixel task (``StructVRNN-Real-<task>``) observed through the world model's posterior.

    Each real frame is detected and filtered with the posterior (best of S samples, as at the context of
    an imagined episode), so the observation is the same hidden state (and keypoints) an ``ImaginedEnv``
    of the same model gives: a policy trained in imagination runs here unchanged. By default (``refilter``)
    the state after each frame is that of the last 8 frames filtered afresh from the core's initial state,
    as an imagined episode's context is: the model and the agent never saw a state filtered longer.

    ## Action space
    The real env's: ``Box(-1, 1, (A,), float32)``.

    ## Observation space
    As ``ImaginedEnv``: the hidden state h_t that predicts the current frame (and its keypoints).

    ## Rewards
    The real task's reward (sum over the action repeat), unchanged.

    ## Starting state
    The real env's reset, then ``warmup_steps`` (default 7) actions, uniform random (``warmup_actions="random"``,
    the default) or zero (``"zero"``: the agent holds still while the filter fills), filtered like an imagined
    episode's 8-frame context; the agent acts from there. Warm-up rewards are not returned (they
    are in ``info["warmup_return"]`` at reset), so an episode has ``horizon - warmup_steps`` agent steps.

    ## Episode end
    As the real env: truncated at its horizon.

    ## Arguments
    | | |
    |---|---|
    | ``env`` | a ``StructVRNN-Real-<task>`` env (its action repeat must match the model's data) |
    | ``models`` | ``ImaginationModels`` of the same task (``load_imagination_models``) |
    | ``observe_keypoints`` | as ``ImaginedEnv`` |
    | ``warmup_steps`` | real steps filtered before the agent acts (default ``CONTEXT_LENGTH - 1``) |
    | ``warmup_actions`` | the warm-up's actions: ``"random"`` (uniform, default) or ``"zero"`` |
    | ``refilter`` | each frame's state from the last 8 frames filtered afresh from the core's initial state, as imagined episodes start (default ``True``); ``False``: one filter over the whole episode |
    | ``threads`` | torch CPU threads inside the filter (as ``ImaginedEnv``) |
    """

    def __init__(
        self,
        env: gym.Env[np.ndarray, np.ndarray],
        models: ImaginationModels,
        observe_keypoints: bool = False,
        warmup_steps: int = CONTEXT_LENGTH - 1,
        threads: int | None = 1,
        warmup_actions: str = "random",
        refilter: bool = True,
    ) -> None:
        super().__init__(env)
        simulator = getattr(env.unwrapped, "simulator", None)  # RealPixelEnv's; other envs are not checked
        repeat = None if simulator is None else simulator.action_repeat
        if repeat is not None and repeat != models.action_repeat:
            raise InputError(
                f"the real env steps with action repeat {repeat}, the world model's {models.task} data used "
                f"{models.action_repeat}; make it with action_repeat={models.action_repeat}"
            )
        if warmup_steps < 0:
            raise InputError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if warmup_actions not in WARMUP_ACTIONS:
            raise InputError(f"warmup_actions must be one of {', '.join(WARMUP_ACTIONS)}, got {warmup_actions!r}")
        self.warmup_actions = warmup_actions
        self.refilter = refilter
        self.models = models
        self.model = models.world_model
        self.observe_keypoints = observe_keypoints
        self.warmup_steps = warmup_steps
        self.threads = threads
        config = self.model.config
        self.observation_space = observation_space(self.model.dynamics, config.feature_size if observe_keypoints else 0)
        self._carry: CoreCarry | None = None
        self._generator = torch.Generator()
        self.first_frame: np.ndarray | None = None  # (64, 64, 3) the episode's first real frame
        self.first_keypoints: Tensor | None = None  # (1, K, 3) its detected keypoints
        self._recent_hidden: deque[Tensor] = deque(maxlen=CONTEXT_LENGTH)  # (H,) each, last frames'
        # the last frames' detected keypoints (1, K, 3) and the action that reached each (1, 6), zero for the first
        self._recent_inputs: deque[tuple[Tensor, Tensor]] = deque(maxlen=CONTEXT_LENGTH)

    @property
    def carry(self) -> CoreCarry:
        """The filter's state after the current real frame (normalised keypoints; do not modify); with ``refilter``
        that of the last frames' window."""
        if self._carry is None:
            raise RuntimeError("call reset() first")
        return self._carry

    @property
    def context_hidden(self) -> Tensor:
        """(L, H) the hidden states that predicted the last L <= ``CONTEXT_LENGTH`` real frames (as the posterior
        gave them): what warms up the reward predictor at an imagined episode's start (``worldmodel.planning``)."""
        if self._carry is None:
            raise RuntimeError("call reset() first")
        return torch.stack(list(self._recent_hidden))

    @torch.inference_mode()
    def refiltered(self, generator: torch.Generator) -> FilteredContext:
        """The last L <= ``CONTEXT_LENGTH`` real frames filtered afresh from the core's initial state, posterior
        draws from ``generator``: carry (batch 1) after the current frame, hidden (1, L, H) the states that
        predicted them.

        What the model was trained on and what an imagined episode starts from: a window that begins at the
        core's initial state (its first frame's action zero). With ``refilter`` the env's state after every
        frame is this (draws from the env's generator); a filter stepped over the whole episode instead goes far
        past the 16 steps of the training windows, and its state drifts from the states the dynamics, the reward
        predictor and the agents know (docs/DECISIONS.md, "Re-filtering the last 8 frames").
        """
        if self._carry is None:
            raise RuntimeError("call reset() first")
        keypoints = torch.stack([frame for frame, _ in self._recent_inputs], dim=1)  # (1, L, K, 3)
        reached = torch.stack([action for _, action in self._recent_inputs], dim=1)  # (1, L, 6)
        applied = torch.cat([reached[:, 1:], torch.zeros_like(reached[:, :1])], dim=1)  # (1, L, 6) at each frame
        noise = posterior_noise(generator, self.model, length=keypoints.shape[1])[None].to(self.models.device)
        with torch.autocast(self.models.device.type, enabled=False):
            return filter_context(self.model, keypoints, applied, noise)  # (its first frame's action: zero)

    def _filter(self, frame: np.ndarray, action: np.ndarray | None) -> np.ndarray:
        """Filter one real frame reached by ``action`` (None for the first) and return the observation."""
        with cpu_threads(self.threads, self.models.device):
            return self._filter_frame(frame, action)

    @torch.inference_mode()
    def _filter_frame(self, frame: np.ndarray, action: np.ndarray | None) -> np.ndarray:
        device = self.models.device
        keypoints = detect_frames(self.model, torch.from_numpy(np.ascontiguousarray(frame)).to(device)[None])
        if action is None:  # the episode's first frame: the reference for decoding (render, GIFs)
            self.first_frame, self.first_keypoints = np.array(frame), keypoints
        padded = torch.zeros(1, MAX_ACTION_DIM, device=device) if action is None else torch.from_numpy(
            pad_actions(np.asarray(action, np.float32)[None])
        ).to(device)
        if action is None:
            self._recent_hidden.clear()
            self._recent_inputs.clear()
        self._recent_inputs.append((keypoints, padded))
        if self.refilter and action is not None:
            self._carry, hidden = self.refiltered(self._generator)  # the window's states, newest last
            self._recent_hidden.clear()
            self._recent_hidden.extend(hidden[0])
        else:  # one more step of the filter (an episode's first frame: the window of one frame, the same)
            target = self.model.normalizer.normalize(keypoints.flatten(1))  # (1, F)
            noise = posterior_noise(self._generator, self.model, length=1)[0][:, None].to(device)  # (S, 1, Z)
            with torch.autocast(device.type, enabled=False):
                self._carry, state = posterior_step(self.model, self._carry, padded, target, noise)
            self._recent_hidden.append(state[0])
        return observations_of(self.model, self._carry, self.observe_keypoints)[0]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        frame, info = self.env.reset(seed=seed, options=options)
        rng = self.env.unwrapped.np_random  # the real env's seeded generator: one source of randomness
        self._generator.manual_seed(int(rng.integers(2**63 - 1)))
        self._carry = None
        observation = self._filter(frame, None)
        warmup_return = 0.0
        for _ in range(self.warmup_steps):
            action = rng.uniform(-1.0, 1.0, self.action_space.shape).astype(np.float32)
            if self.warmup_actions == "zero":  # drawn all the same: the filter's draws do not depend on it
                action = np.zeros_like(action)
            frame, reward, terminated, truncated, info = self.env.step(action)
            warmup_return += float(reward)
            observation = self._filter(frame, action)
            if terminated or truncated:
                raise ValueError(f"the real episode ended within the {self.warmup_steps} warm-up steps")
        return observation, {**info, "warmup_return": warmup_return}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._carry is None:
            raise RuntimeError("call reset() before step()")
        checked = check_actions(action, self.action_space.shape, self.models.task)
        frame, reward, terminated, truncated, info = self.env.step(checked)
        return self._filter(frame, checked), float(reward), bool(terminated), bool(truncated), info
