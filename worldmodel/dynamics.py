"""The VRNN dynamics on flattened keypoints (S1.1.2), with best of many (eq. 8) and scheduled sampling (S1.3).

One step for frame t (the state that predicts frame t has seen a_{t-1}, the action that produced it; the paper's
S1.1.2 feeds a_{t-1} one step later, which leaves the prior blind to it; Dreamer's RSSM orders it as here;
docs/DESIGN.md sections 2 and 3.5):

    h_t = GRU(h_{t-1}, [x_{t-1}, z_{t-1}, a_{t-1}])          (S9, with the action that produced frame t)
    prior:     mean, std = phi_prior(h_t)                   (S6)
    posterior: mean, std = phi_enc([x_t, h_t])              (S7, observed steps)
    z_t ~ posterior (observed) or prior (predicted);  x^_t = phi_dec([z_t, h_t])   (S8)

The very first frame of a sequence has no predecessor: h_0 = 0 and no GRU step. Everything here works in a
normalised keypoint space (``KeypointNormalizer``: per-feature mean and within-sequence std with a floor,
so that task-dependent resting positions do not dominate) and in float32, also when called under autocast: the dynamics are small, precision matters more.
The decoder's output is linear: normalised keypoints are unbounded, so tanh (the original code, for
coordinates in [-1, 1] and mu in [0, 1]) does not fit.

``struct-rnn`` has no z (size 0), no prior/posterior and no KL; ``struct-vrnn-nobom`` draws one sample.
The VRNN implements ``DynamicsCore`` (worldmodel/dynamics_core.py): its hidden state is h_t, best of many
and scheduled sampling apply as configured (``future_best_of``, ``feed_detected``), and the prior is trained by
the KL only unless ``prior_future_gradient`` lets L_future reach it (the ``cpu`` profile does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.config import ModelConfig
from worldmodel.dynamics_core import DeferredObserve, DynamicsCore, Sampling, Step, Unroll
from worldmodel.losses import gaussian_kl, keypoint_error

__all__ = ["VRNN", "Carry", "Gaussian", "GaussianHead", "KeypointDecoder", "KeypointNormalizer", "Unroll", "dense"]

STD_OFFSET = 1e-4  # std = softplus(.) + 1e-4 (S6, S7)


def dense(in_features: int, out_features: int) -> nn.Linear:
    """Dense layer with Keras' default init (Glorot uniform, zero bias), as the original code."""
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Gaussian(NamedTuple):
    mean: Tensor  # (B, Z)
    std: Tensor  # (B, Z)

    def detach(self) -> Gaussian:
        return Gaussian(self.mean.detach(), self.std.detach())


class GaussianHead(nn.Module):
    """phi_prior (S6) and phi_enc (S7): dense ``units`` ReLU -> mean, std = softplus(.) + 1e-4."""

    def __init__(self, in_features: int, units: int, latent_size: int) -> None:
        super().__init__()
        self.hidden = dense(in_features, units)
        self.out = dense(units, 2 * latent_size)

    def forward(self, inputs: Tensor) -> Gaussian:
        return gaussian_from(self.out(F.relu(self.hidden(inputs))))


def gaussian_from(outputs: Tensor) -> Gaussian:
    """A head's outputs (..., 2Z) -> Gaussian(mean, std = softplus(.) + 1e-4), (..., Z) each. In float32 under
    bf16 autocast too: the std's log enters the KL, and bf16 softplus is slow on CPUs (5x float32's on a Xeon
    with AMX)."""
    mean, std = outputs.float().chunk(2, dim=-1)
    return Gaussian(mean, F.softplus(std) + STD_OFFSET)


class KeypointDecoder(nn.Module):
    """phi_dec (S8): [z, h] -> x^ (normalised, linear). Dense ``units`` ReLU -> K*3.

    The first dense layer is split into a z part and an h part so that the h part is computed once per
    batch element and broadcast over the best-of-many samples.
    """

    def __init__(self, latent_size: int, hidden_size: int, units: int, feature_size: int) -> None:
        super().__init__()
        self.from_latent = dense(latent_size, units) if latent_size else None
        self.from_hidden = dense(hidden_size, units)
        self.out = dense(units, feature_size)

    def forward(self, latent: Tensor, hidden: Tensor) -> Tensor:
        """latent (..., B, Z), hidden (B, H) -> (..., B, F)."""
        pre = self.from_hidden(hidden)  # (B, units)
        if self.from_latent is not None:
            pre = self.from_latent(latent) + pre  # (..., B, units)
        return self.out(F.relu(pre))


