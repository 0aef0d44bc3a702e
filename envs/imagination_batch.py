"""N imagined episodes of one task as one tensor batch (``ImaginationBatch``): what every imagined env runs.

The single env (``envs.imagined.ImaginedEnv``) is a batch of one, ``envs.imagined_vector.ImaginedVectorEnv``
and ``envs.sb3.ImaginedSB3VecEnv`` run many sub-envs as one batch. Every random draw of a sub-env comes from
its own ``np_random`` (context choice and a seed for its own ``torch.Generator``), so a batch gives exactly
what its sub-envs give one by one. What a step computes: docs/DESIGN.md section 5.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from envs.context import ContextSource, context_source, filter_context, posterior_noise
from envs.imagination_models import ImaginationModels, load_imagination_models
from worldmodel.devices import cpu_threads
from worldmodel.dynamics_core import CoreCarry, DynamicsCore
from worldmodel.errors import InputError
from worldmodel.model import WorldModel, inference_autocast
from worldmodel.tasks import CONTROL_STEPS_PER_EPISODE, get_task, pad_actions

NOISE_BLOCK = 64  # prior draws fetched per sub-env at a time: one Python call per sub-env every 64 steps
RENDER_MODES = ("rgb_array",)


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
