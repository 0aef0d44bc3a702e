"""Hierarchical VRNN (Castrejon et al. 2019, supplement A.1-A.2) on keypoints and actions.

The VRNN with its latent split into L levels z_t = (z_t^1, ..., z_t^L), sampled top-down:

    h_t = GRU(h_{t-1}, [x_{t-1}, z_{t-1}^{1..L}, a_{t-1}])          (the VRNN's action ordering)
    prior:     p(z_t^l | z_t^{<l}, h_t)      = N(phi_prior^l([h_t, z_t^1, ..., z_t^{l-1}]))
    posterior: q(z_t^l | z_t^{<l}, x_t, h_t) = N(phi_post^l([x_t, h_t, z_t^1, ..., z_t^{l-1}]))
    x^_t = phi_dec([z_t^1, ..., z_t^L, h_t])

Dense connectivity (A.2): every level reads the frame (and h_t, which holds x_{t-1} and a_{t-1}) and all
the levels above it, and the decoder reads every level. The ELBO of A.1 sums one KL per level,
KL(q(z^l | z^{<l}, x, h) || p(z^l | z^{<l}, h)), both conditioned on the same posterior sample of z^{<l};
the loss reports the L values and their sum. The paper's per-level recurrent (ConvLSTM) priors and
posteriors are folded into the one GRU state h_t: the keypoint vector is small, and one state keeps the
step as cheap as the VRNN's. Hidden state: h_t.

Best of many (eq. 8 of Minderer et al.) and scheduled sampling apply as in the VRNN: N whole top-down
samples are decoded, the closest to the target is kept and redrawn with gradient; the prior is trained by
the KL only (detached on imagined frames) unless ``prior_future_gradient``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.config import ModelConfig
from worldmodel.dynamics import Carry, Gaussian, KeypointDecoder, Readout, RecurrentKeypointCore, dense, gaussian_from
from worldmodel.dynamics_core import DeferredObserve, Sampling, Step
from worldmodel.losses import gaussian_kl, keypoint_error


def by_level(tensors: list[Tensor]) -> Tensor:
    """L levels' (B, Z) tensors -> (B, L, Z)."""
    return torch.stack(tensors, dim=1)


class LevelHead(nn.Module):
    """One level's Gaussian from its share of the per-frame projection and the levels above it:
    ReLU(frame part + dense(above)) -> dense -> mean, std = softplus(.) + 1e-4.

    The frame part (dense on [x_t, h_t] or h_t) of all levels is one matrix product per frame, made once
    and broadcast over the best-of-many samples (``HierarchicalVRNN.top_down``).
    """

    def __init__(self, above_features: int, units: int, latent_size: int) -> None:
        super().__init__()
        self.from_above = dense(above_features, units) if above_features else None
        self.out = dense(units, 2 * latent_size)

    def forward(self, frame_part: Tensor, above: Tensor | None) -> Gaussian:
        """frame_part (B, units), above (..., B, (l-1)*Z) or None -> Gaussian (..., B, Z)."""
        pre = frame_part
        if self.from_above is not None and above is not None:
            pre = self.from_above(above) + pre  # (..., B, units)
        return gaussian_from(self.out(F.relu(pre)))


