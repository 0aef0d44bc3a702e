"""Dynamics (S1.1.2), best of many (eq. 8) and the loss terms, against hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from worldmodel.config import ModelConfig
from worldmodel.dynamics import VRNN, Carry, Gaussian, KeypointNormalizer
from worldmodel.dynamics_core import Sampling
from worldmodel.losses import (
    acceleration_loss,
    gaussian_kl,
    image_loss,
    keypoint_loss,
    separation_loss,
    sparsity_loss,
)
from worldmodel.model import Schedule, WorldModel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_kl_closed_form() -> None:
    # KL(N(1, 0.5^2) || N(0, 1)) = log(1 / 0.5) + (0.5^2 + 1^2) / 2 - 1/2
    kl = gaussian_kl(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert kl.item() == pytest.approx(math.log(2.0) + 1.25 / 2 - 0.5, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    mq, mp = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    sq, sp = torch.rand(4, 7, generator=g) + 0.1, torch.rand(4, 7, generator=g) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mq, sq), torch.distributions.Normal(mp, sp))
    torch.testing.assert_close(gaussian_kl(mq, sq, mp, sp), expected.sum(-1))
    assert gaussian_kl(mq, sq, mq, sq).abs().max().item() < 1e-6


def test_separation_loss_by_hand() -> None:
    # Keypoint 0 moves right by 0.1, keypoint 1 moves up by 0.1 (offsets do not matter: eq. 5 centres
    # each trajectory). Centred: k0 (-0.05, 0), (0.05, 0); k1 (0, -0.05), (0, 0.05). Differences per step
    # (-0.05, 0.05), (0.05, -0.05): squared norm 0.005 at both steps, so d_01 = d_10 = 0.005.
    # sigma = 0.1: exp(-0.005 / 0.02) = exp(-0.25); two off-diagonal terms / K(K-1) = 2 -> exp(-0.25).
    coords = torch.tensor([[[[0.0, 0.0], [0.5, 0.5]], [[0.1, 0.0], [0.5, 0.6]]]])  # (B=1, T=2, K=2, 2)
    assert separation_loss(coords, sigma=0.1).item() == pytest.approx(math.exp(-0.25), rel=1e-5)
    # Identical trajectories up to an offset overlap completely: loss 1. Far apart relative to sigma: ~0.
    same = torch.tensor([[[[0.0, 0.0], [0.7, -0.3]], [[0.1, 0.0], [0.8, -0.3]]]])
    assert separation_loss(same, sigma=0.1).item() == pytest.approx(1.0, abs=1e-6)
    assert separation_loss(coords, sigma=0.001).item() == pytest.approx(0.0, abs=1e-6)
    # The batch is averaged: one overlapping and one separated example give (1 + exp(-0.25)) / 2.
    both = torch.cat([same, coords])
    assert separation_loss(both, sigma=0.1).item() == pytest.approx((1 + math.exp(-0.25)) / 2, rel=1e-5)


def test_acceleration_loss_by_hand() -> None:
    # Keypoint 0 moves at constant velocity (no cost); keypoint 1 jumps by 0.5 in x at t = 2 and back at t = 3.
    # Its x: 0, 0, 0.5, 0, 0 -> second differences 0.5, -1.0, 0.5, squared sum 1.5 over 3 steps; K = 2 keypoints
    # and 3 steps -> mean 1.5 / 6 = 0.25.
    steady = torch.tensor([[0.1 * t, -0.2 * t] for t in range(5)])  # (T, 2)
    jumping = torch.zeros(5, 2)
    jumping[2, 0] = 0.5
    coordinates = torch.stack([steady, jumping], dim=1)[None]  # (B=1, T=5, K=2, 2)
    assert acceleration_loss(coordinates).item() == pytest.approx(0.25, rel=1e-6)
    assert acceleration_loss(steady[None, :, None]).item() == pytest.approx(0.0, abs=1e-12)
    assert acceleration_loss(coordinates[:, :2]).item() == 0.0  # fewer than 3 frames: no second difference
    # The gradient pulls the spike back toward its neighbours.
    coordinates.requires_grad_(True)
    acceleration_loss(coordinates).backward()
    assert coordinates.grad is not None and coordinates.grad[0, 2, 1, 0] > 0 and coordinates.grad[0, 1, 1, 0] < 0


def test_reconstruction_and_sparsity_losses_by_hand() -> None:
    target = torch.zeros(2, 3, 4, 4)
    recon = torch.zeros(2, 3, 4, 4)
    recon[0, 0, 0, 0] = 2.0  # frame 0: 0.5 * 4 = 2; frame 1: 0 -> mean 1
    assert image_loss(recon, target).item() == pytest.approx(1.0)
    assert keypoint_loss(torch.ones(2, 3, 6), torch.zeros(2, 3, 6)).item() == pytest.approx(3.0)  # 0.5 * 6
    assert keypoint_loss(torch.ones(2, 0, 6), torch.zeros(2, 0, 6)).item() == 0.0
    # Laplace decoder: |error| summed over features; -2 and +1 per feature -> 3 per feature, 18 per step.
    prediction, target = torch.full((2, 3, 6), -2.0), torch.zeros(2, 3, 6)
    target[1] = 3.0
    assert keypoint_loss(prediction, target, "absolute").item() == pytest.approx((6 * 2 + 6 * 5) / 2)
    with pytest.raises(ValueError, match="absolute"):
        keypoint_loss(prediction, target, "cubed")
    assert sparsity_loss(torch.tensor([[0.5, -1.5, 0.0, 1.0]])).item() == pytest.approx(0.75)


class FirstFeatures(nn.Module):
    """A stand-in decoder: x^ = the first F entries of z (the hidden state is ignored)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features

    def forward(self, latent: Tensor, hidden: Tensor) -> Tensor:
        return latent[..., : self.features]


