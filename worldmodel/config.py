"""Configuration of the world model (Minderer et al. 2019, section 3, S1.1 and Table S1).

Every size and loss weight is a field, so that the trainer's profiles (``paper``, ``cpu``, ``smoke``) are
nothing but ``ModelConfig`` instances. The field defaults are the ``paper`` profile: Table S1's DMCS column
plus the architecture of S1.1, with one change to the detector that keeps keypoints from collapsing on
these videos: spatial softmax heatmaps (logits x 10) and Gaussian maps of fixed amplitude, with the L1
sparsity penalty weighted by the amplitude mix (off while mu is not drawn). ``ModelConfig.paper_exact()`` is
the paper's own detector; docs/VISION.md tells what collapsed with it and why this one is the default.

Profiles: ``paper`` = the field defaults; ``cpu`` = reduced sizes (K 32, 16 base filters, z 32, best of 10;
the paper's GRU of 512, with MLPs of 256 and a prior of 64) and the dynamics training of docs/DYNAMICS.md's
diagnosis; ``smoke`` = tiny, for tests; ``paper_exact`` = the paper's detector, for comparison.
The trainer's ``cpu`` profile also sets the logit scale to 1 and a temporal prior on the keypoints
(``acceleration_weight`` 10): at x10 the softmax saturates and every keypoint snaps to a heatmap cell
(docs/VISION.md, "Keypoints on a grid"); the field defaults keep x10 until that is measured at the paper's sizes.
The variants and the training profiles side by side: docs/DESIGN.md section 6; every deviation from the paper
and its evidence: docs/DESIGN.md section 3.8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from worldmodel.tasks import IMAGE_SIZE, MAX_ACTION_DIM, TASK_NAMES

OBSERVED_STEPS = 8
"""Frames observed through the posterior before the open-loop prediction: the training windows (8 observed + 8
predicted, S1.2), the reward experiment's windows (8 of 20, the paper's Figure 8), the imagination envs' context."""
WARMUP_ACTIONS = ("random", "zero")  # what a real episode acts while the filter fills (envs.through_model)

