"""Training of the world model: run config and profiles, the stages and the training state, schedules,
the optimizer and the training step, resumable sampling and the keypoint cache of staged training.

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

import dataclasses
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from worldmodel.options import changed_options
from worldmodel import storage
from worldmodel.checkpoint import model_config_from_dict
from worldmodel.config import OBSERVED_STEPS, STATE_VARIANT, Dynamics, ModelConfig, Variant
from worldmodel.data import WindowDataset
from worldmodel.errors import InputError, check_options
from worldmodel.keypoint_cache import KeypointSplit, detect_in_chunks
from worldmodel.model import Diagnostics, Losses, Schedule, WorldModel, vision_modules
from worldmodel.precision import Compute, DynamicsPrecision, Precision, autocast

Profile = Literal["paper", "cpu", "quick", "smoke"]
PROFILES: tuple[Profile, ...] = ("paper", "cpu", "quick", "smoke")
Mode = Literal["joint", "staged"]

RESUME_FREE = {"resume_free": True}
"""Field metadata of the options a --resume may change: they do not change what is computed."""


# ----------------------------------------------------------------------------------------------
# Run configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Train one action-conditional Struct-VRNN on the data of all six DMC tasks.

    A profile (--profile paper|cpu|quick|smoke) supplies the defaults; any option given on the command line
    overrides the profile's value. Model sizes and loss weights are the --net.* options.
    """

    profile: Profile = "paper"
    """Defaults: 'paper' (Table S1 sizes, 1e5 joint steps, for a GPU), 'cpu' (staged training that gives a useful model on 2 CPU cores in under an hour with native bf16, a few hours in fp32), 'quick' (the cpu model with fewer steps: a first look in minutes on any CPU) or 'smoke' (seconds, for tests)."""
    data: Path = field(default=Path("data/dmcs"), metadata=RESUME_FREE)
    """Dataset folder written by collect/dmcs.py (<task>_<split>.h5 files)."""
    out: Path = field(default=Path("runs/world_model"), metadata=RESUME_FREE)
    """Run directory: checkpoint.pt, metrics.jsonl, tensorboard/, keypoint cache, pictures, summary.json."""
    model: Variant = "struct-vrnn"
    """Model variant: struct-vrnn, struct-vrnn-nobom (one sample), struct-rnn (deterministic), cnn-vrnn (unstructured features) or state-vrnn (the state-space bound: the dynamics core on the true states, no pixels; staged mode, no vision stage; --net.num-keypoints and --net.state-dims come from the data). It sets --net.variant, which is not to be given separately."""
    dynamics: Dynamics = "vrnn"
    """Dynamics core: vrnn, srvp (stochastic residual state-space model) or hvrnn (hierarchical VRNN); any variant takes any core (docs/DYNAMICS.md). It sets --net.dynamics, which is not to be given separately."""
    tasks: str = "all"
    """Comma-separated tasks to train on, or 'all' (the six)."""
    seed: int = 1
    """Seed of every random choice: initialisation, window order, latent samples, evaluation windows."""
    device: str = field(default="auto", metadata=RESUME_FREE)
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    precision: Precision = "auto"
    """Autocast dtype of the convs: 'auto' is bf16 where the hardware runs it natively (CPUs with AVX512-BF16/AMX, CUDA GPUs with bf16), else fp32; 'fp16' (CUDA only) uses a gradient scaler. The losses always run in fp32."""
    dynamics_precision: DynamicsPrecision = "auto"
    """Products of the dynamics' training steps: 'auto' is bf16 where the hardware runs it natively and the core's widest products are >= 256 (the cpu VRNN: ~1.9x faster there, same accuracy: docs/PERFORMANCE.md), else fp32. Evaluation, extraction and the envs always run the dynamics in fp32; the KL and losses are fp32 either way. Runs from before this option resume with 'auto'."""
    channels_last: bool = True
    """Keep conv weights and activations in channels_last memory format (faster convs in fp32 and bf16: docs/PERFORMANCE.md)."""
    resume: bool = field(default=False, metadata=RESUME_FREE)
    """Continue the run in --out from its checkpoint (same config required)."""
    mode: Mode = "joint"
    """'joint': detector, reconstructor and dynamics train together, as the paper. 'staged': (1) detector + reconstructor on frames, (2) keypoints detected once for the whole dataset and cached in the run directory, (3) the dynamics on cached keypoints. No gradient crosses from the dynamics to the detector in either mode, so both optimise the same losses."""
    steps: int = 100_000
    """Optimizer steps of joint training (--mode joint)."""
    vision_steps: int = 2_000
    """Optimizer steps of the vision stage (--mode staged)."""
    dynamics_steps: int = 5_000
    """Optimizer steps of the dynamics stage (--mode staged)."""
    batch_size: int = 32
    """Sequences per optimizer step of the joint and dynamics training, over all processes."""
    vision_batch_size: int = 32
    """Sequences per optimizer step of the vision stage, over all processes."""
    vision_window: int = 16
    """Frames per sequence in the vision stage (the separation loss uses the first --num-observed)."""
    vision_frame_stride: int = 1
    """Vision stage: take every this-th frame of a window of (vision_window - 1) * stride + 1 consecutive frames. Frames further from the reference frame (the first) move more, so copying the reference stops paying and the reconstructor must use the keypoints."""
    num_observed: int = OBSERVED_STEPS
    """Observed steps per training window (posterior)."""
    num_predicted: int = 8
    """Predicted steps per training window (prior, open loop)."""
    learning_rate: float = 1e-3
    """Initial Adam learning rate."""
    lr_halving_fraction: float = 0.3
    """The learning rate halves every this fraction of a stage's steps (the paper: every 30k of 1e5)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's beta1, beta2."""
    grad_clip_norm: float = 10.0
    """Clip the gradient to this global L2 norm (the original code's 10); <= 0 disables clipping."""
    kl_warmup_fraction: float = 0.25
    """The KL scale ramps 0 -> 1 over this fraction of the dynamics' steps (the paper: 25k of 1e5)."""
    sampling_final_observed: float = 1.0
    """Final probability of feeding the RNN its own keypoints on observed steps (scheduled sampling)."""
    sampling_final_predicted: float = 0.5
    """Final probability of feeding the RNN its own keypoints on predicted steps."""
    normalize_keypoints: bool = True
    """Staged mode: fit the dynamics' per-feature keypoint normalisation on the cached training keypoints (within-episode statistics, so that the tasks' different keypoint offsets do not dominate). Joint mode never does (the detector moves; the paper has no normalisation)."""
    num_workers: int = field(default=1, metadata=RESUME_FREE)
    """DataLoader worker processes per training process (frames are read and decompressed there)."""
    log_every: int = 10
    """Log losses and collapse diagnostics every this many steps."""
    eval_every: int = 5_000
    """Evaluate on the test split every this many steps of a stage (and always at the end)."""
    eval_windows: int = 64
    """Test windows of the evaluation (fixed by the seed)."""
    eval_samples: int = 10
    """Predictions sampled per test window; the best one is scored (best of N)."""
    eval_batch_size: int = 32
    """Windows per evaluation batch."""
    checkpoint_every: int = 1_000
    """Write the checkpoint every this many steps of a stage (and at every stage's end)."""
    progress: bool = field(default=True, metadata=RESUME_FREE)
    """Show a tqdm progress bar (rank 0)."""
    vision_from: Path | None = None
    """Staged mode: take the detector, appearance net and reconstructor (and the keypoint cache) of this finished run on the same data, skip the vision stage and train only the dynamics: the way to compare dynamics cores on the same keypoints."""
    init_from: Path | None = None
    """Staged mode: start from every weight of this finished run (detector, reconstructor, dynamics core and its keypoint normalisation), skip the vision stage and fine-tune the dynamics for --dynamics-steps on --data, which may be another folder with more episodes of the run's tasks (or of some of them), e.g. parts collected by an agent (downstream/loop.py). The keypoints are detected again; the normalisation stays the run's, which the core's weights were trained with."""
    halt_after: int | None = field(default=None, metadata=RESUME_FREE)
    """Stop after this many optimizer steps in this invocation, writing a checkpoint; continue later with --resume (time-sliced or preemptible jobs). None trains to the end."""
    net: ModelConfig = field(default_factory=ModelConfig)
    """Model hyperparameters (worldmodel.config.ModelConfig)."""

    @property
    def window(self) -> int:
        """Frames per training window of the joint and dynamics training."""
        return self.num_observed + self.num_predicted

    def observed_steps(self, stage: Stage) -> int:
        """The observed (posterior) steps at the start of a stage's windows, what the losses and evaluation
        split on: --num-observed, of at most the vision stage's --vision-window frames there (its separation
        loss reads the first ones)."""
        return min(self.num_observed, self.vision_window) if stage == Stage.VISION else self.num_observed

    @property
    def vision_span(self) -> int:
        """Consecutive frames read per vision-stage sequence (subsampled to vision_window frames)."""
        return (self.vision_window - 1) * self.vision_frame_stride + 1

    @property
    def model_config(self) -> ModelConfig:
        """The network's config with --model and --dynamics applied."""
        return dataclasses.replace(self.net, variant=self.model, dynamics=self.dynamics)


