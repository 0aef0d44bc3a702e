"""The dynamics-core interface (worldmodel/dynamics_core.py) for every core: VRNN, SRVP, hierarchical VRNN."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

from worldmodel.checkpoint import load_world_model, model_config_from_dict, save_checkpoint
from worldmodel.config import DYNAMICS, ModelConfig
from worldmodel.dynamics import VRNN, GaussianHead
from worldmodel.dynamics_core import DynamicsCore, Unroll
from worldmodel.hvrnn import HierarchicalVRNN, LevelHead
from worldmodel.losses import gaussian_kl, keypoint_error
from worldmodel.model import Schedule, WorldModel, frames_to_images, previous_actions
from worldmodel.srvp import SRVP, SRVPCarry
from worldmodel.train_config import Stage, TrainConfig
from worldmodel.training import schedule_at

CORES = list(DYNAMICS)
SPEED = 0.3  # keypoint units per frame per unit of action (synthetic motion)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smoke_model(dynamics: str, seed: int = 0, **overrides: object) -> WorldModel:
    torch.manual_seed(seed)
    sizes = {"srvp_state_size": 16, "srvp_units": 32, **overrides}
    return WorldModel(ModelConfig.smoke(dynamics=dynamics, **sizes))


class Window(NamedTuple):
    keypoints: Tensor  # (B, T, K, 3) in [-1, 1]
    actions: Tensor  # (B, T, 6) in [-1, 1]
    targets: Tensor  # (B, T, K*3) the keypoints through the model's normaliser, as the core sees them


def random_window(model: WorldModel, batch: int = 3, steps: int = 8, seed: int = 1) -> Window:
    g = torch.Generator().manual_seed(seed)
    keypoints = torch.rand(batch, steps, model.config.num_keypoints, 3, generator=g) * 2 - 1
    actions = torch.rand(batch, steps, 6, generator=g) * 2 - 1
    return Window(keypoints, actions, model.normalizer.normalize(keypoints.flatten(2)))


def best_of_unroll(model: WorldModel, window: Window, num_observed: int) -> Unroll:
    """The core's training unroll of a window, with its best-of-many samples."""
    core = model.dynamics
    return core.unroll(previous_actions(window.actions), window.targets, num_observed=num_observed, num_samples=core.best_of)


@pytest.mark.parametrize("dynamics", CORES)
def test_shapes_and_loss_terms(dynamics: str) -> None:
    model = smoke_model(dynamics)
    core = model.dynamics
    keypoints, actions, targets = random_window(model, batch=3, steps=7)
    unroll = core.unroll(previous_actions(actions), targets, num_observed=4, num_samples=core.best_of)
    f, h, levels = model.config.feature_size, core.hidden_size, len(core.kl_names)
    assert unroll.keypoints.shape == (3, 7, f) and unroll.hidden.shape == (3, 7, h)
    assert unroll.kl.shape == (3, 4) and unroll.kl_terms.shape == (3, 4, levels) and unroll.regulariser.shape == (3, 7)
    assert core.hidden_state(unroll.final).shape == (3, h) and core.keypoints(unroll.final).shape == (3, f)
    torch.testing.assert_close(core.hidden_state(unroll.final), unroll.hidden[:, -1], rtol=0, atol=0)
    expected_levels = {"vrnn": 1, "srvp": 2, "hvrnn": model.config.hvrnn_levels}[dynamics]
    assert levels == expected_levels
    losses = core.losses(unroll, targets, 4, kl_scale=1.0)
    assert losses.kl_terms.shape == (levels,)
    torch.testing.assert_close(losses.kl, losses.kl_terms.sum())
    assert losses.future.item() > 0 and losses.keypoint.item() > 0
    # WorldModel's views and the zero carry allocated for buffers.
    observed = model.observe(keypoints[:, :4], actions[:, :4])
    assert observed.final.hidden.shape == (3, h) and observed.final.keypoints.shape == (3, model.config.num_keypoints, 3)
    zero = core.initial_carry(5, torch.device("cpu"))
    assert type(zero) is type(unroll.final) and all(part.shape[0] == 5 for part in zero)
    noise = torch.zeros(1, 3, core.noise_size)
    assert core.imagine_step(unroll.final, actions[:, 0], noise=noise).hidden.shape == (3, h)