Variant = Literal["struct-vrnn", "struct-vrnn-nobom", "struct-rnn", "cnn-vrnn", "state-vrnn"]
VARIANTS: tuple[Variant, ...] = ("struct-vrnn", "struct-vrnn-nobom", "struct-rnn", "cnn-vrnn")  # world models on frames
STATE_VARIANT: Variant = "state-vrnn"  # the state-space bound: a dynamics core on the true states (docs/DYNAMICS.md)
Heatmap = Literal["softplus", "softmax"]
Dynamics = Literal["vrnn", "srvp", "hvrnn"]
DYNAMICS: tuple[Dynamics, ...] = ("vrnn", "srvp", "hvrnn")


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the Struct-VRNN world model and its baselines; defaults = ``paper`` profile."""

    variant: Variant = "struct-vrnn"
    """``struct-vrnn`` (the model), ``struct-vrnn-nobom`` (1 sample, no best of many), ``struct-rnn`` (deterministic: no latent z, no KL), ``cnn-vrnn`` (same dynamics on an unstructured CNN feature vector of size ``num_keypoints * 3``; no keypoints, no separation or sparsity loss) or ``state-vrnn`` (the state-space bound: no pixels at all, the dynamics read each frame's true low-dimensional state, zero-padded to ``num_keypoints * 3``; see ``state_dims``)."""

    # ---- images and actions -------------------------------------------------------------------------
    image_size: int = IMAGE_SIZE
    """Height = width of the frames (64)."""
    action_dim: int = MAX_ACTION_DIM
    """Size of the (zero-padded) action vector fed to the RNN."""

    # ---- keypoint detector, appearance net, reconstructor (S1.1.1) ---------------------------------
    num_keypoints: int = 64
    """K, the number of keypoints (Table S1: 64 for DMCS). For ``cnn-vrnn`` the feature vector has K*3 units."""
    base_filters: int = 32
    """Filters of the first conv at full resolution; doubled per halving (32 -> 64 -> 128 at 16x16)."""
    layers_per_scale: int = 1
    """Extra size-preserving 3x3 convs at every resolution of the encoders, and convs per scale of the reconstructor (DMCS: 1, S1.1.1)."""
    heatmap_size: int = 16
    """Width of the keypoint heatmaps; image_size / heatmap_size must be a power of two."""
    heatmap: Heatmap = "softmax"
    """How the detection weights D_k (S1) are made from the detector's last 1x1 conv (the logits): with 'softmax', D_k = spatial softmax(scale * logits) (default: what avoided collapse, docs/VISION.md); with 'softplus', D_k = R_k / sum R_k with R_k = softplus(scale * logits), the paper. In both cases the presence mu_k = mean softplus(logits) (S3)."""
    heatmap_logit_scale: float = 10.0
    """``scale`` above: multiplies the logits before they become D_k (default 10, the prototype's; paper 1; the ``cpu`` training profile 1, since at 10 the softmax saturates and keypoints snap to heatmap cells: docs/VISION.md)."""
    initial_amplitude_mix: float = 0.0
    """Amplitude of the Gaussian maps (S4) at the start of training: ``mix * mu_k + (1 - mix) * 1``; 1 is the paper (maps scaled by mu), 0 fixed amplitude. The model keeps the current mix in a buffer (saved in checkpoints) that starts here and follows ``Schedule.amplitude_mix`` when the trainer sets it. L_sparse is weighted by the mix too."""
    amplitude_warmup: float = 0.0
    """Fraction of training over which the trainer (``training.schedule_at``) ramps the amplitude mix linearly from ``initial_amplitude_mix`` to 1 (the paper's maps); 0 keeps the initial mix for the whole run."""
    keypoint_sigma: float = 1.5
    """sigma_k.p. of the Gaussian maps (S4), in pixels of the heatmap (Table S1: 1.5)."""

    # ---- dynamics (S1.1.2; other cores: docs/DYNAMICS.md) -----------------------------------------------
    dynamics: Dynamics = "vrnn"
    """Dynamics core on the keypoints and actions: 'vrnn' (the paper's VRNN), 'srvp' (stochastic residual state-space model of Franceschi et al. 2020) or 'hvrnn' (hierarchical VRNN with ``hvrnn_levels`` levels of latents, Castrejon et al. 2019). Independent of the variant."""
    latent_size: int = 128
    """Size of the latent z (Table S1 DMCS: 128). Unused by ``struct-rnn``."""
    rnn_size: int = 512
    """GRU units (Table S1: 512)."""
    prior_units: int = 16
    """Hidden units of the prior net (Table S1 DMCS: 16)."""
    posterior_units: int = 128
    """Hidden units of the posterior (encoder) net (Table S1: 128)."""
    decoder_units: int = 128
    """Hidden units of the keypoint decoder (S1.1.2: 128)."""
    num_samples: int = 50
    """Samples of z for the best-of-many objective (eq. 8; Table S1: 50). ``struct-vrnn-nobom`` uses 1."""
    srvp_state_size: int = 64
    """srvp: size of the deterministic state y (the hidden state it exposes)."""
    srvp_units: int = 128
    """srvp: hidden units of its MLPs (keypoint encoder, initial-state net, prior, posterior, residual f, decoder) and of the posterior filter's GRU."""
    srvp_init_frames: int = 3
    """srvp: k, the number of first observed frames y_1 is inferred from (must not exceed the observed steps)."""
    srvp_dt: float = 1.0
    """srvp: Euler step of the residual update y <- y + dt f(y, z, a), applied 1/dt times per frame (1/dt must be an integer)."""
    srvp_residual_weight: float = 1.0
    """srvp: lambda, the weight of the L2 penalty on the residuals f (mean over steps of the squared norm)."""
    residual_keypoints: bool = False
    """vrnn, hvrnn: the decoder predicts the change from the keypoints fed in for the previous frame (x^_t = x_{t-1} + phi_dec(z_t, h_t)) instead of absolute keypoints, so that "nothing moves" is the easy default (srvp is residual in its state already)."""
    hvrnn_levels: int = 3
    """hvrnn: L, the number of latent levels (each of ``latent_size``)."""
    feed_detected: bool = False
    """vrnn, hvrnn: on observed frames the recurrence reads the detected keypoints x_t (as SRVP's filter and Dreamer's RSSM do) instead of the keypoints decoded from the posterior sample (the paper). The decoded ones carry the posterior's reconstruction error into every later step; a deterministic ``struct-rnn`` sees no observation at all without this (its "posterior" is the prediction)."""
    prior_future_gradient: bool = False
    """vrnn, hvrnn: let L_future's gradient reach the prior on imagined frames (reparameterised prior samples), so that the prior learns a spread that costs no open-loop error. Off (the paper's code): the prior is trained by the KL only and its spread is free to make single samples worse than the mean."""
    future_best_of: bool = True
    """vrnn, hvrnn: best of many (``num_samples``) also on the imagined frames of training, as the paper. Off: one prior sample there, so L_future scores what a single sample predicts (best of many still applies on observed frames)."""
    keypoint_error: Literal["squared", "absolute"] = "squared"
    """Error of the dynamics' keypoint reconstruction (L_VRNN, L_future) and of the best-of-many choice, in the normalised space: 'squared' (a Gaussian decoder, the paper) or 'absolute' (a Laplace decoder, robust to the detector's occasional jumps of a keypoint between two places)."""
    state_dims: tuple[int, ...] = ()
    """state-vrnn (ignored otherwise), set by the trainer from the dataset: the size D of each task's true state, in ``worldmodel.tasks.TASK_NAMES`` order (0 for a task it was not trained on). The states are zero-padded to the largest D, rounded up to whole (K, 3) triples: ``num_keypoints = ceil(max D / 3)``. Hidden-state extraction refuses data whose states differ."""
    keypoint_std_floor: float = 0.05
    """Floor of the per-feature std used to normalise the dynamics' inputs and targets (``WorldModel.fit_keypoint_normalization``), in keypoint units ([-1, 1] coordinates)."""

    # ---- loss weights (section 4, Table S1) -----------------------------------------------------------
    sparsity_weight: float = 5.0
    """lambda_sparse (Table S1 DMCS: 5), on the mean over keypoints of |mu|."""
    separation_weight: float = 0.1
    """lambda_sep (Table S1 DMCS: 0.1)."""
    separation_sigma: float = 0.02
    """sigma_sep of eq. 5 (Table S1 DMCS: 0.02), in [-1, 1] coordinate units."""
    acceleration_weight: float = 0.0
    """Weight of a temporal prior on the detected keypoints (``losses.acceleration_loss``, their squared acceleration over the vision stage's frames); 0: the paper's detector, which sees each frame alone."""
    relative_image_loss: bool = False
    """Weight each sequence's L_image by the inverse of its copy-the-first-frame error (the squared change of its frames from v_1; ``losses.relative_image_weights``), normalised to mean 1 over the batch, so that a task whose bodies change few pixels (cartpole's thin pole) counts as much as the walkers; off: the paper's L_image, where a sequence counts by the pixels it changes."""
    reconstructed_frames: int = 0
    """How many frames of each vision sequence L_image reconstructs (0: all, the paper): spread evenly back from the last frame (``model.reconstructed_frame_indices``; 4 of 8 -> frames 1, 3, 5, 7). The reconstructor is most of a vision step's cost on a CPU; the detector still sees every frame, through the separation and temporal losses and the reference frame. Faster per step, at a cost in reconstruction and in the reward information of the hidden states: measured in docs/PERFORMANCE.md, "Fewer reconstructed frames"."""
    kl_weight: float = 3e-3
    """beta, the weight of KL(posterior || prior) (Table S1 DMCS: 3e-3); the trainer anneals ``Schedule.kl_scale`` from 0 to 1 on top of it."""
    conv_weight_decay: float = 1e-4
    """L2 weight on the conv kernels (S1.2); the trainer adds ``conv_weight_decay * model.conv_weight_l2()``."""

    def __post_init__(self) -> None:
        if self.variant not in (*VARIANTS, STATE_VARIANT):
            raise ValueError(f"unknown variant {self.variant!r}: choose from {', '.join((*VARIANTS, STATE_VARIANT))}")
        if self.reads_states:
            if len(self.state_dims) != len(TASK_NAMES) or self.state_size < 1 or min(self.state_dims) < 0:
                raise ValueError(
                    f"state-vrnn needs state_dims, one state size per task ({', '.join(TASK_NAMES)}); "
                    "train/world_model.py sets them from the dataset"
                )
            if self.num_keypoints != math.ceil(self.state_size / 3):
                raise ValueError(
                    f"state-vrnn: num_keypoints must be ceil(largest state size / 3) = "
                    f"{math.ceil(self.state_size / 3)}, got {self.num_keypoints}"
                )
        if self.heatmap not in ("softplus", "softmax"):
            raise ValueError(f"heatmap must be 'softplus' or 'softmax', got {self.heatmap!r}")
        ratio = self.image_size / self.heatmap_size
        if ratio < 1 or not float(math.log2(ratio)).is_integer():
            raise ValueError(
                f"image_size / heatmap_size must be a power of two, got {self.image_size}/{self.heatmap_size}"
            )
        if self.num_keypoints < 2:
            raise ValueError("num_keypoints must be >= 2 (the separation loss divides by K(K-1))")
        if not 0.0 <= self.initial_amplitude_mix <= 1.0:
            raise ValueError("initial_amplitude_mix must be in [0, 1]")
        if not 0.0 <= self.amplitude_warmup <= 1.0:
            raise ValueError("amplitude_warmup must be in [0, 1]")
        if self.reconstructed_frames < 0:
            raise ValueError(f"reconstructed_frames must be >= 0 (0: every frame), got {self.reconstructed_frames}")
        for name in ("base_filters", "rnn_size", "prior_units", "posterior_units", "decoder_units", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.stochastic and self.latent_size < 1:
            raise ValueError("latent_size must be >= 1 for stochastic variants")
        if self.dynamics not in DYNAMICS:
            raise ValueError(f"unknown dynamics {self.dynamics!r}: choose from {', '.join(DYNAMICS)}")
        for name in ("srvp_state_size", "srvp_units", "srvp_init_frames", "hvrnn_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        substeps = 1.0 / self.srvp_dt if self.srvp_dt > 0 else 0.0
        if not (0.0 < self.srvp_dt <= 1.0 and abs(substeps - round(substeps)) < 1e-6):
            raise ValueError(f"srvp_dt must be 1/n for an integer n >= 1, got {self.srvp_dt}")
        if self.srvp_residual_weight < 0:
            raise ValueError("srvp_residual_weight must be >= 0")
        if self.keypoint_error not in ("squared", "absolute"):
            raise ValueError(f"keypoint_error must be 'squared' or 'absolute', got {self.keypoint_error!r}")
        if self.dynamics == "hvrnn" and not self.stochastic:
            raise ValueError("hvrnn is a hierarchy of latents: it needs a stochastic variant (not struct-rnn)")

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def structured(self) -> bool:
        """True for the keypoint models (and the state-space bound), False for the unstructured ``cnn-vrnn`` baseline."""
        return self.variant != "cnn-vrnn"

    @property
    def reads_states(self) -> bool:
        """True for ``state-vrnn``: no vision networks, the dynamics read the stored true states, never a frame."""
        return self.variant == STATE_VARIANT

    @property
    def state_size(self) -> int:
        """state-vrnn: the largest task state size D (the states are zero-padded to it, then to 3 * K); else 0."""
        return max(self.state_dims, default=0)

    @property
    def stochastic(self) -> bool:
        """False for ``struct-rnn`` (no latent, no KL)."""
        return self.variant != "struct-rnn"

    @property
    def best_of(self) -> int:
        """Samples drawn per step for best of many in training (1 for nobom and the deterministic RNN)."""
        return self.num_samples if self.variant in ("struct-vrnn", "cnn-vrnn", STATE_VARIANT) else 1

    @property
    def latent_dim(self) -> int:
        """Size of one level of z (0 for ``struct-rnn``, which has no latent)."""
        return self.latent_size if self.stochastic else 0

    @property
    def feature_size(self) -> int:
        """Size of the flattened keypoint vector x_t the dynamics work on: K * 3."""
        return self.num_keypoints * 3

    @property
    def dynamics_width(self) -> int:
        """Width of the dynamics' largest matrix products: the GRU state (vrnn, hvrnn) or the MLPs' units
        (srvp). bf16 speeds the dynamics' training up only where these are wide (worldmodel/precision.py)."""
        return self.srvp_units if self.dynamics == "srvp" else self.rnn_size

    @property
    def num_scales(self) -> int:
        """Number of halvings from the image to the heatmap (2 for 64 -> 16)."""
        return int(round(math.log2(self.image_size // self.heatmap_size)))

    @property
    def feature_channels(self) -> int:
        """Channels of the encoders' output at heatmap resolution (128 for the paper)."""
        return self.base_filters * 2**self.num_scales

    # ---- recommended profiles --------------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides: object) -> ModelConfig:
        """Table S1 (DMCS) sizes and weights with the softmax x10 / fixed-amplitude detector: the defaults."""
        return cls(**overrides)  # type: ignore[arg-type]

    @classmethod
    def paper_exact(cls, **overrides: object) -> ModelConfig:
        """The paper's own detector: softplus heatmaps (S1), maps scaled by mu (S4), sparsity from step 0."""
        base = cls(heatmap="softplus", heatmap_logit_scale=1.0, initial_amplitude_mix=1.0)
        return replace(base, **overrides)  # type: ignore[arg-type]

    @classmethod
    def cpu(cls, **overrides: object) -> ModelConfig:
        """Reduced sizes for 2 CPU cores, the same detector as ``paper``, and the dynamics training that the
        diagnosis found to predict best (docs/DYNAMICS.md, "Diagnosis"): the detected keypoints fed on
        observed frames, the prior trained by L_future with one sample on imagined frames, and a Laplace
        (absolute) keypoint error. The dynamics are sized up from the paper's (GRU 512 as Table S1, MLPs 256,
        prior 64): on the validation set they predict better with each step up (docs/DYNAMICS.md, "Cores and capacity on the new keypoints"),
        and they train on cached keypoints, where a CPU has time to spare."""
        base = cls(num_keypoints=32, base_filters=16, latent_size=32, rnn_size=512, num_samples=10,
                   prior_units=64, posterior_units=256, decoder_units=256,
                   feed_detected=True, prior_future_gradient=True, future_best_of=False, keypoint_error="absolute")
        return replace(base, **overrides)  # type: ignore[arg-type]

    @classmethod
    def smoke(cls, **overrides: object) -> ModelConfig:
        """Tiny model for tests (a fraction of a second per step)."""
        base = cls.cpu(num_keypoints=8, base_filters=4, latent_size=8, rnn_size=32, prior_units=8,
                       posterior_units=32, decoder_units=32, num_samples=4)
        return replace(base, **overrides)  # type: ignore[arg-type]