def profile_config(profile: Profile) -> TrainConfig:
    """The defaults of a profile (see the three functions below for their reasons)."""
    factories = {"paper": paper_profile, "cpu": cpu_profile, "quick": quick_profile, "smoke": smoke_profile}
    if profile not in factories:
        raise ValueError(f"unknown profile {profile!r}: choose from {', '.join(PROFILES)}")
    return factories[profile]()


def paper_profile() -> TrainConfig:
    """Minderer et al. 2019, Table S1 (DMCS column) and S1.2: K 64, 32-64-128 filters with 1 extra conv per scale, z 128, GRU 512,
    prior 16, posterior 128, best of 50, beta 3e-3; 1e5 joint steps of batch 32 (8 + 8 steps), as the
    paper trained it (~12 h on a P100). Meant for a GPU. The detector is the ``cpu`` profile's (maps of amplitude
    0.99 + 0.01 mu): with exactly fixed amplitude L_sparse is off and the logits grow until the keypoints
    freeze (docs/DECISIONS.md)."""
    net = ModelConfig.paper(initial_amplitude_mix=0.01, amplitude_warmup=0.0)
    return TrainConfig(profile="paper", mode="joint", steps=100_000, num_workers=4, net=net)


def cpu_profile() -> TrainConfig:
    """A useful model on 2 CPU cores, architecture intact, trained in stages.

    Reduced where a CPU spends its time (the vision stage is nearly all of it): K 32, 16-32-64 filters
    (~4x less conv work), z 32, best of 10; the dynamics at GRU 512 and MLPs 256 (ModelConfig.cpu). Vision
    stage 3,000 steps of 16 sequences x 8 frames, every 4th frame of a 29-step window
    (``vision_frame_stride``: frames further from the reference frame make copying it pay less, so the
    reconstructor uses the keypoints sooner); dynamics stage 24,000 steps of the paper's 32 windows of 8 + 8
    steps on cached keypoints (6,000 -> 12,000 -> 24,000 steps: 0.65x -> 0.60x -> 0.56x hold-last on the
    validation set, docs/DYNAMICS.md; ~13 min with bf16 dynamics, ~45 min in fp32 on 2 cores). The detector: a
    spatial softmax on the logits as they are (scale 1: with x10 it saturated and snapped every keypoint to
    a heatmap cell), with a temporal prior on the keypoints (acceleration weight 10, against jitter and
    jumps; docs/VISION.md, "Keypoints on a grid"), and Gaussian maps of amplitude 0.99 + 0.01 mu for the
    whole run (the small L1 on mu bounds the logits; docs/PERFORMANCE.md says what the alternatives did).
    Everything else (losses and weights, schedule shapes scaled to each stage, Adam, L2, clipping) is the
    paper's.
    """
    return TrainConfig(
        profile="cpu",
        mode="staged",
        vision_steps=3_000,
        dynamics_steps=24_000,
        vision_batch_size=16,
        vision_window=8,
        vision_frame_stride=4,
        eval_every=1_000,
        eval_windows=64,
        eval_samples=10,
        checkpoint_every=250,
        net=ModelConfig.cpu(heatmap="softmax", heatmap_logit_scale=1.0, acceleration_weight=10.0,
                            initial_amplitude_mix=0.01, amplitude_warmup=0.0),
    )