@pytest.mark.parametrize("dynamics", CORES)
def test_next_frame_depends_on_a_t_and_not_on_a_t_plus_1(dynamics: str) -> None:
    model = smoke_model(dynamics)
    keypoints, actions, targets = random_window(model, batch=2, steps=8)
    t = 4  # frames 0..4 observed (>= SRVP's k = 3), frame 5 is the first imagined one

    def predicted(a: Tensor) -> Tensor:
        observed = model.observe(keypoints[:, : t + 1], a[:, : t + 1], generator=torch.Generator().manual_seed(1))
        future = model.imagine(observed.final, a[:, t : t + 2], generator=torch.Generator().manual_seed(2))
        return torch.cat([observed.keypoints, future.keypoints], 1)  # frames 0 .. t+2

    base = predicted(actions)
    for moved, changes_from in ((t, t + 1), (t + 1, t + 2)):
        perturbed = actions.clone()
        perturbed[:, moved] += 0.7
        other = predicted(perturbed)
        torch.testing.assert_close(other[:, :changes_from], base[:, :changes_from], rtol=0, atol=0)
        assert (other[:, changes_from] - base[:, changes_from]).abs().max() > 1e-5

    # The training path (observe over the whole window): the state of frame t+1 reads a_t, not a_{t+1}.
    def hidden(a: Tensor) -> Tensor:
        return model.observe(keypoints, a, generator=torch.Generator().manual_seed(1)).hidden

    h = hidden(actions)
    perturbed = actions.clone()
    perturbed[:, t] -= 0.7
    h_pert = hidden(perturbed)
    torch.testing.assert_close(h_pert[:, : t + 1], h[:, : t + 1], rtol=0, atol=0)
    assert (h_pert[:, t + 1] - h[:, t + 1]).abs().max() > 1e-6


@pytest.mark.parametrize("dynamics", CORES)
def test_deterministic_under_a_seed(dynamics: str) -> None:
    def losses(model_seed: int, sample_seed: int) -> Tensor:
        model = smoke_model(dynamics, seed=model_seed)
        keypoints, actions, targets = random_window(model)
        out = model.dynamics_losses(keypoints, actions, 4, Schedule(1.0, 0.5, 0.5), torch.Generator().manual_seed(sample_seed))
        return torch.stack(list(out))

    assert torch.equal(losses(0, 3), losses(0, 3))
    assert not torch.equal(losses(0, 3), losses(0, 4))  # the draws matter
    assert not torch.equal(losses(0, 3), losses(1, 3))  # so do the weights


