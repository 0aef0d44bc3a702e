"""The action-conditional Struct-VRNN world model (Minderer et al. 2019, "Unsupervised Learning of Object
Structure and Dynamics from Videos", sections 3-4 and supplement S1; API in docs/CONTRACTS.md; the design,
shapes, losses and where they deviate from the paper in docs/DESIGN.md section 3).

    frames --phi_det--> keypoints x_t --(stop gradient)--> VRNN(h, z, a) --> predicted keypoints
       |                    |                                                   |
       +--phi_appearance--> phi_rec([maps(x_t), maps(x_1), appearance(v_1)]) <-+--> frames

Loss = L_image + lambda_sep L_sep + lambda_sparse L_sparse + L_VRNN + L_future (section 4). The vision side
(detector, appearance net, reconstructor) trains from the first three terms only; the dynamics see the
detected keypoints through a stop-gradient, so the joint objective can also be trained in stages.

Inputs are uint8 frames (B, T, 64, 64, 3) and zero-padded actions (B, T, 6) with ``actions[:, t]`` applied
at frame t (the causal action convention: docs/DESIGN.md section 2). All sampling goes through torch's RNG (an optional ``torch.Generator`` is accepted). The convs
take channels_last inputs and are safe under ``torch.autocast`` (bf16 on CPU); keypoint arithmetic, the
dynamics and the losses run in float32.
"""

from __future__ import annotations

import contextlib

from typing import NamedTuple

import torch
from torch import Tensor, nn

from worldmodel.config import ModelConfig
from worldmodel.dynamics import KeypointNormalizer
from worldmodel.dynamics_core import CoreCarry, DynamicsLosses, Unroll, make_dynamics
from worldmodel.losses import acceleration_loss, image_loss, relative_image_weights, separation_loss, sparsity_loss
from worldmodel.precision import inference_compute
from worldmodel.vision import (
    FeatureEncoder,
    FeatureMaps,
    ImageEncoder,
    KeypointDetector,
    Reconstructor,
    keypoints_to_maps,
    maps_to_keypoints,
    pixels_to_units,
)


class Schedule(NamedTuple):
    """Per-step training schedule, set by the trainer (``worldmodel.training.schedule_at``)."""

    kl_scale: float = 1.0
    """Multiplies beta; the trainer anneals it 0 -> 1."""
    teacher_forcing_observed: float = 0.0
    """p(feed detected keypoints to the RNN) on observed steps; 1 -> 0 over training."""
    teacher_forcing_predicted: float = 0.0
    """Same on predicted steps; 1 -> 0.5 over training."""
    amplitude_mix: float | None = None
    """Amplitude of the Gaussian maps, ``mix * mu + (1 - mix)`` (0: fixed amplitude, 1: the paper's mu).
    None keeps the model's current value (``ModelConfig.initial_amplitude_mix`` until set); a value is
    remembered by the model (a buffer saved with it) so decoding after training uses the last one."""


class Losses(NamedTuple):
    """Every field a float32 scalar tensor (zero where a term does not apply)."""

    total: Tensor  # the sum of the weighted terms below
    image: Tensor  # L_image, frames reconstructed from detected keypoints, all timesteps
    separation: Tensor  # L_sep (eq. 5), observed steps, unweighted
    sparsity: Tensor  # L_sparse, unweighted
    acceleration: Tensor  # the keypoints' temporal prior (losses.acceleration_loss), unweighted
    keypoint: Tensor  # keypoint reconstruction error, observed steps
    kl: Tensor  # KL(posterior || prior), observed steps (unscaled)
    future: Tensor  # keypoint reconstruction error, predicted steps
    regulariser: Tensor  # the dynamics core's own penalty, unweighted (SRVP: squared residuals; else 0)


class Diagnostics(NamedTuple):
    """Floats for logging keypoint collapse (keypoints that fade, mu -> 0, or stop moving), over the frames of
    one batch.

    For ``cnn-vrnn`` mean_mu and active_keypoints are 0 and keypoint_spread is the mean std of the feature
    units across the batch.
    """

    mean_mu: float  # mean presence mu over frames and keypoints
    active_keypoints: float  # keypoints that are drawn (mean amplitude >= 10% of the largest) and move
    #                          (position std over the batch's frames >= half a heatmap pixel)
    keypoint_spread: float  # mean over keypoints of the std of (x, y) across the batch's frames, coord units
    amplitude_mix: float  # the amplitude mix the Gaussian maps were drawn with