def quick_profile() -> TrainConfig:
    """A first look in minutes on any 2-core CPU, also one without native bf16 (fp32): the ``cpu`` profile's
    detector and losses; the vision stage 450 steps of 8 sequences (a thirteenth of the cpu profile's frames),
    the dynamics 1,500 steps at the smaller sizes the ``cpu`` profile had before (GRU 256, MLPs 128, prior
    16: 2x faster; trained on the full data, 0.70x hold-last on a validation set against the cpu sizes'
    0.64x), one evaluation per stage (its time: docs/PERFORMANCE.md). Enough to see the pipeline end to end; train ``cpu`` (or ``paper`` on a GPU) for
    results."""
    cpu = cpu_profile()
    net = dataclasses.replace(cpu.net, rnn_size=256, decoder_units=128, posterior_units=128, prior_units=16)
    return dataclasses.replace(
        cpu, profile="quick", net=net, vision_steps=450, vision_batch_size=8, dynamics_steps=1_500,
        eval_every=100_000, eval_windows=32, checkpoint_every=200,
    )  # fmt: skip


def smoke_profile() -> TrainConfig:
    """Seconds, for tests: the tiny ModelConfig.smoke network, staged, a handful of steps of small batches."""
    return TrainConfig(
        profile="smoke", mode="staged", net=ModelConfig.smoke(), progress=False, num_workers=0,
        steps=6, vision_steps=6, dynamics_steps=6, log_every=2, checkpoint_every=4,
        batch_size=4, vision_batch_size=4, vision_window=4,
        eval_every=4, eval_windows=4, eval_samples=3, eval_batch_size=4,
    )  # fmt: skip


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain-dict form of a TrainConfig (paths as strings, tuples as lists): JSON- and weights_only-safe."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """The inverse of ``config_to_dict``: a run's TrainConfig from the plain form in its checkpoint (or
    config.json). Options the run predates take their defaults; unknown ones are an InputError (another version)."""
    options = {option.name: option for option in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise InputError(f"a run config with options this code does not know ({', '.join(unknown)}): it was written "
                         "by another version of this package")  # fmt: skip
    converted: dict[str, Any] = {}
    for name, value in values.items():
        if name == "net":
            converted[name] = model_config_from_dict(value)
        elif value is not None and "Path" in str(options[name].type):
            converted[name] = Path(value)
        elif isinstance(value, list):  # tuples become lists in plain form
            converted[name] = tuple(value)
        else:
            converted[name] = value
    return TrainConfig(**converted)


def config_differences(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Names of the options whose values differ from a checkpoint's, ignoring the RESUME_FREE ones. Options a
    checkpoint predates (added later, with defaults that keep the old behaviour) count as their defaults."""
    defaults = config_to_dict(TrainConfig())
    saved = {**saved, "net": {**defaults["net"], **saved.get("net", {})}}  # the same rule inside the nested net
    resume_free = {option.name for option in dataclasses.fields(TrainConfig) if option.metadata == RESUME_FREE}
    return changed_options(saved, config_to_dict(current), defaults, resume_free)


