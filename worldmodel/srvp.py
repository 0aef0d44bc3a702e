"""SRVP: a stochastic residual state-space model (Franceschi et al. 2020, eq. 1-7) on keypoints and actions.

Generative model, per frame (normalised keypoints x_t (B, F), zero-padded actions a_t (B, A)):

    y_1 ~ N(0, I)                                             (eq. 1; inferred from frames, see below)
    z_{t+1} ~ N(mu(y_t, a_t), sigma(y_t, a_t))                 prior: the state and the action it receives
    y_{t+1} = y_t + dt f(y_t, z_{t+1}, a_t), 1/dt times       residual (Euler) update, z held (eq. 1-2)
    x_t ~ N(g(y_t), const)                                     decoded from y_t alone

Inference (eq. 5), run one observed frame at a time so that a state never depends on later frames:

    e_t = enc(x_t);  r_t = GRU(r_{t-1}, [e_t, a_{t-1}])       the filter over the observed frames
    q(z_t | x_{<=t}) = N(head(r_t))                             posterior of the latent that produces frame t
    q(y | x_{1:j}) = N(init([e_1, ..., e_j, 0, ..., 0]))        for the first j <= k frames (k slots)

The first k frames of a sequence are the warm-up: frame j's state is drawn from q(y | x_{1:j}) (the same
net with the unseen slots zero), so at frame k it is the paper's q(y_1 | x_{1:k}); after that the state
only moves by residual steps with posterior z. Imagination continues from the last observed y with prior z,
so an imagined episode's y_1 comes from its context frames. KL terms (eq. 6): KL(q(y | .) || N(0, I)) on
the warm-up frames and KL(q(z_t | .) || p(z_t | y_{t-1}, a_{t-1})) after; the L2 penalty on the residuals
f (eq. 7) is the core's regulariser. There is no content variable: appearance comes from the reference
frame in the image decoder. The hidden state exposed to reward predictors and agents is y_t.

Training choices (``DynamicsCore`` attributes):
- posterior at every frame of the training window (``posterior_in_training``): as the paper, the prior is
  trained by the KL on z alone, and the residual f and the decoder only ever see posterior latents, whose
  KL keeps them close to what the prior can reach. Imagined frames are never part of the objective.
- no best of many (``best_of = 1``): eq. 6 is a plain ELBO with one sample per sequence; choosing the
  best of N posterior samples would bias the posterior towards whatever sample decodes best and widen the
  gap to the prior. (Evaluation may still ask for the best of N prior samples: the mechanism is there.)
- no scheduled sampling: the decoded keypoints are never fed back (y evolves in its own space), so there
  is nothing to teacher-force.

``struct-rnn`` (no latent) makes it deterministic: y from the mean of q(y | .), no z, no KL.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.config import ModelConfig
from worldmodel.dynamics import Gaussian, GaussianHead, dense
from worldmodel.dynamics_core import DynamicsCore, Sampling, Step
from worldmodel.losses import gaussian_kl, keypoint_error


class SRVPCarry(NamedTuple):
    """What SRVP carries after a frame."""

    state: Tensor  # (B, Y) y_t
    keypoints: Tensor  # (B, F) x^_t = g(y_t), normalised
    filter: Tensor  # (B, U) r_t, the posterior filter's GRU state after the last observed frame
    frames: Tensor  # (B, k, E) encodings of the first k observed frames (zero until seen)
    count: Tensor  # (B,) int64, frames observed so far


def mlp(in_features: int, units: int, out_features: int, hidden_layers: int = 1) -> nn.Sequential:
    """``hidden_layers`` dense ReLU layers of ``units``, then a linear output."""
    layers: list[nn.Module] = []
    size = in_features
    for _ in range(hidden_layers):
        layers += [dense(size, units), nn.ReLU()]
        size = units
    layers.append(dense(size, out_features))
    return nn.Sequential(*layers)


def standard_kl(belief: Gaussian) -> Tensor:
    """KL(belief || N(0, I)) summed over the last dim: (..., D) -> (...)."""
    return gaussian_kl(belief.mean, belief.std, torch.zeros_like(belief.mean), torch.ones_like(belief.std))


def where_rows(mask: Tensor, a: Step, b: Step) -> Step:
    """Row-wise choice between two steps: a where mask (B,), else b (all fields, carries included)."""

    def pick(x: object, y: object) -> object:
        if isinstance(x, tuple):
            return type(x)(*(pick(p, q) for p, q in zip(x, y)))  # type: ignore[arg-type]
        assert isinstance(x, Tensor) and isinstance(y, Tensor)
        return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x, y)

    return pick(a, b)  # type: ignore[return-value]


@torch.compiler.disable
def warm_rows(count: Tensor, init_frames: int) -> tuple[Tensor, bool, bool]:
    """Which rows (B,) are still in the warm-up (count < init_frames), and whether all or none are, so that a step
    runs only the branch some row needs. Outside any compiled graph, on purpose: the decision reads the counts'
    values, which a graph cannot branch on. Traced instead (both branches computed, then each row's), SRVP's
    `cpu` training unroll had not compiled after 11 minutes, against ~20 s with the unroll split here."""
    warm = count < init_frames
    all_warm = bool(warm.all())
    return warm, all_warm, not all_warm and not bool(warm.any())


class SRVP(DynamicsCore):
    """Residual state-space dynamics; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        features, actions, units = config.feature_size, config.action_dim, config.srvp_units
        state, latent, k = config.srvp_state_size, config.latent_dim, config.srvp_init_frames
        self.encode = mlp(features, units, units)  # e_t
        self.filter = nn.GRUCell(units + actions, units)  # r_t
        self.initial = GaussianHead(k * units, units, state)  # q(y | x_{1:j})
        self.posterior = GaussianHead(units, units, latent) if latent else None  # q(z_t | x_{<=t})
        self.prior = GaussianHead(state + actions, units, latent) if latent else None  # p(z_{t+1} | y_t, a_t)
        self.residual = mlp(state + latent + actions, units, state, hidden_layers=2)  # f
        self.decoder = mlp(state, units, features)  # g
        self.substeps = int(round(1.0 / config.srvp_dt))
        self.hidden_size = state
        self.hidden_bound = float("inf")
        self.noise_size = max(state, latent) if latent else 0  # warm-up frames read Y numbers, others Z
        self.best_of = 1
        self.posterior_in_training = True
        self.scheduled_sampling = False
        self.kl_names = ("y1", "z")
        self.regulariser_weight = config.srvp_residual_weight

    def initial_carry(self, batch_size: int, device: torch.device) -> SRVPCarry:
        """The start of a sequence (nothing observed yet); ``observe_step(None, ...)`` starts from it."""
        cfg = self.config
        zeros = lambda *shape: torch.zeros(batch_size, *shape, device=device)  # noqa: E731
        return SRVPCarry(
            zeros(cfg.srvp_state_size), zeros(cfg.feature_size), zeros(cfg.srvp_units),
            zeros(cfg.srvp_init_frames, cfg.srvp_units), torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def hidden_state(self, carry: SRVPCarry) -> Tensor:  # type: ignore[override]
        return carry.state

    def keypoints(self, carry: SRVPCarry) -> Tensor:  # type: ignore[override]
        return carry.keypoints

    # ---- pieces ---------------------------------------------------------------------------------------
    def advance(self, state: Tensor, latent: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """y_{t+1} = y_t + dt f(y_t, z, a) applied 1/dt times (eq. 2), with leading sample dims allowed.

        state (..., B, Y), latent (..., B, Z), action (B, A) -> y_{t+1} (..., B, Y) and the mean over the
        sub-steps of ||f||^2 (..., B) (eq. 7's penalty)."""
        shape = torch.broadcast_shapes(state.shape[:-1], latent.shape[:-1], action.shape[:-1])
        latent, action = latent.expand(*shape, -1), action.expand(*shape, -1)
        dt = 1.0 / self.substeps
        penalty = state.new_zeros(shape)
        for _ in range(self.substeps):
            change = self.residual(torch.cat([state.expand(*shape, -1), latent, action], dim=-1))  # (..., B, Y)
            penalty = penalty + change.square().sum(-1)
            state = state + dt * change
        return state, penalty / self.substeps

    def _choose(self, noise: Tensor, candidates: Tensor, target: Tensor | None) -> Tensor:
        """Best of many: the noise row (B, D) whose decoded candidate (N, B, F) is closest to the target."""
        if target is None or noise.shape[0] == 1:
            return noise[0]
        best = keypoint_error(candidates, target, self.config.keypoint_error).argmin(0)  # (B,)
        return noise[best, torch.arange(noise.shape[1], device=noise.device)]

    def _warmup(self, carry: SRVPCarry, encoded: Tensor, filtered: Tensor, target: Tensor, noise: Tensor) -> Step:
        """Frame j <= k: y ~ q(y | x_{1:j}) from the encodings so far."""
        k = self.config.srvp_init_frames
        slot = F.one_hot(carry.count.clamp(max=k - 1), k).to(encoded.dtype)  # (B, k)
        frames = carry.frames + slot[..., None] * encoded[:, None]  # (B, k, E): frame j in slot j
        belief = self.initial(frames.flatten(1))  # (B, Y)
        batch = target.shape[0]
        if self.prior is None:  # deterministic
            state, kl = belief.mean, belief.mean.new_zeros(batch)
        else:
            eps = noise[..., : belief.mean.shape[-1]]  # (N, B, Y)
            if eps.shape[0] > 1:
                with torch.no_grad():
                    candidates = self.decoder(belief.mean + belief.std * eps)  # (N, B, F)
                eps = self._choose(eps, candidates, target)[None]
            state, kl = belief.mean + belief.std * eps[0], standard_kl(belief)  # (B, Y), (B,)
        prediction = self.decoder(state)  # (B, F)
        new = SRVPCarry(state, prediction, filtered, frames, carry.count + 1)
        zero = kl.new_zeros(batch)
        return Step(new, prediction, state, torch.stack([kl, zero], dim=-1), zero)

    def _transition(
        self, carry: SRVPCarry, action: Tensor, posterior: Gaussian | None, target: Tensor | None, noise: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One residual step with posterior z (observed) or prior z: -> y, x^, kl_z (B,), penalty (B,)."""
        batch = action.shape[0]
        if self.prior is None:  # deterministic: no z
            state, penalty = self.advance(carry.state, action.new_zeros(batch, 0), action)
            return state, self.decoder(state), action.new_zeros(batch), penalty
        prior = self.prior(torch.cat([carry.state, action], dim=-1))  # p(z | y_{t-1}, a_{t-1})
        # As the VRNN: the prior is trained by its KL only, never through imagined frames.
        belief = posterior if posterior is not None else prior.detach()
        eps = noise[..., : belief.mean.shape[-1]]  # (N, B, Z)
        if eps.shape[0] > 1 and target is not None:
            with torch.no_grad():
                candidates = self.decoder(self.advance(carry.state, belief.mean + belief.std * eps, action)[0])
            eps = self._choose(eps, candidates, target)[None]
        latent = belief.mean + belief.std * eps[0]  # (B, Z), reparameterised
        state, penalty = self.advance(carry.state, latent, action)
        kl = gaussian_kl(posterior.mean, posterior.std, prior.mean, prior.std) if posterior is not None else None
        return state, self.decoder(state), action.new_zeros(batch) if kl is None else kl, penalty

    # ---- the interface ----------------------------------------------------------------------------------
    def _observe(self, carry: SRVPCarry | None, action: Tensor, target: Tensor, sampling: Sampling) -> Step:  # type: ignore[override]
        batch = target.shape[0]
        carry = self.initial_carry(batch, target.device) if carry is None else carry
        noise = sampling.draws(batch, self.noise_size, target, target)
        encoded = self.encode(target)  # (B, E)
        filtered = self.filter(torch.cat([encoded, action], dim=-1), carry.filter)  # r_t (B, U)
        warm, all_warm, none_warm = warm_rows(carry.count, self.config.srvp_init_frames)
        warmup = None if none_warm else self._warmup(carry, encoded, filtered, target, noise)
        if all_warm:
            assert warmup is not None
            return warmup
        posterior = self.posterior(filtered) if self.posterior is not None else None  # q(z_t | x_{<=t})
        state, prediction, kl, penalty = self._transition(carry, action, posterior, target, noise)
        new = SRVPCarry(state, prediction, filtered, carry.frames, carry.count + 1)
        step = Step(new, prediction, state, torch.stack([kl.new_zeros(batch), kl], dim=-1), penalty)
        return step if warmup is None else where_rows(warm, warmup, step)

    def _imagine(self, carry: SRVPCarry | None, action: Tensor, target: Tensor | None, sampling: Sampling) -> Step:  # type: ignore[override]
        if carry is None:
            raise ValueError("SRVP imagines from an observed state: observe at least one frame first")
        batch = action.shape[0]
        noise = sampling.draws(batch, self.noise_size, action, target)
        state, prediction, _, penalty = self._transition(carry, action, None, target, noise)
        zero = penalty.new_zeros(batch)
        # The filter and the warm-up slots hold: nothing was observed.
        new = SRVPCarry(state, prediction, carry.filter, carry.frames, carry.count)
        return Step(new, prediction, state, torch.stack([zero, zero], dim=-1), penalty)