class KeypointNormalizer(nn.Module):
    """Per-feature affine normalisation of the flattened keypoints x_t (K*3) for the dynamics.

    Buffers (saved in checkpoints) default to the identity; ``fit`` sets the mean over all frames and the
    within-sequence std (root mean of each sequence's variance over time) with a floor, so that the
    dynamics' inputs and losses measure motion, not the (task-dependent) resting positions.
    """

    def __init__(self, feature_size: int, std_floor: float) -> None:
        super().__init__()
        self.std_floor = std_floor
        self.register_buffer("mean", torch.zeros(feature_size))
        self.register_buffer("std", torch.ones(feature_size))

    @torch.no_grad()
    def fit(self, keypoints: Tensor, std_floor: float | None = None) -> None:
        """keypoints (N, T, F) (or (N, T, K, 3)): N sequences of T >= 2 frames."""
        x = keypoints.float().flatten(2)  # (N, T, F)
        if x.shape[1] < 2:
            raise ValueError("fit needs sequences of at least 2 frames for a within-sequence std")
        floor = self.std_floor if std_floor is None else std_floor
        self.mean.copy_(x.mean((0, 1)).to(self.mean.device))
        within = x.var(1, unbiased=False).mean(0).sqrt()  # (F,)
        self.std.copy_(within.clamp_min(floor).to(self.std.device))

    def normalize(self, x: Tensor) -> Tensor:
        return (x.float() - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean


class Carry(NamedTuple):
    """What the VRNN carries after a frame (normalised keypoints)."""

    hidden: Tensor  # (B, H) h_t
    keypoints: Tensor  # (B, F) x_t as fed to the next GRU step (detected or predicted, normalised)
    latent: Tensor  # (B, Z) z_t (Z = 0 for struct-rnn)


class Readout(NamedTuple):
    """What an observed frame's read-out needs, row by row: the decoded keypoints and the KL terms."""

    hidden: Tensor  # (B, H) h_t
    latent: Tensor  # (B, Z) the chosen posterior sample z_t
    base: Tensor | None  # (B, F) what the decoded keypoints are added to (residual keypoints), or None
    posterior_mean: Tensor  # (B, Z) (the VRNN) or (B, L, Z) (the hierarchical VRNN, level by level)
    posterior_std: Tensor  # same shape


class RecurrentKeypointCore(DynamicsCore):
    """What the VRNN and the hierarchical VRNN share: a GRU state h_t over [x_{t-1}, z_{t-1}, a_{t-1}], and
    a ``Carry`` of h_t, the keypoints fed in and the latent sample (all levels of it, concatenated).
    Subclasses set ``rnn``, ``noise_size`` (the latent's width) and ``decoder``, and implement
    ``observe_deferred`` (the state and the posterior sample) and ``readout`` (decoded keypoints and KL terms
    from a ``Readout``): an observe step is the one followed by the other."""

    rnn: nn.GRUCell
    noise_size: int
    decoder: KeypointDecoder

    def initial_carry(self, batch_size: int, device: torch.device) -> Carry:
        """The zero state before any frame (only its hidden part is used; see ``unroll``)."""
        cfg = self.config
        zeros = lambda size: torch.zeros(batch_size, size, device=device)  # noqa: E731
        return Carry(zeros(cfg.rnn_size), zeros(cfg.feature_size), zeros(self.noise_size))

    def hidden_state(self, carry: Carry) -> Tensor:  # type: ignore[override]
        return carry.hidden

    def keypoints(self, carry: Carry) -> Tensor:  # type: ignore[override]
        return carry.keypoints

    def feed(self, carry: Carry, keypoints: Tensor) -> Carry:  # type: ignore[override]
        return carry._replace(keypoints=keypoints)

    def transition(self, carry: Carry | None, action: Tensor) -> Tensor:
        """h_t = GRU(h_{t-1}, [x_{t-1}, z_{t-1}, a_{t-1}]); h = 0 and no GRU step at a sequence start."""
        if carry is None:
            return action.new_zeros(action.shape[0], self.config.rnn_size)
        return self.rnn(torch.cat([carry.keypoints, carry.latent, action], dim=-1), carry.hidden)  # (B, H)

    def decode(self, latent: Tensor, hidden: Tensor, base: Tensor | None) -> Tensor:
        """x^_t = phi_dec(z_t, h_t) (S8), plus ``base`` (B, F) with residual keypoints: (..., B, Z) -> (..., B, F)."""
        decoded = self.decoder(latent, hidden)
        return decoded if base is None else decoded + base

    def defers_readout(self) -> bool:
        # The next GRU step reads the keypoints fed in: the detected ones, or this frame's decoded ones.
        return self.config.feed_detected

    def _observe(self, carry: Carry | None, action: Tensor, target: Tensor, sampling: Sampling) -> Step:  # type: ignore[override]
        deferred = self.observe_deferred(carry, action, target, sampling)
        prediction, kl = self.readout(deferred.readout)
        fed = target if self.config.feed_detected else prediction  # what the next GRU step reads as x_t
        new_carry = deferred.carry._replace(keypoints=fed)  # type: ignore[attr-defined]
        return Step(new_carry, prediction, deferred.hidden, kl, deferred.hidden.new_zeros(target.shape[0]))


class VRNN(RecurrentKeypointCore):
    """The VRNN dynamics core (``--dynamics vrnn``), for every ``--model`` variant."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        features, latent, hidden = config.feature_size, config.latent_dim, config.rnn_size
        self.rnn = nn.GRUCell(features + latent + config.action_dim, hidden)
        self.prior = GaussianHead(hidden, config.prior_units, latent) if latent else None
        self.posterior = GaussianHead(features + hidden, config.posterior_units, latent) if latent else None
        self.decoder = KeypointDecoder(latent, hidden, config.decoder_units, features)
        self.hidden_size = hidden
        self.hidden_bound = 1.0  # a GRU state is a convex mix of tanh outputs, from 0
        self.noise_size = latent
        self.best_of = config.best_of
        self.posterior_in_training = False
        self.scheduled_sampling = True
        self.kl_names = ("z",)
        self.regulariser_weight = 0.0

    def sample(
        self,
        belief: Gaussian | None,
        hidden: Tensor,
        target: Tensor | None,
        sampling: Sampling,
        base: Tensor | None = None,
    ) -> Tensor:
        """Draw z: -> z (B, Z) (decode it with ``decode``).

        ``sampling.noise`` (N, B, Z), when given, replaces the standard normal draws (callers that keep one random
        stream per batch row, like the imagination envs, draw it themselves).

        Best of many (eq. 8): with a target (B, F) and more than one sample, N samples are decoded at once and the
        one closest to the target (``ModelConfig.keypoint_error`` in normalised space) is kept; gradients flow through the
        chosen sample only (the caller decodes it again, with grad). Without a target the first sample is used.
        ``base`` (B, F), when given, is added to every candidate's decoded output (residual keypoints).
        """
        batch = hidden.shape[0]
        if belief is None:  # struct-rnn: deterministic
            return hidden.new_zeros(batch, 0)
        noise = sampling.draws(batch, belief.mean.shape[-1], hidden, target)
        n = noise.shape[0]
        if n > 1:
            with torch.no_grad():
                candidates = self.decode(belief.mean + belief.std * noise, hidden, base)  # (N, B, F)
                best = keypoint_error(candidates, target, self.config.keypoint_error).argmin(0)  # (B,)
            noise = noise[best, torch.arange(batch, device=hidden.device)]  # (B, Z)
        else:
            noise = noise[0]
        return belief.mean + belief.std * noise  # reparameterised: (B, Z)

    def observe_deferred(  # type: ignore[override]
        self, carry: Carry | None, action: Tensor, target: Tensor, sampling: Sampling
    ) -> DeferredObserve:
        hidden = self.transition(carry, action)
        base = self.residual_base(carry)
        belief = None
        if self.posterior is not None:
            belief = self.posterior(torch.cat([target, hidden], dim=-1))  # S7
        latent = self.sample(belief, hidden, target, sampling, base)  # eq. 8
        empty = latent  # struct-rnn has no posterior: its latent is (B, 0), and so are the posterior's fields
        readout = Readout(hidden, latent, base, empty if belief is None else belief.mean,
                          empty if belief is None else belief.std)
        return DeferredObserve(Carry(hidden, target, latent), hidden, readout)

    def readout(self, inputs: Readout) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        prediction = self.decode(inputs.latent, inputs.hidden, inputs.base)  # S8
        if self.prior is None:
            return prediction, inputs.hidden.new_zeros(inputs.hidden.shape[0], 1)
        prior = self.prior(inputs.hidden)  # S6
        kl = gaussian_kl(inputs.posterior_mean, inputs.posterior_std, prior.mean, prior.std)[:, None]  # (N, 1)
        return prediction, kl

    def _imagine(self, carry: Carry | None, action: Tensor, target: Tensor | None, sampling: Sampling) -> Step:  # type: ignore[override]
        hidden = self.transition(carry, action)
        # As the original code, the prior is trained by the KL only, not by L_future, unless
        # prior_future_gradient asks L_future to shape its spread too.
        belief = self.prior(hidden) if self.prior is not None else None
        if belief is not None and not self.config.prior_future_gradient:
            belief = belief.detach()
        base = self.residual_base(carry)
        latent = self.sample(belief, hidden, target, sampling, base)
        prediction = self.decode(latent, hidden, base)
        zero = hidden.new_zeros(hidden.shape[0])
        return Step(Carry(hidden, prediction, latent), prediction, hidden, zero[:, None], zero)
