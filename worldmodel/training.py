"""Training of the world model: the stages and the training state, schedules, the optimizer and the training
step, resumable sampling and the keypoint cache of staged training (the run's options and profiles:
``worldmodel.train_config``).

``train/world_model.py`` is the script; this module holds what it is built from, so tests and the
benchmark can use the same pieces.

Schedules (Minderer et al. 2019, supplementary S1.2-S1.3), all expressed as fractions of a stage's steps
so that short runs keep the paper's shape (the paper's 25k / 30k of 1e5 steps):

* KL scale: 0 -> 1 linearly over the first ``kl_warmup_fraction`` (0.25) of the dynamics' steps.
* Scheduled sampling: the probability of feeding the RNN the *model's* keypoints instead of the detected
  ones ramps linearly from 0 to ``sampling_final_observed`` (1.0) on observed steps and
  ``sampling_final_predicted`` (0.5) on predicted steps over the dynamics' steps; the model's Schedule
  takes the complement (teacher forcing).
* Learning rate: ``learning_rate`` halved every ``lr_halving_fraction`` (0.3) of the stage's steps.

Joint training uses the joint steps for all three; staged training restarts them per stage (the vision
stage has no KL or sampling; the dynamics stage starts with a fresh optimizer).

Optimizer: Adam(0.9, 0.999), the L2 penalty ``ModelConfig.conv_weight_decay * model.conv_weight_l2()``
added to the loss (Keras' kernel_regularizer, what the paper used, so it is clipped with the rest),
gradient clipping to global norm 10 (the original code).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from worldmodel import storage
from worldmodel.data import WindowDataset
from worldmodel.keypoint_cache import KeypointSplit, detect_in_chunks
from worldmodel.model import Diagnostics, Losses, Schedule, WorldModel, vision_modules
from worldmodel.precision import Compute, autocast
from worldmodel.train_config import Stage, TrainConfig


# ----------------------------------------------------------------------------------------------
# The training state
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where a run stands: what its checkpoint holds beside the weights, the optimizer and the generators."""

    stage: Stage
    step: int = 0
    """Optimizer steps done in ``stage``."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per stage so far, evaluations and checkpoints included."""
    final_losses: dict[str, dict[str, float]] = field(default_factory=dict)
    """The last logged losses of every stage."""
    last_eval: dict[str, Any] = field(default_factory=dict)
    """The metrics of the latest evaluation."""

    @staticmethod
    def first(config: TrainConfig) -> TrainState:
        """A new run's state: at its first stage, or at the keypoint stage with --vision-from or --init-from."""
        taken = config.vision_from is not None or config.init_from is not None
        stage = Stage.KEYPOINTS if taken else Stage.order(config)[0]
        return TrainState(stage)

    def global_step(self, config: TrainConfig) -> int:
        """Optimizer steps over all stages: the x axis of the logs."""
        return self.stage.offset(config) + self.step

    def advance(self, config: TrainConfig) -> None:
        """On to step 0 of the next stage."""
        self.stage, self.step = self.stage.following(config), 0

    def to_dict(self) -> dict[str, Any]:
        """Plain containers, which ``torch.load(weights_only=True)`` reads back."""
        return {
            "stage": self.stage.value,
            "step": int(self.step),
            "stage_seconds": dict(self.stage_seconds),
            "final_losses": {stage: dict(losses) for stage, losses in self.final_losses.items()},
            "last_eval": dict(self.last_eval),
        }

    @staticmethod
    def from_dict(values: dict[str, Any]) -> TrainState:
        """The inverse of ``to_dict``; bookkeeping a state lacks (written before any stage finished) is empty."""
        return TrainState(
            stage=Stage(values["stage"]),
            step=int(values["step"]),
            stage_seconds=dict(values.get("stage_seconds", {})),
            final_losses={stage: dict(losses) for stage, losses in values.get("final_losses", {}).items()},
            last_eval=dict(values.get("last_eval", {})),
        )

    # The checkpoint file keeps its layout (worldmodel/checkpoint.py, format 1): the stage, step, global step
    # and completeness at the top, where every reader looks, and the rest under "extra", beside the gradient
    # scaler's state. Checkpoints of every earlier version of this trainer load the same way.
    def checkpoint_fields(self, config: TrainConfig, optimizer: StageOptimizer | None) -> dict[str, Any]:
        """The training-state arguments of ``save_checkpoint``: this state and the stage's optimizer (None
        between stages)."""
        values = self.to_dict()
        return {
            "stage": values.pop("stage"),
            "step": values.pop("step"),
            "global_step": self.global_step(config),
            "complete": self.stage is Stage.DONE,
            "optimizer_state": None if optimizer is None else optimizer.optimizer.state_dict(),
            "extra": {**values, "scaler": None if optimizer is None else optimizer.scaler_state()},
        }

    @staticmethod
    def from_checkpoint(checkpoint: dict[str, Any]) -> TrainState:
        return TrainState.from_dict({**checkpoint["extra"], "stage": checkpoint["stage"], "step": checkpoint["step"]})


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------
def ramp(step: int, start: float, end: float) -> float:
    """0 before ``start``, 1 from ``end`` on, linear between (steps as floats)."""
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(1.0, max(0.0, (step - start) / (end - start)))


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """``learning_rate * 0.5 ** (step // halving_interval)``, interval = lr_halving_fraction * total_steps."""
    interval = max(1, round(config.lr_halving_fraction * total_steps))
    return config.learning_rate * 0.5 ** (step // interval)


def kl_scale_at(step: int, total_steps: int, config: TrainConfig) -> float:
    return ramp(step, 0.0, config.kl_warmup_fraction * total_steps)


def teacher_forcing_at(step: int, total_steps: int, config: TrainConfig) -> tuple[float, float]:
    """(observed, predicted) probability of feeding detected keypoints: 1 at step 0, then down linearly to
    1 - sampling_final_* at the last step."""
    progress = ramp(step, 0.0, float(total_steps))
    return (
        1.0 - config.sampling_final_observed * progress,
        1.0 - config.sampling_final_predicted * progress,
    )


def amplitude_mix_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """The Gaussian maps' amplitude mix (ModelConfig's warm-up against keypoint collapse): from
    ``net.initial_amplitude_mix`` to 1 (the paper's mu-scaled maps) over the first ``net.amplitude_warmup``
    of the vision (or joint) steps."""
    initial, warmup = config.net.initial_amplitude_mix, config.net.amplitude_warmup
    if warmup <= 0:
        return initial
    return initial + (1.0 - initial) * ramp(step, 0.0, warmup * total_steps)


def schedule_at(step: int, total_steps: int, config: TrainConfig, stage: Stage) -> Schedule:
    """The model's Schedule at ``step`` of a stage of ``total_steps`` steps.

    The joint stage schedules everything over the joint steps; the vision stage only the amplitude mix
    (no dynamics run); the dynamics stage only the dynamics fields (the amplitude mix stays where the
    vision stage left it, in the model's buffer).
    """
    if stage == Stage.VISION:
        return Schedule(kl_scale=0.0, teacher_forcing_observed=1.0, teacher_forcing_predicted=1.0,
                        amplitude_mix=amplitude_mix_at(step, total_steps, config))  # fmt: skip
    observed, predicted = teacher_forcing_at(step, total_steps, config)
    kl = kl_scale_at(step, total_steps, config)
    mix = amplitude_mix_at(step, total_steps, config) if stage == Stage.JOINT else None
    return Schedule(kl, observed, predicted, amplitude_mix=mix)


# ----------------------------------------------------------------------------------------------
# Parameters, optimizer, precision
# ----------------------------------------------------------------------------------------------
def stage_parameters(model: WorldModel, stage: Stage) -> list[nn.Parameter]:
    """The parameters a stage trains: vision, dynamics, or all (joint)."""
    if stage == Stage.VISION:
        return [p for module in vision_modules(model) for p in module.parameters()]
    if stage == Stage.DYNAMICS:
        return list(model.dynamics.parameters())
    return list(model.parameters())


def freeze_for_stage(model: WorldModel, stage: Stage) -> list[nn.Parameter]:
    """requires_grad only on the stage's parameters (so DDP syncs exactly those); returns them."""
    trained = stage_parameters(model, stage)
    trained_ids = {id(p) for p in trained}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trained_ids)
    return trained


