"""Configuration of the world model (SPEC section 3, Table S1 of Minderer et al. 2019).

Every size and loss weight is a field, so that the trainer's profiles (``paper``, ``cpu``, ``smoke``) are
nothing but ``ModelConfig`` instances. The field defaults are the ``paper`` profile: Table S1's DMCS column
plus the architecture of S1.1. ``ModelConfig.paper()``, ``ModelConfig.cpu()`` and ``ModelConfig.smoke()``
return the configurations recommended here for the three profiles (the trainer may override any field).

Keypoint collapse (SPEC section 8) and the choices made against it, per profile:

- ``paper``: the paper's detector, exactly: softplus heatmaps (S1-S3), Gaussian maps scaled by mu (S4), the
  sparsity penalty from the first step. The losses use the original code's normalisations (image and
  keypoint losses are ``0.5 * sum of squares`` per frame, the sparsity penalty is the mean of |mu| over
  keypoints), the ones Table S1's weights were tuned with; with the paper's sum over keypoints the L1
  term (5 * 64 * mu) swamps the image loss and mu collapses within a few dozen steps. Without the
  original code's division of mu by its max over keypoints (which left one keypoint active, SPEC 8).
- ``cpu`` (and ``smoke``): spatial softmax on the logits times 10 for the positions (D_k, S1-S2), the
  fix that worked in the prototype, with fixed amplitude (every Gaussian map drawn with amplitude 1,
  ``initial_amplitude_mix = 0``) so that the L1 penalty on mu cannot switch keypoints off before the
  reconstructor has learned to use them. The trainer may ramp ``Schedule.amplitude_mix`` to 1 later in
  training to hand presence back to mu; if it never does, the keypoints simply stay always-on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from worldmodel.tasks import IMAGE_SIZE, MAX_ACTION_DIM

Variant = Literal["struct-vrnn", "struct-vrnn-nobom", "struct-rnn", "cnn-vrnn"]
VARIANTS: tuple[Variant, ...] = ("struct-vrnn", "struct-vrnn-nobom", "struct-rnn", "cnn-vrnn")
Heatmap = Literal["softplus", "softmax"]


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the Struct-VRNN world model and its baselines; defaults = ``paper`` profile."""

    variant: Variant = "struct-vrnn"
    """``struct-vrnn`` (the model), ``struct-vrnn-nobom`` (1 sample, no best of many), ``struct-rnn``
    (deterministic: no latent z, no KL) or ``cnn-vrnn`` (same dynamics on an unstructured CNN feature
    vector of size ``num_keypoints * 3``; no keypoints, no separation or sparsity loss)."""

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
    """Extra size-preserving 3x3 convs at every resolution of the encoders, and convs per scale of the
    reconstructor (DMCS: 1, S1.1.1)."""
    heatmap_size: int = 16
    """Width of the keypoint heatmaps; image_size / heatmap_size must be a power of two."""
    heatmap: Heatmap = "softplus"
    """How the detection weights D_k (S1) are made from the detector's last 1x1 conv (the logits):
    ``softplus``: D_k = R_k / sum R_k with R_k = softplus(scale * logits), as the paper;
    ``softmax``: D_k = spatial softmax(scale * logits) (SPEC 8: what avoided collapse). In both cases the
    presence mu_k = mean softplus(logits) (S3)."""
    heatmap_logit_scale: float = 1.0
    """``scale`` above: multiplies the logits before they become D_k (the prototype's x10 for softmax)."""
    initial_amplitude_mix: float = 1.0
    """Amplitude of the Gaussian maps (S4): ``mix * mu_k + (1 - mix) * 1``. 1 is the paper (maps scaled
    by mu), 0 is fixed amplitude. The model keeps the current mix in a buffer (saved in checkpoints) that
    starts here and follows ``Schedule.amplitude_mix`` when the trainer sets it."""
    keypoint_sigma: float = 1.5
    """sigma_k.p. of the Gaussian maps (S4), in pixels of the heatmap (Table S1: 1.5)."""

    # ---- dynamics (S1.1.2) -----------------------------------------------------------------------------
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
    keypoint_std_floor: float = 0.05
    """Floor of the per-feature std used to normalise the dynamics' inputs and targets
    (``WorldModel.fit_keypoint_normalization``), in keypoint units ([-1, 1] coordinates)."""

    # ---- loss weights (section 4, Table S1) -----------------------------------------------------------
    sparsity_weight: float = 5.0
    """lambda_sparse (Table S1 DMCS: 5), on the mean over keypoints of |mu|."""
    separation_weight: float = 0.1
    """lambda_sep (Table S1 DMCS: 0.1)."""
    separation_sigma: float = 0.02
    """sigma_sep of eq. 5 (Table S1 DMCS: 0.02), in [-1, 1] coordinate units."""
    kl_weight: float = 3e-3
    """beta, the weight of KL(posterior || prior) (Table S1 DMCS: 3e-3); the trainer anneals
    ``Schedule.kl_scale`` from 0 to 1 on top of it."""
    conv_weight_decay: float = 1e-4
    """L2 weight on the conv kernels (S1.2); the trainer adds ``conv_weight_decay * model.conv_weight_l2()``."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: choose from {', '.join(VARIANTS)}")
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
        for name in ("base_filters", "rnn_size", "prior_units", "posterior_units", "decoder_units", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.stochastic and self.latent_size < 1:
            raise ValueError("latent_size must be >= 1 for stochastic variants")

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def structured(self) -> bool:
        """True for the keypoint models, False for the unstructured ``cnn-vrnn`` baseline."""
        return self.variant != "cnn-vrnn"

    @property
    def stochastic(self) -> bool:
        """False for ``struct-rnn`` (no latent, no KL)."""
        return self.variant != "struct-rnn"

    @property
    def best_of(self) -> int:
        """Samples drawn per step for best of many in training (1 for nobom and the deterministic RNN)."""
        return self.num_samples if self.variant in ("struct-vrnn", "cnn-vrnn") else 1

    @property
    def latent_dim(self) -> int:
        """Size of z as carried in DynamicsState.latent (0 for ``struct-rnn``)."""
        return self.latent_size if self.stochastic else 0

    @property
    def feature_size(self) -> int:
        """Size of the flattened keypoint vector x_t the dynamics work on: K * 3."""
        return self.num_keypoints * 3

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
        """Table S1 (DMCS) and the paper's detector: the field defaults."""
        return cls(**overrides)  # type: ignore[arg-type]

    @classmethod
    def cpu(cls, **overrides: object) -> ModelConfig:
        """Reduced sizes for 2 CPU cores, with the softmax x10 / fixed-amplitude detector (module docstring)."""
        base = cls(
            num_keypoints=32,
            base_filters=16,
            heatmap="softmax",
            heatmap_logit_scale=10.0,
            initial_amplitude_mix=0.0,
            latent_size=32,
            rnn_size=256,
            num_samples=10,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]

    @classmethod
    def smoke(cls, **overrides: object) -> ModelConfig:
        """Tiny model for tests: seconds per step."""
        base = cls.cpu(num_keypoints=8, base_filters=4, latent_size=8, rnn_size=32, prior_units=8,
                       posterior_units=32, decoder_units=32, num_samples=4)
        return replace(base, **overrides)  # type: ignore[arg-type]