@pytest.mark.parametrize("error", ["squared", "absolute"])
def test_best_of_many_picks_the_closest_sample(error: str) -> None:
    config = ModelConfig.smoke(num_keypoints=2, latent_size=8, keypoint_error=error)  # F = 6 <= Z = 8
    vrnn = VRNN(config)
    vrnn.decoder = FirstFeatures(config.feature_size)  # type: ignore[assignment]
    batch, n, z = 5, 64, config.latent_size
    belief = Gaussian(torch.zeros(batch, z), torch.ones(batch, z))
    hidden = torch.zeros(batch, config.rnn_size)
    target = torch.full((batch, config.feature_size), 0.5)
    latent = vrnn.sample(belief, hidden, target, Sampling(n, torch.Generator().manual_seed(3)))
    x = vrnn.decode(latent, hidden, None)
    # The same draws by hand: the sample whose first 6 entries are closest to the target.
    noise = torch.randn((n, batch, z), generator=torch.Generator().manual_seed(3))
    difference = noise[..., : config.feature_size] - target
    distances = (difference.square() if error == "squared" else difference.abs()).sum(-1)  # (N, B)
    best = noise[distances.argmin(0), torch.arange(batch)]
    torch.testing.assert_close(latent, best)
    torch.testing.assert_close(x, best[:, : config.feature_size])
    chosen = (x - target).square() if error == "squared" else (x - target).abs()
    assert (chosen.sum(-1)[None] <= distances + 1e-6).all()
    # Without a target (imagination) a single sample is drawn.
    latent = vrnn.sample(belief, hidden, None, Sampling(n, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(latent, torch.randn((1, batch, z), generator=torch.Generator().manual_seed(3))[0])


def test_best_of_many_gradient_is_the_chosen_samples_own() -> None:
    """The loss of the best of N samples has exactly the gradient of a plain reparameterised sample drawn with
    the chosen noise (eq. 8: the other candidates and the choice itself carry no gradient)."""
    torch.manual_seed(0)
    config = ModelConfig.smoke(keypoint_error="squared")  # the choice below is by squared error
    vrnn = VRNN(config)
    batch, n = 3, 10
    generator = torch.Generator().manual_seed(5)
    mean0 = torch.randn(batch, config.latent_size, generator=generator)
    std0 = torch.rand(batch, config.latent_size, generator=generator) + 0.5
    hidden = torch.randn(batch, config.rnn_size, generator=generator)
    target = torch.randn(batch, config.feature_size, generator=generator)
    noise = torch.randn(n, batch, config.latent_size, generator=generator)

    def gradients(chosen: Tensor | None) -> tuple[Tensor, ...]:
        """d loss / d (mean, std, decoder weights): through vrnn.sample (None), or one given noise (B, Z)."""
        mean, std = mean0.clone().requires_grad_(), std0.clone().requires_grad_()
        if chosen is None:
            x = vrnn.decode(vrnn.sample(Gaussian(mean, std), hidden, target, Sampling(n, None, noise)), hidden, None)
        else:
            x = vrnn.decoder(mean + std * chosen, hidden)
        loss = (x - target).square().sum()
        return torch.autograd.grad(loss, [mean, std, *vrnn.decoder.parameters()])

    with torch.no_grad():
        candidates = vrnn.decoder(mean0 + std0 * noise, hidden)  # (N, B, F)
        best = (candidates - target).square().sum(-1).argmin(0)  # (B,)
    assert (best != 0).any()  # not the first sample, which a choice ignoring the target would keep
    through_sample = gradients(None)
    for got, expected in zip(through_sample, gradients(noise[best, torch.arange(batch)]), strict=True):
        torch.testing.assert_close(got, expected)
    # Another sample's gradient differs: the comparison above can fail.
    other = noise[(best + 1) % n, torch.arange(batch)]
    assert not torch.allclose(through_sample[0], gradients(other)[0])


def unroll_model(variant: str = "struct-vrnn", **overrides: object) -> WorldModel:
    torch.manual_seed(0)
    return WorldModel(ModelConfig.smoke(variant=variant, **overrides))


def test_prediction_of_next_frame_depends_on_current_action() -> None:
    model = unroll_model()
    k = model.config.num_keypoints
    keypoints = torch.rand(2, 6, k, 3) * 2 - 1
    actions = torch.rand(2, 6, 6) * 2 - 1
    t = 2
    perturbed = actions.clone()
    perturbed[:, t] += 0.5

    def rollout(a: Tensor) -> tuple[Tensor, Tensor]:
        # Observe frames 0..t, then predict t+1.. open loop with the prior from the actions a[:, t:].
        observed = model.observe(keypoints[:, : t + 1], a[:, : t + 1], generator=torch.Generator().manual_seed(1))
        future = model.imagine(observed.final, a[:, t:-1], generator=torch.Generator().manual_seed(2))
        return observed.keypoints, future.keypoints

    base_obs, base_future = rollout(actions)
    pert_obs, pert_future = rollout(perturbed)
    torch.testing.assert_close(base_obs, pert_obs)  # frames 0..t do not depend on a_t
    assert (base_future[:, 0] - pert_future[:, 0]).abs().max() > 1e-4  # frame t+1 does

    # The training path (dynamics_losses' unroll): h_{t+1} reads a_t, h_t does not.
    def hidden(a: Tensor) -> Tensor:
        return model.observe(keypoints, a, generator=torch.Generator().manual_seed(1)).hidden

    h, h_pert = hidden(actions), hidden(perturbed)
    torch.testing.assert_close(h[:, : t + 1], h_pert[:, : t + 1])
    assert (h[:, t + 1] - h_pert[:, t + 1]).abs().max() > 1e-6


def test_teacher_forcing_feeds_the_targets() -> None:
    model = unroll_model()
    f = model.config.feature_size
    targets = torch.randn(2, 4, f)
    actions = torch.zeros(2, 4, 6)
    forced = model.dynamics.unroll(actions, targets, num_observed=2, teacher_forcing=(1.0, 1.0))
    assert torch.equal(forced.final.keypoints, targets[:, -1])
    free = model.dynamics.unroll(actions, targets, num_observed=2, teacher_forcing=(0.0, 0.0))
    assert torch.equal(free.final.keypoints, free.keypoints[:, -1])
    assert forced.kl.shape == (2, 2)


def test_prior_is_trained_by_kl_only_without_prior_future_gradient() -> None:
    """The paper's code (``prior_future_gradient=False``); the other case: tests/test_dynamics_cores.py."""
    model = unroll_model(prior_future_gradient=False)
    f = model.config.feature_size
    out = model.dynamics.unroll(torch.zeros(2, 5, 6), torch.randn(2, 5, f), num_observed=2, num_samples=4)
    future_error = out.keypoints[:, 2:].square().sum()
    assert model.dynamics.prior is not None
    grads = torch.autograd.grad(future_error, list(model.dynamics.prior.parameters()), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    kl_grads = torch.autograd.grad(out.kl.sum(), list(model.dynamics.prior.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in kl_grads)


def test_struct_rnn_is_deterministic() -> None:
    model = unroll_model("struct-rnn")
    keypoints, actions = torch.rand(2, 5, model.config.num_keypoints, 3), torch.rand(2, 5, 6)
    losses = model.dynamics_losses(keypoints, actions, 3, Schedule(1.0, 0.0, 0.0))
    assert losses.kl.item() == 0.0
    a = model.observe(keypoints, actions)
    b = model.observe(keypoints, actions)
    assert torch.equal(a.keypoints, b.keypoints) and a.final.carry.latent.shape == (2, 0)


def test_dynamics_run_in_float32_under_autocast() -> None:
    model = unroll_model()
    keypoints, actions = torch.rand(2, 5, model.config.num_keypoints, 3), torch.rand(2, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout = model.observe(keypoints, actions)
        losses = model.dynamics_losses(keypoints, actions, 3, Schedule())
    assert rollout.keypoints.dtype == torch.float32 and rollout.hidden.dtype == torch.float32
    assert losses.total.dtype == torch.float32


def test_keypoint_normalizer_fit() -> None:
    # Two sequences: feature 0 alternates +-1 around 5 and 7 (within-sequence std 1, mean 6); feature 1
    # is constant per sequence (within std 0 -> the floor).
    x = torch.zeros(2, 4, 2)
    x[0, :, 0] = torch.tensor([4.0, 6.0, 4.0, 6.0])
    x[1, :, 0] = torch.tensor([6.0, 8.0, 6.0, 8.0])
    x[0, :, 1], x[1, :, 1] = 1.0, 3.0
    norm = KeypointNormalizer(2, std_floor=0.05)
    norm.fit(x)
    torch.testing.assert_close(norm.mean, torch.tensor([6.0, 2.0]))
    torch.testing.assert_close(norm.std, torch.tensor([1.0, 0.05]))
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)


def test_imagine_from_observed_state_continues_the_recurrence() -> None:
    model = unroll_model()
    k, h = model.config.num_keypoints, model.config.rnn_size
    observed = model.observe(torch.rand(3, 4, k, 3), torch.rand(3, 4, 6))
    assert observed.final.hidden.shape == (3, h) and observed.final.keypoints.shape == (3, k, 3)
    torch.testing.assert_close(observed.final.hidden, observed.hidden[:, -1])
    future = model.imagine(observed.final, torch.rand(3, 7, 6))
    assert future.keypoints.shape == (3, 7, k, 3) and future.hidden.shape == (3, 7, h)
    state = observed.final.carry
    assert isinstance(state, Carry)
    assert state.latent.shape == (3, model.config.latent_size)