class DynamicsState(NamedTuple):
    """What the recurrence carries after a frame: the core's carry and two views of it."""

    hidden: Tensor  # (B, H) the core's hidden state (``DynamicsCore.hidden_state``)
    keypoints: Tensor  # (B, K, 3) the frame's keypoints as the core carries them, de-normalised
    carry: CoreCarry  # the core's own carry (normalised keypoints); ``imagine`` continues from it


class Rollout(NamedTuple):
    keypoints: Tensor  # (B, T, K, 3)
    hidden: Tensor  # (B, T, H); hidden[:, t] is the state that predicts frame t
    final: DynamicsState


class GuidedPrediction(NamedTuple):
    """``WorldModel.predict_guided``: observe the first frames, predict the rest keeping at each step the prior
    sample nearest the true future's keypoints, decode all."""

    frames: Tensor  # (B, T, 3, 64, 64) float in [-0.5, 0.5], decoded from `keypoints`
    keypoints: Tensor  # (B, T, K, 3) posterior (observed steps) then prior (predicted steps) keypoints
    detected: Tensor  # (B, T, K, 3) keypoints detected in the true frames
    hidden: Tensor  # (B, T, H)


class VisionOutput(NamedTuple):
    keypoints: Tensor  # (B, T, K, 3) detected, with gradient
    amplitude: Tensor  # (B, T, K) amplitude of each keypoint's Gaussian map
    losses: Losses


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast of inference convolutions on ``device``, as ``worldmodel.precision`` decides: bf16 only
    where the hardware runs it natively. The dynamics always run in float32 inside (``DynamicsCore.unroll``)."""
    return inference_compute(device).autocast()


def frames_to_images(frames: Tensor) -> Tensor:
    """uint8 (..., H, W, 3) -> float (N, 3, H, W) in [-0.5, 0.5], channels_last (a free permute of NHWC)."""
    frames = frames.reshape(-1, *frames.shape[-3:])  # (N, H, W, 3)
    images = frames.permute(0, 3, 1, 2).float() / 255.0 - 0.5
    return images.contiguous(memory_format=torch.channels_last)


def states_to_keypoints(states: Tensor, num_keypoints: int) -> Tensor:
    """The state-space bound's "perception": true states (B, T, D) zero-padded to (B, T, K, 3), D <= 3K.

    The triples are not points: the (K, 3) shape only lets the states travel the keypoints' path through
    the normaliser and the dynamics core, which see the flat vector of 3K numbers."""
    width = 3 * num_keypoints
    if states.shape[-1] > width:
        raise ValueError(f"states of size {states.shape[-1]} do not fit the model's {width} state features")
    padded = torch.nn.functional.pad(states.float(), (0, width - states.shape[-1]))
    return padded.view(*states.shape[:-1], num_keypoints, 3)


def previous_actions(actions: Tensor) -> Tensor:
    """(B, T, A) with actions[:, t] applied at frame t -> row t = a_{t-1}, the action that produced frame t
    (docs/DESIGN.md section 2)."""
    return torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], dim=1)


def reconstructed_frame_indices(steps: int, count: int) -> Tensor | None:
    """Which of a sequence's ``steps`` frames L_image reconstructs when it takes ``count`` of them (0 or
    >= steps: all, None). Spread evenly from the last frame back, frame 0 last: the first frame is the
    reference whose appearance the reconstructor copies, so its own reconstruction teaches the detector
    least. steps 8, count 4 -> frames 1, 3, 5, 7; count 2 -> frames 3, 7."""
    if count <= 0 or count >= steps:
        return None
    back = torch.arange(count) * (steps - 1) / count  # spacing >= 1: distinct frames after the floor
    return (steps - 1 - back).floor().long().flip(0)


class WorldModel(nn.Module):
    """Struct-VRNN and its baselines (``config.variant``), API of docs/CONTRACTS.md."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.detector: KeypointDetector | None = None
        self.encoder: FeatureEncoder | None = None
        self.feature_maps: FeatureMaps | None = None
        self.appearance: ImageEncoder | None = None
        self.reconstructor: Reconstructor | None = None
        if not config.reads_states:  # the state-space bound has no pixel side: its perception is the identity
            if config.structured:
                self.detector = KeypointDetector(config)
            else:
                self.encoder = FeatureEncoder(config)
                self.feature_maps = FeatureMaps(config)
            self.appearance = ImageEncoder(config)  # phi_appearance: the detector's trunk, on v_1
            self.reconstructor = Reconstructor(config)  # phi_rec (S5)
        self.dynamics = make_dynamics(config)  # config.dynamics: vrnn, srvp or hvrnn
        self.normalizer = KeypointNormalizer(config.feature_size, config.keypoint_std_floor)
        self.amplitude_mix: Tensor
        self.register_buffer("amplitude_mix", torch.tensor(float(config.initial_amplitude_mix)))

    # ---- pixels <-> keypoints ---------------------------------------------------------------------------
    @property
    def reads_frames(self) -> bool:
        """False for the state-space bound (``state-vrnn``), whose per-frame features are the true states."""
        return not self.config.reads_states

    def perceive(self, frames: Tensor, states: Tensor | None = None, windows_per_call: int | None = None) -> Tensor:
        """The dynamics' per-frame input (B, T, K, 3), no gradient: keypoints detected in uint8 frames
        (B, T, 64, 64, 3), or for the state-space bound the true states (B, T, D) (frames are not read).
        ``windows_per_call``: the detector takes that many windows' frames at a time, which bounds its activations'
        memory; detection is per frame, so the keypoints are the same."""
        if not self.config.reads_states:
            if windows_per_call is None:
                return self.detect(frames)
            return torch.cat([self.detect(part) for part in frames.split(windows_per_call)])
        if states is None:
            raise ValueError("the state-space bound (state-vrnn) reads the true states: pass states, not only frames")
        return states_to_keypoints(states, self.config.num_keypoints)

    def _require_pixels(self) -> None:
        if self.config.reads_states:
            raise ValueError(
                "the state-space bound (state-vrnn) has no detector or decoder: it reads the true states "
                "(WorldModel.perceive), so nothing here takes or makes frames"
            )

    def encode(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [-0.5, 0.5] -> keypoints (N, K, 3) float32, with gradient.

        For cnn-vrnn the 'keypoints' are the feature vector reshaped to (K, 3).
        """
        self._require_pixels()
        if self.detector is not None:
            cfg = self.config
            return maps_to_keypoints(self.detector(images), cfg.heatmap, cfg.heatmap_logit_scale)  # S1-S3
        assert self.encoder is not None
        return self.encoder(images).view(images.shape[0], self.config.num_keypoints, 3)

    def amplitude(self, keypoints: Tensor, mix: Tensor | float | None = None) -> Tensor:
        """Amplitude of each keypoint's Gaussian map: mix * mu + (1 - mix), (..., K, 3) -> (..., K)."""
        mix = self.amplitude_mix if mix is None else mix
        mu = keypoints[..., 2].float()
        return mix * mu + (1.0 - mix)

    def keypoint_maps(self, keypoints: Tensor, mix: Tensor | float | None = None) -> Tensor:
        """(N, K, 3) -> the reconstructor's per-keypoint input maps (N, K, S', S')."""
        if self.feature_maps is not None:
            return self.feature_maps(keypoints.flatten(1).float())
        cfg = self.config
        return keypoints_to_maps(keypoints, cfg.heatmap_size, cfg.keypoint_sigma, self.amplitude(keypoints, mix))

    def reconstruct(
        self, keypoints: Tensor, first_images: Tensor, first_keypoints: Tensor, mix: Tensor | float | None = None
    ) -> Tensor:
        """v^_t = v_1 + phi_rec([maps(x_t), maps(x_1), appearance(v_1)]) (S5).

        keypoints (B, T, K, 3), first_images (B, 3, H, W) float, first_keypoints (B, K, 3) -> (B*T, 3, H, W).
        """
        self._require_pixels()
        assert self.appearance is not None and self.reconstructor is not None
        batch, steps = keypoints.shape[:2]
        appearance = self.appearance(first_images)  # (B, C, S', S')
        first_maps = self.keypoint_maps(first_keypoints, mix)  # (B, K, S', S')
        maps = self.keypoint_maps(keypoints.flatten(0, 1), mix)  # (B*T, K, S', S')
        change = self.reconstructor(maps, first_maps, appearance).unflatten(0, (batch, steps))  # (B, T, 3, H, W)
        return (first_images[:, None] + change).flatten(0, 1)  # (B*T, 3, H, W)

    @torch.no_grad()
    def detect(self, frames: Tensor) -> Tensor:
        """uint8 frames (B, T, 64, 64, 3) -> detected keypoints (B, T, K, 3) float32, no gradient."""
        batch, steps = frames.shape[:2]
        return self.encode(frames_to_images(frames)).view(batch, steps, self.config.num_keypoints, 3)

    def decode(self, keypoints: Tensor, first_frame: Tensor, first_keypoints: Tensor) -> Tensor:
        """Frames from keypoints: keypoints (B, T, K, 3), first_frame uint8 (B, 64, 64, 3), first_keypoints
        (B, K, 3) (usually detected in first_frame) -> float (B, T, 3, 64, 64), clipped to [-0.5, 0.5]."""
        batch, steps = keypoints.shape[:2]
        images = self.reconstruct(keypoints, frames_to_images(first_frame), first_keypoints)
        return images.float().clamp(-0.5, 0.5).reshape(batch, steps, *images.shape[1:])

    # ---- losses ---------------------------------------------------------------------------------------------
    def _vision(self, frames: Tensor, schedule: Schedule | None, num_observed: int | None) -> VisionOutput:
        cfg = self.config
        batch, steps = frames.shape[:2]
        mix: Tensor | float = self.amplitude_mix
        if schedule is not None and schedule.amplitude_mix is not None:
            self.amplitude_mix.fill_(float(schedule.amplitude_mix))  # remembered for decoding (see Schedule)
            mix = float(schedule.amplitude_mix)
        images = frames_to_images(frames)  # (B*T, 3, H, W)
        keypoints = self.encode(images).view(batch, steps, cfg.num_keypoints, 3)  # (B, T, K, 3)
        sequences = images.view(batch, steps, *images.shape[1:])  # (B, T, 3, H, W)
        # L_image on the frames reconstructed_frames picks (all by default): the reconstruction is most of
        # a vision step's cost, and the detector still sees every frame through the other losses
        chosen = reconstructed_frame_indices(steps, cfg.reconstructed_frames)  # (T',)
        targets = sequences if chosen is None else sequences[:, chosen]  # (B, T', 3, H, W)
        reconstruction = self.reconstruct(keypoints if chosen is None else keypoints[:, chosen], sequences[:, 0],
                                          keypoints[:, 0], mix)  # (B*T', 3, H, W)  # fmt: skip
        zero = images.new_zeros(())
        frame_weights = None
        if cfg.relative_image_loss:  # each sequence against copying its first frame (config docstring)
            # (B*T',), frames ordered (b, t)
            frame_weights = relative_image_weights(sequences).repeat_interleave(targets.shape[1])
        image = image_loss(reconstruction, targets.flatten(0, 1), frame_weights)
        if cfg.structured:
            observed = keypoints[:, : (steps if num_observed is None else num_observed)]
            separation = separation_loss(observed[..., :2], cfg.separation_sigma) if observed.shape[1] else zero
            sparsity = sparsity_loss(keypoints[..., 2])
            acceleration = acceleration_loss(keypoints[..., :2]) if cfg.acceleration_weight > 0 else zero
        else:
            separation = sparsity = acceleration = zero
        # L_sparse acts on the maps' amplitudes: with fixed amplitude (mix 0) mu is not drawn, nothing to prune.
        total = image + cfg.separation_weight * separation + cfg.sparsity_weight * mix * sparsity
        total = total + cfg.acceleration_weight * acceleration
        losses = Losses(total, image, separation, sparsity, acceleration, zero, zero, zero, zero)
        return VisionOutput(keypoints, self.amplitude(keypoints, mix), losses)

    @torch.no_grad()
    def diagnose(self, keypoints: Tensor, amplitude: Tensor | None = None) -> Diagnostics:
        """Collapse diagnostics of keypoints (B, T, K, 3) (see ``Diagnostics``); one device sync."""
        points = keypoints.flatten(0, -3).float()  # (N, K, 3)
        mix = self.amplitude_mix.float()
        if not self.config.structured:
            spread = points.flatten(1).std(0, unbiased=False).mean()
            spread_value, mix_value = torch.stack([spread, mix]).tolist()
            return Diagnostics(0.0, 0.0, spread_value, mix_value)
        amplitude = self.amplitude(points) if amplitude is None else amplitude.flatten(0, -2).float()  # (N, K)
        spread = points[..., :2].var(0, unbiased=False).sum(-1).sqrt()  # (K,)
        drawn = amplitude.mean(0)  # (K,)
        half_pixel = 0.5 * pixels_to_units(1.0, self.config.heatmap_size)
        active = (drawn >= 0.1 * drawn.max()) & (spread >= half_pixel)
        stats = torch.stack([points[..., 2].mean(), active.sum().float(), spread.mean(), mix]).tolist()  # one sync
        return Diagnostics(*stats)

    def vision_losses(
        self, frames: Tensor, schedule: Schedule | None = None, num_observed: int | None = None
    ) -> tuple[Losses, Diagnostics]:
        """L_image + lambda_sep L_sep + lambda_sparse L_sparse on uint8 frames (B, T, 64, 64, 3), T >= 1.

        L_sep uses the first ``num_observed`` frames (all if None).
        """
        out = self._vision(frames, schedule, num_observed)
        return out.losses, self.diagnose(out.keypoints, out.amplitude)

    def dynamics_losses(
        self,
        keypoints: Tensor,
        actions: Tensor,
        num_observed: int,
        schedule: Schedule,
        generator: torch.Generator | None = None,
        deferred_readout: bool = True,
        compiled: bool = False,
    ) -> Losses:
        """L_VRNN + L_future on detected keypoints (B, T, K, 3) (no gradient reaches them) and actions (B, T, 6).

        The first ``num_observed`` frames use the posterior (keypoint error + beta * kl_scale * KL), the rest
        the prior (L_future), with the core's best of many (eq. 8) and scheduled sampling. A core that trains
        on the posterior at every frame (``posterior_in_training``: SRVP) has KL terms on all frames and no
        L_future. The core's own penalty (SRVP's residual norm) is added with its weight. ``deferred_readout``:
        the observed frames' decoded keypoints and KL terms after the loop, where the core allows it
        (``DynamicsCore.unroll``); False computes them frame by frame (the same numbers to float rounding).
        ``compiled``: the unroll through ``torch.compile``, its random draws made first from the same generator
        in the same order (``DynamicsCore.draw_randomness``): the same figures to float rounding in float32.
        """
        core = self.dynamics
        targets = self.normalizer.normalize(keypoints.detach().flatten(2))  # (B, T, F), stop-gradient
        observed = targets.shape[1] if core.posterior_in_training else num_observed
        teacher_forcing = (schedule.teacher_forcing_observed, schedule.teacher_forcing_predicted)
        imagined_samples = None if self.config.future_best_of else 1
        randomness = None
        if compiled:  # the draws first, so that the compiled loop holds no random number generator
            batch, steps = targets.shape[:2]
            randomness = core.draw_randomness(batch, steps, observed, core.best_of, teacher_forcing, generator,
                                              targets.device, imagined_samples)
        unroll = core.unroll(
            previous_actions(actions),
            targets,
            num_observed=observed,
            num_samples=core.best_of,
            teacher_forcing=teacher_forcing,
            generator=generator,
            imagined_samples=imagined_samples,
            deferred_readout=deferred_readout,
            randomness=randomness,
            compiled=compiled,
        )
        d: DynamicsLosses = core.losses(unroll, targets, observed, schedule.kl_scale)
        zero = d.keypoint.new_zeros(())
        return Losses(d.total, zero, zero, zero, zero, d.keypoint, d.kl, d.future, d.regulariser)

    def joint_losses(
        self,
        frames: Tensor,
        actions: Tensor,
        num_observed: int,
        schedule: Schedule,
        generator: torch.Generator | None = None,
    ) -> tuple[Losses, Diagnostics]:
        """The whole objective on uint8 frames (B, T, 64, 64, 3) and actions (B, T, 6) (section 4)."""
        vision = self._vision(frames, schedule, num_observed)
        dynamics = self.dynamics_losses(vision.keypoints, actions, num_observed, schedule, generator)
        v, d = vision.losses, dynamics
        losses = Losses(
            v.total + d.total, v.image, v.separation, v.sparsity, v.acceleration, d.keypoint, d.kl, d.future,
            d.regulariser,
        )
        return losses, self.diagnose(vision.keypoints, vision.amplitude)

    def conv_weight_l2(self) -> Tensor:
        """Sum of squared conv kernels (S1.2's L2 weight decay; the trainer adds conv_weight_decay * this)."""
        kernels = [m.weight for m in self.modules() if isinstance(m, nn.Conv2d)]
        return torch.stack([w.float().square().sum() for w in kernels]).sum()

    # ---- dynamics API ---------------------------------------------------------------------------------------
    def fit_keypoint_normalization(self, keypoints: Tensor, std_floor: float | None = None) -> None:
        """Set the dynamics' per-feature normalisation from keypoints (N, T, K, 3) of N sequences (T >= 2):
        mean over all frames, within-sequence std floored at ``config.keypoint_std_floor``."""
        self.normalizer.fit(keypoints, std_floor)

    def _state(self, carry: CoreCarry) -> DynamicsState:
        k = self.config.num_keypoints
        points = self.normalizer.denormalize(self.dynamics.keypoints(carry)).view(-1, k, 3)
        return DynamicsState(self.dynamics.hidden_state(carry), points, carry)

    def _rollout(self, unroll: Unroll) -> Rollout:
        batch, steps = unroll.keypoints.shape[:2]
        points = self.normalizer.denormalize(unroll.keypoints).view(batch, steps, self.config.num_keypoints, 3)
        return Rollout(points, unroll.hidden, self._state(unroll.final))

    def observe(
        self,
        keypoints: Tensor,
        actions: Tensor,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Filter detected keypoints (B, T, K, 3) with the posterior; actions (B, T, 6), actions[:, t] applied
        at frame t (the last one is unused: it leads past the sequence; pass it to ``imagine``).

        Each frame's latent is the best of ``num_samples`` (default: the core's ``best_of``) posterior samples
        against the detected keypoints, and a core that feeds keypoints back is fed its own decoded ones.
        """
        targets = self.normalizer.normalize(keypoints.flatten(2))
        unroll = self.dynamics.unroll(
            previous_actions(actions),
            targets,
            num_observed=keypoints.shape[1],
            num_samples=self.dynamics.best_of if num_samples is None else num_samples,
            generator=generator,
        )
        return self._rollout(unroll)

    def imagine(
        self,
        state: DynamicsState,
        actions: Tensor,
        targets: Tensor | None = None,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Open-loop prediction with prior samples from ``state``; actions (B, T, 6), actions[:, 0] applied at
        the frame of ``state``; returns the T frames that follow it.

        With ``targets`` (B, T, K, 3) (keypoints detected in the true future frames, for evaluation) each
        step keeps the best of ``num_samples`` (default: the core's ``best_of``) prior samples; without, the
        first. The continuation reads ``state.carry`` only.
        """
        normalized = None if targets is None else self.normalizer.normalize(targets.flatten(2))
        unroll = self.dynamics.unroll(
            actions,
            normalized,
            initial=state.carry,
            num_samples=self.dynamics.best_of if num_samples is None else num_samples,
            generator=generator,
        )
        return self._rollout(unroll)

    @torch.no_grad()
    def predict_guided(
        self,
        frames: Tensor,
        actions: Tensor,
        num_observed: int,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> GuidedPrediction:
        """Observe frames[:, :num_observed] (posterior), predict the rest with the prior, each step keeping the
        best of ``num_samples`` samples against the keypoints detected in the true frames (so it peeks at the
        future: 1 = a plain sample), decode every frame. frames uint8 (B, T, 64, 64, 3), actions (B, T, 6).
        The evaluation's best of N, which picks whole open-loop samples, is ``evaluation.predict_best_of_n``."""
        if not 1 <= num_observed <= frames.shape[1]:
            raise ValueError(f"num_observed must be in [1, T={frames.shape[1]}], got {num_observed}")
        detected = self.detect(frames)  # (B, T, K, 3)
        observed = self.observe(detected[:, :num_observed], actions[:, :num_observed], num_samples, generator)
        steps = frames.shape[1]
        if num_observed < steps:
            future = self.imagine(
                observed.final, actions[:, num_observed - 1 : steps - 1], detected[:, num_observed:],
                num_samples, generator,
            )
            keypoints = torch.cat([observed.keypoints, future.keypoints], dim=1)
            hidden = torch.cat([observed.hidden, future.hidden], dim=1)
        else:
            keypoints, hidden = observed.keypoints, observed.hidden
        images = self.decode(keypoints, frames[:, 0], detected[:, 0])
        return GuidedPrediction(images, keypoints, detected, hidden)


def vision_modules(model: WorldModel) -> list[nn.Module]:
    """The pixel side: detector (or CNN encoder + feature maps), appearance net, reconstructor."""
    parts = [model.detector, model.encoder, model.feature_maps, model.appearance, model.reconstructor]
    return [part for part in parts if part is not None]