@pytest.mark.parametrize("dynamics", CORES)
def test_no_gradient_from_the_dynamics_reaches_the_detector(dynamics: str) -> None:
    model = smoke_model(dynamics)
    frames = torch.randint(0, 256, (2, 6, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    keypoints = model.encode(frames_to_images(frames)).view(2, 6, model.config.num_keypoints, 3)  # with gradient
    assert keypoints.requires_grad
    losses = model.dynamics_losses(keypoints, torch.rand(2, 6, 6), 4, Schedule(1.0, 0.5, 0.5))
    assert model.detector is not None
    detector = list(model.detector.parameters())
    grads = torch.autograd.grad(losses.total, detector + list(model.dynamics.parameters()), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads[: len(detector)])
    assert sum(float(g.abs().sum()) for g in grads[len(detector) :] if g is not None) > 0


@pytest.mark.parametrize("dynamics", CORES)
def test_single_steps_reproduce_unroll_exactly(dynamics: str) -> None:
    model = smoke_model(dynamics)
    core = model.dynamics
    keypoints, actions, targets = random_window(model, batch=3, steps=8)
    inputs = previous_actions(actions)
    samples, forcing, observed = core.best_of, (0.6, 0.4), 5
    unroll = core.unroll(inputs, targets, num_observed=observed, num_samples=samples, teacher_forcing=forcing,
                         generator=torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    carry = None
    predictions, hiddens, kls = [], [], []
    for t in range(8):
        if t < observed:
            step = core.observe_step(carry, inputs[:, t], targets[:, t], samples, generator)
            kls.append(step.kl)
        else:
            step = core.imagine_step(carry, inputs[:, t], targets[:, t], samples, generator)
        carry = step.carry
        p = forcing[0] if t < observed else forcing[1]
        if core.scheduled_sampling and not (t < observed and core.config.feed_detected):  # observed: fed already
            coin = torch.rand((3, 1), generator=generator)
            carry = core.feed(carry, torch.where(coin < p, targets[:, t], step.prediction))
        predictions.append(step.prediction)
        hiddens.append(step.hidden)
    assert torch.equal(torch.stack(predictions, 1), unroll.keypoints)
    assert torch.equal(torch.stack(hiddens, 1), unroll.hidden)
    assert torch.equal(torch.stack(kls, 1), unroll.kl_terms)
    assert carry is not None and all(torch.equal(a, b) for a, b in zip(carry, unroll.final))


@pytest.mark.parametrize("dynamics", CORES)
@pytest.mark.parametrize("feed_detected", [True, False])
def test_a_deferred_readout_gives_the_frame_by_frame_losses_and_gradients(dynamics: str, feed_detected: bool) -> None:
    """Training reads the observed frames' decoded keypoints and KL terms out after the loop, all frames at once,
    where nothing in the next step reads them: the same unroll, losses and gradients to float rounding; a core
    whose next step reads them (fed-back predictions, or SRVP) computes them frame by frame, exactly as before."""
    model = smoke_model(dynamics, feed_detected=feed_detected, residual_keypoints=True)
    core = model.dynamics
    keypoints, actions, targets = random_window(model, batch=3, steps=8)
    inputs = previous_actions(actions)
    assert core.defers_readout() == (feed_detected and dynamics != "srvp")

    def unroll(deferred: bool) -> Unroll:
        return core.unroll(inputs, targets, num_observed=5, num_samples=core.best_of, teacher_forcing=(0.6, 0.4),
                           generator=torch.Generator().manual_seed(9), deferred_readout=deferred)

    frame_by_frame, deferred = unroll(False), unroll(True)
    compare = torch.testing.assert_close if core.defers_readout() else lambda a, b: torch.equal(a, b) or pytest.fail()
    for field in ("keypoints", "hidden", "kl_terms", "regulariser"):
        compare(getattr(deferred, field), getattr(frame_by_frame, field))
    for a, b in zip(deferred.final, frame_by_frame.final):
        compare(a, b)
    assert not torch.equal(deferred.keypoints[:, 0], deferred.keypoints[:, 1])  # every frame read out, in order

    parameters = list(core.parameters())

    def gradients(deferred: bool) -> tuple[Tensor, list[Tensor | None]]:
        losses = model.dynamics_losses(keypoints, actions, 5, Schedule(1.0, 0.6, 0.4), torch.Generator().manual_seed(3),
                                       deferred_readout=deferred)
        return losses.total, list(torch.autograd.grad(losses.total, parameters, allow_unused=True))

    (total, grads), (reference, reference_grads) = gradients(True), gradients(False)
    torch.testing.assert_close(total, reference)
    assert sum(g is not None for g in grads) > len(parameters) // 2
    for g, r in zip(grads, reference_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


VARIATIONS = [{}, {"feed_detected": False}, {"future_best_of": True}, {"variant": "struct-rnn"}]


@pytest.mark.parametrize(
    "dynamics, overrides",
    [(core, overrides) for core in CORES for overrides in VARIATIONS
     if not (core == "hvrnn" and overrides.get("variant") == "struct-rnn")],  # a hierarchy needs a latent
)
def test_draws_made_beforehand_reproduce_the_generators_unroll_exactly(dynamics: str, overrides: dict[str, object]) -> None:
    """``draw_randomness`` makes the unroll's draws (latent noise, scheduled-sampling coins) in the order the unroll
    makes them, so the unroll on them is the generator's, bit for bit (what lets the trainer compile the loop)."""
    model = smoke_model(dynamics, **overrides)
    core = model.dynamics
    _, actions, targets = random_window(model, batch=3, steps=8)
    inputs, forcing = previous_actions(actions), (0.6, 0.4)
    observed = 8 if core.posterior_in_training else 5
    imagined = None if model.config.future_best_of else 1
    reference = core.unroll(inputs, targets, num_observed=observed, num_samples=core.best_of, teacher_forcing=forcing,
                            generator=torch.Generator().manual_seed(9), imagined_samples=imagined)
    randomness = core.draw_randomness(3, 8, observed, core.best_of, forcing, torch.Generator().manual_seed(9),
                                      imagined_samples=imagined)
    drawn = core.unroll(inputs, targets, num_observed=observed, num_samples=core.best_of, imagined_samples=imagined,
                        randomness=randomness)
    for field in ("keypoints", "hidden", "kl_terms", "regulariser"):
        assert torch.equal(getattr(drawn, field), getattr(reference, field)), field
    assert any(mask is not None for mask in randomness.feed_target) == (core.scheduled_sampling and dynamics != "srvp")
    with pytest.raises(ValueError, match="draws made beforehand"):
        core.unroll(inputs, targets, num_observed=observed, compiled=True)


def same_posterior_and_prior(core: DynamicsCore) -> None:
    """Make every posterior head output the same constant Gaussian as its prior head."""

    def constant(head: nn.Module, bias: Tensor) -> None:
        for module in head.modules():
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
        out = head.out
        assert isinstance(out, nn.Linear)
        out.bias.data.copy_(bias)

    if isinstance(core, HierarchicalVRNN):
        for projection in (core.prior_frame, core.posterior_frame):  # the heads' shared first-layer part
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)
        pairs = list(zip(core.posteriors, core.priors))
    else:
        assert isinstance(core, (VRNN, SRVP)) and core.posterior is not None and core.prior is not None
        pairs = [(core.posterior, core.prior)]
    for posterior, prior in pairs:
        assert isinstance(posterior, (GaussianHead, LevelHead)) and isinstance(prior, (GaussianHead, LevelHead))
        bias = torch.linspace(-1, 1, prior.out.bias.numel())
        constant(posterior, bias)
        constant(prior, bias)


@pytest.mark.parametrize("dynamics", CORES)
def test_kl_is_nonnegative_and_zero_for_identical_posterior_and_prior(dynamics: str) -> None:
    model = smoke_model(dynamics)
    core = model.dynamics
    window = random_window(model, batch=4, steps=8)
    unroll = best_of_unroll(model, window, num_observed=8)
    assert (unroll.kl_terms >= 0).all() and (unroll.kl_terms.sum((0, 1)) > 0).all()
    same_posterior_and_prior(core)
    unroll = best_of_unroll(model, window, num_observed=8)
    latent_terms = [i for i, name in enumerate(core.kl_names) if name != "y1"]
    assert torch.equal(unroll.kl_terms[..., latent_terms], torch.zeros_like(unroll.kl_terms[..., latent_terms]))
    if isinstance(core, SRVP):  # the y term against N(0, I): posterior mean 0, std softplus(b) + 1e-4 = 1
        out = core.initial.out
        nn.init.zeros_(out.weight)
        bias = torch.zeros_like(out.bias)
        bias[bias.numel() // 2 :] = torch.log(torch.expm1(torch.tensor(1.0 - 1e-4)))
        out.bias.data.copy_(bias)
        unroll = core.unroll(previous_actions(window.actions), window.targets, num_observed=8)
        assert unroll.kl_terms[..., 0].abs().max() < 1e-6


def known_residual(core: SRVP) -> None:
    """Set f so that f(y, z, a) = -y + [a, 0, ...] (the first min(Y, A) entries get a)."""
    y, z, a = core.config.srvp_state_size, core.config.latent_dim, core.config.action_dim
    first, _, second, _, last = core.residual
    assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and isinstance(last, nn.Linear)
    for layer in (first, second, last):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    eye_y, eye_a = torch.eye(y), torch.eye(a)
    with torch.no_grad():  # hidden units: relu(y), relu(-y), relu(a), relu(-a)
        first.weight[:y, :y], first.weight[y : 2 * y, :y] = eye_y, -eye_y
        first.weight[2 * y : 2 * y + a, y + z :], first.weight[2 * y + a : 2 * (y + a), y + z :] = eye_a, -eye_a
        second.weight[: 2 * (y + a), : 2 * (y + a)] = torch.eye(2 * (y + a))
        last.weight[:, :y], last.weight[:, y : 2 * y] = -eye_y, eye_y  # -y = -relu(y) + relu(-y)
        n = min(y, a)
        last.weight[:n, 2 * y : 2 * y + n], last.weight[:n, 2 * y + a : 2 * y + a + n] = eye_a[:n, :n], -eye_a[:n, :n]


@pytest.mark.parametrize("dt", [1.0, 0.5])
def test_srvp_residual_step_known_answer(dt: float) -> None:
    model = smoke_model("srvp", srvp_state_size=4, srvp_dt=dt)
    core = model.dynamics
    assert isinstance(core, SRVP)
    known_residual(core)
    y0 = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    action = torch.tensor([[0.2, -0.4, 0.0, 0.0, 0.0, 0.0]])
    a = action[:, :4]
    start = core.initial_carry(1, torch.device("cpu"))
    carry = start._replace(state=y0, count=torch.full((1,), model.config.srvp_init_frames))
    # By hand: with f(y) = -y + a, one Euler step of dt = 1 lands on a; two steps of 0.5 on 0.25 y + 0.75 a.
    if dt == 1.0:
        expected, penalty = a, (a - y0).square().sum()
    else:
        middle = 0.5 * y0 + 0.5 * a
        expected = 0.25 * y0 + 0.75 * a
        penalty = ((a - y0).square().sum() + (a - middle).square().sum()) / 2
    noise = torch.randn(1, 1, core.noise_size)
    step = core.imagine_step(carry, action, noise=noise)
    torch.testing.assert_close(step.carry.state, expected)
    torch.testing.assert_close(step.hidden, expected)
    torch.testing.assert_close(step.regulariser, penalty.view(1))
    torch.testing.assert_close(step.prediction, core.decoder(expected))
    assert isinstance(step.carry, SRVPCarry) and torch.equal(step.carry.filter, carry.filter)
    # An observed frame moves y by the same rule (the posterior z does not enter this f).
    target = torch.randn(1, model.config.feature_size)
    torch.testing.assert_close(core.observe_step(carry, action, target).carry.state, expected)


def test_srvp_initial_state_reads_the_first_k_frames_only() -> None:
    model = smoke_model("srvp", srvp_init_frames=3)
    core = model.dynamics
    keypoints, actions, targets = random_window(model, batch=2, steps=6)
    base = model.observe(keypoints, actions, generator=torch.Generator().manual_seed(0))
    later = keypoints.clone()
    later[:, 2] += 0.5  # frame 3 of the warm-up: frames 0, 1 cannot see it, frame 2 onward do
    moved = model.observe(later, actions, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moved.hidden[:, :2], base.hidden[:, :2], rtol=0, atol=0)
    assert (moved.hidden[:, 2] - base.hidden[:, 2]).abs().max() > 1e-6
    unroll = core.unroll(previous_actions(actions), targets, num_observed=6)
    assert (unroll.kl_terms[:, :3, 0] > 0).all() and (unroll.kl_terms[:, 3:, 0] == 0).all()  # y KL: warm-up only
    assert (unroll.kl_terms[:, :3, 1] == 0).all() and (unroll.kl_terms[:, 3:, 1] > 0).all()  # z KL: after it
    assert (unroll.regulariser[:, :3] == 0).all() and (unroll.regulariser[:, 3:] > 0).all()


def test_config_and_checkpoints_record_the_core(tmp_path: pytest.TempPathFactory) -> None:
    config = ModelConfig.smoke(dynamics="srvp")
    values = dataclasses.asdict(config)
    assert model_config_from_dict(values).dynamics == "srvp"
    old = {name: value for name, value in dataclasses.asdict(ModelConfig.smoke()).items() if not name.startswith(("dynamics", "srvp_", "hvrnn_"))}
    assert "dynamics" not in old and model_config_from_dict(old).dynamics == "vrnn"
    torch.manual_seed(0)
    legacy = WorldModel(ModelConfig.smoke())
    path = tmp_path / "checkpoint.pt"  # type: ignore[operator]
    save_checkpoint(path, model_state=legacy.state_dict(), model_config=old, train_config={}, dataset={},
                    stage="done", step=0, global_step=0, optimizer_state=None, complete=True)
    loaded = load_world_model(path)
    assert loaded.config.dynamics == "vrnn" and isinstance(loaded.model.dynamics, VRNN)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), legacy.state_dict().values()))
    with pytest.raises(ValueError, match="dynamics"):
        ModelConfig.smoke(dynamics="lstm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hvrnn"):
        ModelConfig.smoke(dynamics="hvrnn", variant="struct-rnn")


def test_train_cli_takes_dynamics() -> None:
    from train.world_model import parse_config
    from worldmodel.train_config import validate

    config = parse_config(["--profile", "smoke", "--dynamics", "srvp", "--model", "cnn-vrnn"])
    assert config.model_config.dynamics == "srvp" and config.model_config.variant == "cnn-vrnn"
    validate(config)
    with pytest.raises(ValueError, match="srvp-init-frames"):
        validate(dataclasses.replace(config, num_observed=2))


# ----------------------------------------------------------------------------------------------
# Learning: constant-velocity keypoints whose velocity is set by the action
# ----------------------------------------------------------------------------------------------
def constant_velocity(batch: int, steps: int, keypoints: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Keypoints (B, T, K, 3) moving by SPEED * M a_t per frame (M fixed), actions (B, T, 6) held for 4 frames."""
    mixing = torch.randn(keypoints * 3, 6, generator=torch.Generator().manual_seed(123)) / 6**0.5
    held = torch.rand(batch, (steps + 3) // 4, 6, generator=generator) * 2 - 1
    actions = held.repeat_interleave(4, dim=1)[:, :steps]  # (B, T, 6)
    start = torch.rand(batch, keypoints * 3, generator=generator) * 2 - 1
    moves = SPEED * actions[:, :-1] @ mixing.T  # (B, T-1, F): frame t -> t+1 by a_t
    positions = torch.cat([start[:, None], start[:, None] + moves.cumsum(1)], dim=1)  # (B, T, F)
    return positions.view(batch, steps, keypoints, 3), actions


TRAINING_STEPS = {"vrnn": 500, "srvp": 300, "hvrnn": 300}  # each well under 30 s at 1 thread


@pytest.mark.parametrize("dynamics", CORES)
def test_learns_action_driven_constant_velocity_better_than_hold_last(dynamics: str) -> None:
    """A few hundred steps on cached-keypoint-like data: one prior sample must beat holding the last frame
    by a wide margin (hold-last ignores the actions, which set the velocity)."""
    config = ModelConfig.smoke(
        dynamics=dynamics, num_keypoints=4, latent_size=8, rnn_size=64, prior_units=32, posterior_units=64,
        decoder_units=64, num_samples=4, srvp_state_size=32, srvp_units=64,
    )
    torch.manual_seed(0)
    model = WorldModel(config)
    parameters = list(model.dynamics.parameters())
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    data = torch.Generator().manual_seed(0)
    total, observed, length = TRAINING_STEPS[dynamics], 8, 16
    for step in range(total):
        keypoints, actions = constant_velocity(32, length, 4, data)
        schedule = schedule_at(step, total, TrainConfig(net=config), Stage.JOINT)
        optimizer.zero_grad(set_to_none=True)
        model.dynamics_losses(keypoints, actions, observed, schedule).total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
    keypoints, actions = constant_velocity(64, length, 4, torch.Generator().manual_seed(99))
    with torch.no_grad():
        seen = model.observe(keypoints[:, :observed], actions[:, :observed], generator=torch.Generator().manual_seed(1))
        future = model.imagine(seen.final, actions[:, observed - 1 : length - 1], num_samples=1,
                               generator=torch.Generator().manual_seed(2))  # one plain prior sample
    truth = keypoints[:, observed:]
    predicted_error = (future.keypoints - truth).square().sum(-1).mean()
    hold_error = (keypoints[:, observed - 1 : observed] - truth).square().sum(-1).mean()
    assert predicted_error < 0.6 * hold_error, (dynamics, float(predicted_error), float(hold_error))


@pytest.mark.parametrize("dynamics", ["vrnn", "hvrnn"])
@pytest.mark.parametrize("residual", [False, True])
def test_residual_keypoints_decode_the_change_from_the_fed_keypoints(dynamics: str, residual: bool) -> None:
    """With a decoder that outputs zero, a residual core predicts exactly the keypoints it was fed for the
    previous frame (hold-last); an absolute one predicts zero."""
    config = ModelConfig.smoke(dynamics=dynamics, residual_keypoints=residual)
    torch.manual_seed(0)
    core = WorldModel(config).dynamics
    torch.nn.init.zeros_(core.decoder.out.weight)
    torch.nn.init.zeros_(core.decoder.out.bias)
    target, action = torch.randn(3, config.feature_size), torch.rand(3, config.action_dim)
    first = core.observe_step(None, action, target)
    assert torch.equal(first.prediction, torch.zeros_like(target))  # no previous frame: nothing to add to
    fed = core.feed(first.carry, target)
    imagined = core.imagine_step(fed, action, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(imagined.prediction, target if residual else torch.zeros_like(target))
    observed = core.observe_step(fed, action, torch.randn(3, config.feature_size), num_samples=4)
    torch.testing.assert_close(observed.prediction, target if residual else torch.zeros_like(target))


# ---- training options of the recurrent cores (docs/DYNAMICS.md, "What the diagnosis found") ---------------
RECURRENT = ["vrnn", "hvrnn"]


@pytest.mark.parametrize("dynamics", RECURRENT)
def test_feed_detected_makes_observed_frames_feed_the_detected_keypoints(dynamics: str) -> None:
    model = smoke_model(dynamics, feed_detected=True)
    keypoints, actions, targets = random_window(model, steps=5)
    core = model.dynamics
    carry = None
    for t in range(5):
        step = core.observe_step(carry, previous_actions(actions)[:, t], targets[:, t], num_samples=3)
        torch.testing.assert_close(core.keypoints(step.carry), targets[:, t], rtol=0, atol=0)
        assert not torch.equal(step.prediction, targets[:, t])  # the prediction is still the decoder's
        carry = step.carry
    # Scheduled sampling cannot override it on observed frames: a coin that always picks the prediction.
    unroll = core.unroll(previous_actions(actions), targets, num_observed=5, teacher_forcing=(1e-9, 1e-9))
    torch.testing.assert_close(core.keypoints(unroll.final), targets[:, -1], rtol=0, atol=0)


def test_a_deterministic_core_reads_the_observation_only_with_feed_detected() -> None:
    """struct-rnn has no posterior: without feed_detected its observed frames feed its own predictions, so
    the state after observing does not depend on what was observed (except the first frame's decoding)."""
    for feed, depends in ((False, False), (True, True)):
        model = smoke_model("vrnn", variant="struct-rnn", feed_detected=feed)
        keypoints, actions, targets = random_window(model, steps=6)
        other = keypoints.clone()
        other[:, 2:] = -keypoints[:, 2:]
        states = [model.observe(k, actions).final.hidden for k in (keypoints, other)]
        assert (not torch.allclose(states[0], states[1])) == depends


@pytest.mark.parametrize("dynamics", RECURRENT)
@pytest.mark.parametrize("on", [False, True])
def test_prior_future_gradient_lets_l_future_train_the_prior(dynamics: str, on: bool) -> None:
    model = smoke_model(dynamics, prior_future_gradient=on)
    keypoints, actions, targets = random_window(model, steps=6)
    unroll = model.dynamics.unroll(previous_actions(actions), targets, num_observed=3, num_samples=1)
    future = model.dynamics.losses(unroll, targets, 3, kl_scale=0.0).future  # no KL: L_future alone
    priors = model.dynamics.prior if dynamics == "vrnn" else model.dynamics.priors
    future.backward()
    grads = [p.grad for p in priors.parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached == on


@pytest.mark.parametrize("dynamics", RECURRENT)
def test_future_best_of_off_scores_one_prior_sample_on_imagined_frames(dynamics: str) -> None:
    """Without best of many on imagined frames the training loss equals an unroll that draws one prior
    sample there (same random stream), and differs from the best-of-many loss."""
    schedule = Schedule(kl_scale=1.0, teacher_forcing_observed=0.0, teacher_forcing_predicted=0.0)
    keypoints, actions, targets = random_window(smoke_model(dynamics), steps=6)
    losses = {}
    for future_best_of in (False, True):
        model = smoke_model(dynamics, future_best_of=future_best_of)
        losses[future_best_of] = model.dynamics_losses(
            keypoints, actions, 3, schedule, torch.Generator().manual_seed(5)
        ).future
    model = smoke_model(dynamics)
    core = model.dynamics
    unroll = core.unroll(previous_actions(actions), targets, num_observed=3, num_samples=core.best_of,
                         generator=torch.Generator().manual_seed(5), imagined_samples=1)  # fmt: skip
    torch.testing.assert_close(losses[False], core.losses(unroll, targets, 3, 1.0).future)
    assert losses[True] < losses[False]  # the best of 4 samples is closer than one


def test_hvrnn_step_equals_the_level_heads_applied_one_by_one() -> None:
    """The hierarchical VRNN's observed step (top-down sampling of all N samples at once, the KL of all levels in
    one call) against a by-hand reference: each sample drawn alone, level by level with the ``LevelHead``
    modules, the best decoded sample kept, and one KL per level."""
    model = smoke_model("hvrnn", hvrnn_levels=3)
    core = model.dynamics
    assert isinstance(core, HierarchicalVRNN)
    batch, samples, z = 4, 5, core.level_size
    g = torch.Generator().manual_seed(3)
    previous = core.observe_step(None, torch.zeros(batch, 6), torch.randn(batch, model.config.feature_size, generator=g))
    action, target = torch.randn(batch, 6, generator=g), torch.randn(batch, model.config.feature_size, generator=g)
    noise = torch.randn(samples, batch, core.noise_size, generator=g)
    step = core.observe_step(previous.carry, action, target, noise=noise)

    hidden = core.rnn(torch.cat([previous.carry.keypoints, previous.carry.latent, action], -1), previous.carry.hidden)
    prior_parts = core.prior_frame(hidden).chunk(core.levels, -1)
    posterior_parts = core.posterior_frame(torch.cat([target, hidden], -1)).chunk(core.levels, -1)

    def top_down(eps: Tensor) -> tuple[Tensor, Tensor]:  # one sample (B, L*Z) -> latent (B, L*Z), KL (B, L)
        levels: list[Tensor] = []
        kls = []
        for l in range(core.levels):
            above = torch.cat(levels, -1) if levels else None
            q = core.posteriors[l](posterior_parts[l], above)
            p = core.priors[l](prior_parts[l], above)
            kls.append(gaussian_kl(q.mean, q.std, p.mean, p.std))
            levels.append(q.mean + q.std * eps[:, l * z : (l + 1) * z])
        return torch.cat(levels, -1), torch.stack(kls, -1)

    drawn = [top_down(noise[n]) for n in range(samples)]
    decoded = torch.stack([core.decoder(latent, hidden) for latent, _ in drawn])  # (N, B, F)
    best = keypoint_error(decoded, target, model.config.keypoint_error).argmin(0)
    assert best.unique().numel() > 1  # the choice differs between rows: the picking is exercised
    rows = torch.arange(batch)
    torch.testing.assert_close(step.hidden, hidden)
    torch.testing.assert_close(step.prediction, decoded[best, rows])
    torch.testing.assert_close(step.carry.latent, torch.stack([latent for latent, _ in drawn])[best, rows])
    torch.testing.assert_close(step.kl, torch.stack([kl for _, kl in drawn])[best, rows])
