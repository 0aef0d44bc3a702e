"""The training run's configuration: every option of ``train/world_model.py`` (``TrainConfig``, its docstrings
are the ``--help``), the profiles that supply their defaults (paper, cpu, quick, smoke), their JSON form in
checkpoints, and the checks that refuse a config that cannot run.

The schedules these options shape and the training step are in ``worldmodel.training``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from worldmodel.checkpoint import model_config_from_dict
from worldmodel.config import OBSERVED_STEPS, STATE_VARIANT, Dynamics, ModelConfig, Variant
from worldmodel.errors import InputError, check_options
from worldmodel.options import changed_options
from worldmodel.compilation import CompileChoice
from worldmodel.precision import DynamicsPrecision, Precision

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
    compile_dynamics: CompileChoice = field(default="auto", metadata=RESUME_FREE)
    """Run the dynamics stage's unroll through torch.compile: 'auto' where it pays (a CPU with a C++ compiler, fp32 dynamics, a stage of >= 5,000 steps: 1.1-1.5x steps/s after a compile of about a minute; docs/PERFORMANCE.md, "Compiled dynamics"), 'on' or 'off'. The same figures to float rounding; the decision is printed and stored in summary.json."""
    keep_freed_memory: bool = field(default=True, metadata=RESUME_FREE)
    """Keep freed memory in the process (glibc malloc: no mmap per large tensor, no trimming), so that the steps stop page-faulting their tensors in anew: the fp32 vision stage 1.2x (AVX2 kernels) to 1.4x (AVX-512) faster on 2 cores, bf16 1.15-1.3x; the process then holds its peak memory (5-15% above the default's) for the whole run (docs/PERFORMANCE.md, "Freed memory kept in the process"). No effect on other C libraries; printed and stored in summary.json."""
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
# The stages a config runs
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