def validate(config: TrainConfig) -> None:
    """Raise InputError with a one-line reason for a config that cannot run."""
    positive = (
        "steps", "vision_steps", "dynamics_steps", "batch_size", "vision_batch_size", "vision_window", "vision_frame_stride",
        "num_observed", "num_predicted", "log_every", "eval_every", "eval_windows", "eval_samples",
        "eval_batch_size", "checkpoint_every",
    )  # fmt: skip
    check_options(config, 1, *positive)
    if config.learning_rate <= 0:
        raise InputError(f"--learning-rate must be positive, got {config.learning_rate}")
    check_options(config, 0, "seed")
    if not all(0.0 <= beta < 1.0 for beta in config.adam_betas):
        raise InputError(f"--adam-betas must be in [0, 1), got {config.adam_betas}")
    if config.halt_after is not None and config.halt_after < 1:
        raise InputError(f"--halt-after must be positive, got {config.halt_after}")
    if config.num_workers < 0:
        raise InputError(f"--num-workers must be >= 0, got {config.num_workers}")
    if not 0.0 < config.lr_halving_fraction:
        raise InputError("--lr-halving-fraction must be positive")
    for name in ("kl_warmup_fraction", "sampling_final_observed", "sampling_final_predicted"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise InputError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(config, name)}")
    if config.net.variant != config.model and config.net.variant != ModelConfig().variant:
        raise InputError(f"give the variant with --model, not --net.variant ({config.net.variant})")
    if config.net.dynamics != config.dynamics and config.net.dynamics != ModelConfig().dynamics:
        raise InputError(f"give the dynamics core with --dynamics, not --net.dynamics ({config.net.dynamics})")
    if config.dynamics == "srvp" and config.net.srvp_init_frames > config.num_observed:
        raise InputError(
            f"--net.srvp-init-frames ({config.net.srvp_init_frames}) must not exceed --num-observed ({config.num_observed})"
        )
    if config.vision_from is not None and config.mode != "staged":
        raise InputError("--vision-from needs --mode staged (the dynamics train on the cached keypoints)")
    if config.model == STATE_VARIANT and config.mode != "staged":
        raise InputError("--model state-vrnn trains only a dynamics core, on the stored states: it needs --mode staged")
    if config.model == STATE_VARIANT and config.vision_from is not None:
        raise InputError("--model state-vrnn has no vision networks to take: leave out --vision-from")
    if config.init_from is not None and config.mode != "staged":
        raise InputError("--init-from needs --mode staged (the dynamics are fine-tuned on the cached keypoints)")
    if config.init_from is not None and config.vision_from is not None:
        raise InputError("--init-from already takes the vision networks: leave out --vision-from")
    _ = config.model_config  # runs ModelConfig's own checks with the variant applied