class HierarchicalVRNN(RecurrentKeypointCore):
    """L levels of latents with top-down, densely connected prior and posterior."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        features, z, hidden, levels = config.feature_size, config.latent_dim, config.rnn_size, config.hvrnn_levels
        self.levels, self.level_size = levels, z
        self.rnn = nn.GRUCell(features + levels * z + config.action_dim, hidden)
        # The first dense layer of every level's head, split: the part that reads the frame (h_t for the
        # prior, [x_t, h_t] for the posterior) for all levels at once, and the part that reads the levels above.
        self.prior_frame = dense(hidden, levels * config.prior_units)
        self.posterior_frame = dense(features + hidden, levels * config.posterior_units)
        self.priors = nn.ModuleList(LevelHead(l * z, config.prior_units, z) for l in range(levels))
        self.posteriors = nn.ModuleList(LevelHead(l * z, config.posterior_units, z) for l in range(levels))
        self.decoder = KeypointDecoder(levels * z, hidden, config.decoder_units, features)
        self.hidden_size = hidden
        self.hidden_bound = 1.0
        self.noise_size = levels * z
        self.best_of = config.best_of
        self.posterior_in_training = False
        self.scheduled_sampling = True
        self.kl_names = tuple(f"z{l + 1}" for l in range(levels))
        self.regulariser_weight = 0.0

    def top_down(
        self, heads: nn.ModuleList, parts: list[Tensor], noise: Tensor, detach: bool = False
    ) -> tuple[Tensor, list[Gaussian]]:
        """Sample z^1..z^L top-down from ``heads`` (the posteriors, or the priors) given each level's frame
        part (L x (B, units)): noise (..., B, L*Z) -> latents (..., B, L*Z) and each level's Gaussian
        (..., B, Z); ``detach`` cuts the Gaussians from the graph (the prior on imagined frames)."""
        z = self.level_size
        levels: list[Tensor] = []
        beliefs: list[Gaussian] = []
        for l, head in enumerate(heads):
            # All the levels above l (dense); level 1 alone needs no concatenation (a copy).
            above = None if l == 0 else levels[0] if l == 1 else torch.cat(levels, dim=-1)
            belief = head(parts[l], above)
            if detach:
                belief = belief.detach()
            levels.append(torch.addcmul(belief.mean, belief.std, noise[..., l * z : (l + 1) * z]))  # reparameterised
            beliefs.append(belief)
        return torch.cat(levels, dim=-1), beliefs

    def level_kl(self, hidden: Tensor, latent: Tensor, posterior_mean: Tensor, posterior_std: Tensor) -> Tensor:
        """KL(q(z^l | z^{<l}, x, h) || p(z^l | z^{<l}, h)) of every level, both conditioned on the posterior
        sample latent (N, L*Z) of the levels above; hidden (N, H), the posteriors' means and stds (N, L, Z)
        -> (N, L), one KL for all levels."""
        z = self.level_size
        prior_parts = self.prior_frame(hidden).chunk(self.levels, dim=-1)  # L x (N, prior units)
        priors = [head(prior_parts[l], latent[:, : l * z] if l else None) for l, head in enumerate(self.priors)]
        return gaussian_kl(  # (N, L)
            posterior_mean, posterior_std, by_level([p.mean for p in priors]), by_level([p.std for p in priors])
        )

    def sample(
        self, heads: nn.ModuleList, parts: list[Tensor], hidden: Tensor, base: Tensor | None, target: Tensor | None,
        sampling: Sampling, detach: bool = False,
    ) -> tuple[Tensor, list[Gaussian]]:
        """One top-down sample from ``heads`` given each level's frame part: -> latent (B, L*Z) and the levels'
        Gaussians. Best of many with a target and more than one draw: N whole top-down samples are decoded
        and the closest to the target is redrawn with gradient."""
        batch = hidden.shape[0]
        noise = sampling.draws(batch, self.noise_size, hidden, target)
        if noise.shape[0] > 1 and target is not None:  # best of many over whole top-down samples
            with torch.no_grad():
                candidates = self.decode(self.top_down(heads, parts, noise)[0], hidden, base)  # (N, B, F)
                best = keypoint_error(candidates, target, self.config.keypoint_error).argmin(0)  # (B,)
            chosen = noise[best, torch.arange(batch, device=hidden.device)]  # (B, L*Z)
        else:
            chosen = noise[0]
        return self.top_down(heads, parts, chosen, detach)  # the chosen sample, with gradient

    def observe_deferred(  # type: ignore[override]
        self, carry: Carry | None, action: Tensor, target: Tensor, sampling: Sampling
    ) -> DeferredObserve:
        hidden = self.transition(carry, action)  # (B, H)
        # Residual keypoints: the decoder predicts the change from the previous frame's fed keypoints.
        base = self.residual_base(carry)
        # Each level's first-layer part that reads the frame: once per frame, shared by all samples.
        frame = torch.cat([target, hidden], dim=-1)  # (B, F+H)
        parts = list(self.posterior_frame(frame).chunk(self.levels, dim=-1))  # L x (B, posterior units)
        latent, posteriors = self.sample(self.posteriors, parts, hidden, base, target, sampling)
        readout = Readout(hidden, latent, base, by_level([q.mean for q in posteriors]),
                          by_level([q.std for q in posteriors]))
        return DeferredObserve(Carry(hidden, target, latent), hidden, readout)

    def readout(self, inputs: Readout) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        prediction = self.decode(inputs.latent, inputs.hidden, inputs.base)  # (N, F)
        return prediction, self.level_kl(inputs.hidden, inputs.latent, inputs.posterior_mean, inputs.posterior_std)

    def _imagine(self, carry: Carry | None, action: Tensor, target: Tensor | None, sampling: Sampling) -> Step:  # type: ignore[override]
        hidden = self.transition(carry, action)  # (B, H)
        base = self.residual_base(carry)
        parts = list(self.prior_frame(hidden).chunk(self.levels, dim=-1))  # L x (B, prior units)
        # The prior, trained by the KL only (detached) unless prior_future_gradient.
        detach = not self.config.prior_future_gradient
        latent, _ = self.sample(self.priors, parts, hidden, base, target, sampling, detach)
        prediction = self.decode(latent, hidden, base)  # (B, F)
        batch = hidden.shape[0]
        return Step(Carry(hidden, prediction, latent), prediction, hidden, hidden.new_zeros(batch, self.levels),
                    hidden.new_zeros(batch))