def make_optimizer(
    parameters: Sequence[nn.Parameter], config: TrainConfig, device: torch.device, fused: bool | None = None
) -> torch.optim.Adam:
    """Adam with the paper's betas; the L2 on conv kernels is a loss term (see module docstring).

    ``fused`` (default: on CPU and GPU) updates every parameter in one kernel instead of a few operations per
    parameter tensor: the same update up to float rounding, and fewer small operations in a step
    (``tests/bench/bench_optimizer.py``; docs/PERFORMANCE.md, "Adam")."""
    if fused is None:
        fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(
        list(parameters), lr=config.learning_rate, betas=tuple(config.adam_betas), fused=fused or None
    )


class StageOptimizer(NamedTuple):
    """What updates a stage's parameters: Adam, the gradient scaler (active with fp16 only) and the clipping."""

    optimizer: torch.optim.Adam
    scaler: torch.amp.GradScaler
    parameters: list[nn.Parameter]
    clip_norm: float  # clip the gradient to this global L2 norm; <= 0: no clipping

    @staticmethod
    def for_stage(
        model: WorldModel, stage: Stage, config: TrainConfig, compute: Compute, fused: bool | None = None
    ) -> StageOptimizer:
        """A fresh optimizer for the stage's parameters, which alone keep requires_grad (``fused``: see
        ``make_optimizer``)."""
        parameters = freeze_for_stage(model, stage)
        device = torch.device(compute.device_type)
        scaler = torch.amp.GradScaler(device.type, enabled=compute.precision == "fp16")
        optimizer = make_optimizer(parameters, config, device, fused)
        return StageOptimizer(optimizer, scaler, parameters, config.grad_clip_norm)

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, loss: Tensor) -> Tensor:
        """Backward (after ``zero_grad`` and the forward), unscale, clip, update; returns the global gradient
        norm before clipping."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.clip_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.clip_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters if p.grad is not None])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return grad_norm.detach()

    def scaler_state(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint of this stage (the layout of ``TrainState.checkpoint_fields``)."""
        if checkpoint["optimizer"] is not None:
            # Which Adam kernel runs (fused or not) is this machine's choice (make_optimizer), not training state:
            # a checkpoint restores the moments and step counts, and the kernel stays the one chosen here.
            kernels = [{key: group[key] for key in ("fused", "foreach")} for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            for group, kernel in zip(self.optimizer.param_groups, kernels):
                group.update(kernel)
            if checkpoint["extra"].get("scaler"):
                self.scaler.load_state_dict(checkpoint["extra"]["scaler"])


# ----------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    inputs: Tensor  # frames uint8 (B, L, 64, 64, 3) (joint, vision) or keypoints (B, L, K, 3) (dynamics)
    actions: Tensor  # (B, L, 6); the vision stage ignores them


class Objective(nn.Module):
    """The losses of one stage as a module's forward, so DistributedDataParallel can wrap it.

    forward(inputs, actions, schedule) -> (Losses, Diagnostics | None, penalty): penalty is the conv-kernel
    L2 term (zero in the dynamics stage, which trains no conv). ``num_observed``: the config's
    ``observed_steps(stage)``. ``compiled``: the dynamics stage's unroll through torch.compile
    (``worldmodel.compilation``); the trainer turns it off if the first compiled step fails.
    """

    def __init__(self, model: WorldModel, stage: Stage, num_observed: int, compiled: bool = False) -> None:
        super().__init__()
        self.model, self.stage, self.num_observed = model, stage, num_observed
        self.compiled = compiled and stage == Stage.DYNAMICS

    def forward(self, inputs: Tensor, actions: Tensor, schedule: Schedule) -> tuple[Losses, Diagnostics | None, Tensor]:
        model = self.model
        if self.stage == Stage.DYNAMICS:
            losses = model.dynamics_losses(inputs, actions, self.num_observed, schedule, compiled=self.compiled)
            return losses, None, losses.total.new_zeros(())
        if self.stage == Stage.VISION:
            losses, diagnostics = model.vision_losses(inputs, schedule, self.num_observed)
        else:
            losses, diagnostics = model.joint_losses(inputs, actions, self.num_observed, schedule)
        penalty = model.config.conv_weight_decay * model.conv_weight_l2()
        return losses, diagnostics, penalty


class StepOutput(NamedTuple):
    losses: Losses  # detached scalars
    diagnostics: Diagnostics | None
    grad_norm: Tensor  # global gradient norm before clipping (scalar tensor)
    penalty: Tensor  # the L2 term added to the loss


def train_step(
    objective: nn.Module, optimizer: StageOptimizer, batch: Batch, schedule: Schedule, compute: Compute
) -> StepOutput:
    """One optimizer step: forward under the run's autocast, then ``StageOptimizer.step``. ``objective`` is
    an Objective or a DistributedDataParallel around one."""
    optimizer.zero_grad()
    with compute.autocast(), compute.dynamics_training():
        losses, diagnostics, penalty = objective(batch.inputs, batch.actions, schedule)
    grad_norm = optimizer.step(losses.total.float() + penalty.float())
    detached = Losses(*(term.detach() for term in losses))
    return StepOutput(detached, diagnostics, grad_norm, penalty.detach())


# ----------------------------------------------------------------------------------------------
# Resumable, seeded sampling
# ----------------------------------------------------------------------------------------------
class ResumableBatchSampler:
    """Infinite batches of item indices, a pure function of (seed, step): resuming at a step replays the
    exact stream an uninterrupted run would have drawn.

    The global stream is the concatenation of seeded random permutations of all items (epoch e uses
    seed + e). Step s takes the next ``global_batch`` indices; rank r of W keeps positions
    r*B/W .. (r+1)*B/W of it (so the union over ranks is the single-process batch). Works as a
    DataLoader ``batch_sampler``.
    """

    def __init__(
        self, num_items: int, global_batch: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_items < 1:
            raise ValueError("no training windows: episodes shorter than the window?")
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def batch_at(self, step: int) -> list[int]:
        """This rank's indices of global batch ``step``."""
        per_rank = self.global_batch // self.world_size
        first = step * self.global_batch + self.rank * per_rank
        indices: list[int] = []
        while len(indices) < per_rank:
            epoch, offset = divmod(first + len(indices), self.num_items)
            take = min(per_rank - len(indices), self.num_items - offset)
            indices.extend(int(i) for i in self._permutation(epoch)[offset : offset + take])
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


def seeded_loader(
    dataset: torch.utils.data.Dataset[Any],
    sampler: ResumableBatchSampler,
    num_workers: int,
    seed: int,
    pin_memory: bool,
) -> torch.utils.data.DataLoader[Any]:
    """A DataLoader over a resumable batch sampler. Its own generator keeps it off the global RNG (whose
    state the checkpoint restores), so creating it does not shift the model's random draws."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------------------------
# Keypoint cache (staged training)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def detect_split(
    model: WorldModel,
    root: Path,
    tasks: Sequence[str],
    split: str,
    device: torch.device,
    precision: str,
    chunk_frames: int = 256,
    progress: bool = False,
) -> KeypointSplit:
    """Run the detector over every episode of a split (frames 0..T-1; windows never need frame T), in the
    episode order of ``WindowDataset`` (per task: the main file's episodes, then each part's); ``progress``
    shows a bar of episodes (minutes on the full dataset)."""
    files = {task: storage.checked_dataset_files(root, task, split) for task in tasks}
    total = sum(part.num_episodes for parts in files.values() for part in parts)
    hidden = {} if progress else {"disable": True}  # a shown bar is left to tqdm, so that TQDM_DISABLE=1 still hides it
    bar = tqdm(total=total, desc=f"keypoints ({split})", unit="episode", dynamic_ncols=True, **hidden)
    keypoints, actions, lengths, task_ids = [], [], [], []
    for task in tasks:
        steps = files[task][0].episode_steps  # the parts have the same
        episodes = WindowDataset(root, [task], split, length=steps, stride=steps)  # one window per episode
        for index in range(len(episodes)):
            window = episodes[index]
            frames = window.frames.to(device)
            keypoints.append(detect_in_chunks(model, frames, chunk_frames, lambda: autocast(device, precision)).cpu())
            actions.append(window.actions)
            lengths.append(steps)
            task_ids.append(int(window.task_id))
            bar.update(1)
        episodes.close()
    bar.close()
    return KeypointSplit.from_episodes(keypoints, actions, lengths, task_ids)