# ----------------------------------------------------------------------------------------------
# Stages and the training state
# ----------------------------------------------------------------------------------------------
class Stage(enum.StrEnum):
    """A part of a run. Joint mode (the paper) has one stage that trains everything together. Staged mode
    trains (1) the detector and reconstructor on frames, (2) detects the keypoints of the whole dataset once
    and caches them (no optimizer steps), (3) the dynamics on the cached keypoints. No gradient crosses
    from the dynamics to the detector in either mode, so both optimise the same losses. DONE: finished."""

    JOINT = "joint"
    VISION = "vision"
    KEYPOINTS = "keypoints"
    DYNAMICS = "dynamics"
    DONE = "done"

    @staticmethod
    def order(config: TrainConfig) -> tuple[Stage, ...]:
        """The stages of the run's mode, in the order they run."""
        if config.model == STATE_VARIANT:  # the state-space bound: the stored states are its keypoints
            return (Stage.KEYPOINTS, Stage.DYNAMICS, Stage.DONE)
        if config.mode == "staged":
            return (Stage.VISION, Stage.KEYPOINTS, Stage.DYNAMICS, Stage.DONE)
        return (Stage.JOINT, Stage.DONE)

    def steps(self, config: TrainConfig) -> int:
        """Optimizer steps of this stage (none for the keypoint detection and the end)."""
        return {Stage.JOINT: config.steps, Stage.VISION: config.vision_steps, Stage.DYNAMICS: config.dynamics_steps}.get(self, 0)  # fmt: skip

    def offset(self, config: TrainConfig) -> int:
        """Optimizer steps of the stages before this one: a stage's step s is global step offset + s."""
        order = Stage.order(config)
        return sum(stage.steps(config) for stage in order[: order.index(self)])

    def following(self, config: TrainConfig) -> Stage:
        order = Stage.order(config)
        return order[order.index(self) + 1]


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


def make_optimizer(parameters: Sequence[nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam with the paper's betas; the L2 on conv kernels is a loss term (see module docstring)."""
    fused = device.type == "cuda"  # one kernel for all parameters on GPU
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
    def for_stage(model: WorldModel, stage: Stage, config: TrainConfig, compute: Compute) -> StageOptimizer:
        """A fresh optimizer for the stage's parameters, which alone keep requires_grad."""
        parameters = freeze_for_stage(model, stage)
        device = torch.device(compute.device_type)
        scaler = torch.amp.GradScaler(device.type, enabled=compute.precision == "fp16")
        return StageOptimizer(make_optimizer(parameters, config, device), scaler, parameters, config.grad_clip_norm)

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
            self.optimizer.load_state_dict(checkpoint["optimizer"])
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
    ``observed_steps(stage)``.
    """

    def __init__(self, model: WorldModel, stage: Stage, num_observed: int) -> None:
        super().__init__()
        self.model, self.stage, self.num_observed = model, stage, num_observed

    def forward(self, inputs: Tensor, actions: Tensor, schedule: Schedule) -> tuple[Losses, Diagnostics | None, Tensor]:
        model = self.model
        if self.stage == Stage.DYNAMICS:
            losses = model.dynamics_losses(inputs, actions, self.num_observed, schedule)
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
    bar = tqdm(total=total, desc=f"keypoints ({split})", unit="episode", disable=not progress, dynamic_ncols=True)
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
