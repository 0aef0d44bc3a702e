"""The WorldModel API of docs/CONTRACTS.md: shapes, gradient isolation, bf16 steps, determinism, a real fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldmodel.config import VARIANTS, ModelConfig
from worldmodel.losses import relative_image_weights
from worldmodel.model import (
    Diagnostics,
    GuidedPrediction,
    Losses,
    Schedule,
    WorldModel,
    frames_to_images,
    previous_actions,
    reconstructed_frame_indices,
)
from worldmodel.train_config import Stage, TrainConfig
from worldmodel.training import schedule_at

B, T, OBS = 2, 5, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(variant: str = "struct-vrnn", **overrides: object) -> WorldModel:
    torch.manual_seed(0)
    return WorldModel(ModelConfig.smoke(variant=variant, **overrides))  # type: ignore[arg-type]


def batch(seed: int = 0, b: int = B, t: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (b, t, 64, 64, 3), dtype=torch.uint8, generator=g)
    actions = torch.rand(b, t, 6, generator=g) * 2 - 1
    return frames, actions


def test_frames_to_images() -> None:
    frames = torch.zeros(2, 3, 64, 64, 3, dtype=torch.uint8)
    frames[1, 2, 5, 7] = torch.tensor([255, 0, 51], dtype=torch.uint8)
    images = frames_to_images(frames)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images[5, :, 5, 7], torch.tensor([0.5, -0.5, 0.2 - 0.5]))
    assert images.min().item() == -0.5


def test_previous_actions() -> None:
    actions = torch.arange(6.0).view(1, 3, 2)
    assert previous_actions(actions).tolist() == [[[0.0, 0.0], [0.0, 1.0], [2.0, 3.0]]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes(variant: str) -> None:
    model = make(variant)
    cfg = model.config
    k, h = cfg.num_keypoints, cfg.rnn_size
    frames, actions = batch()
    losses, diagnostics = model.joint_losses(frames, actions, OBS, Schedule(0.5, 0.5, 0.5))
    assert isinstance(losses, Losses) and isinstance(diagnostics, Diagnostics)
    assert all(v.shape == () and torch.isfinite(v) for v in losses)
    assert all(isinstance(v, float) for v in diagnostics)
    if variant == "struct-rnn":
        assert losses.kl.item() == 0.0
    if variant == "cnn-vrnn":
        assert losses.separation.item() == 0.0 and losses.sparsity.item() == 0.0
    vision, _ = model.vision_losses(frames)
    assert vision.keypoint.item() == 0.0 and vision.image.item() > 0
    keypoints = model.detect(frames)
    assert keypoints.shape == (B, T, k, 3) and not keypoints.requires_grad
    dynamics = model.dynamics_losses(keypoints, actions, OBS, Schedule())
    assert dynamics.image.item() == 0.0 and dynamics.future.item() > 0
    observed = model.observe(keypoints, actions)
    assert observed.keypoints.shape == (B, T, k, 3) and observed.hidden.shape == (B, T, h)
    assert observed.final.carry.latent.shape == (B, cfg.latent_dim)
    future = model.imagine(observed.final, actions)
    assert future.keypoints.shape == (B, T, k, 3) and future.final.keypoints.shape == (B, k, 3)
    decoded = model.decode(future.keypoints, frames[:, 0], keypoints[:, 0])
    assert decoded.shape == (B, T, 3, 64, 64) and decoded.dtype == torch.float32
    assert decoded.min() >= -0.5 and decoded.max() <= 0.5
    prediction = model.predict_guided(frames, actions, OBS)
    assert isinstance(prediction, GuidedPrediction) and prediction.frames.shape == (B, T, 3, 64, 64)
    assert prediction.keypoints.shape == (B, T, k, 3) and prediction.hidden.shape == (B, T, h)


def test_untrained_decoder_copies_the_first_frame() -> None:
    model = make()
    frames, _ = batch()
    keypoints = torch.rand(B, T, model.config.num_keypoints, 3)
    decoded = model.decode(keypoints, frames[:, 0], keypoints[:, 0])  # zero-initialised phi_rec output
    first = frames_to_images(frames[:, 0])
    torch.testing.assert_close(decoded, first[:, None].expand_as(decoded))


@pytest.mark.parametrize("variant", ["struct-vrnn", "cnn-vrnn"])
def test_no_dynamics_gradient_reaches_the_detector(variant: str) -> None:
    model = make(variant)
    frames, actions = batch()
    vision_net = model.detector if model.detector is not None else model.encoder
    assert vision_net is not None
    model.reconstructor.to_rgb.weight.data.normal_()  # so that the image loss reaches the detector at once
    losses, _ = model.joint_losses(frames, actions, OBS, Schedule(1.0, 0.5, 0.5))
    dynamics_total = losses.keypoint + losses.kl + losses.future
    params = list(vision_net.parameters())
    grads = torch.autograd.grad(dynamics_total, params, retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    dyn_grads = torch.autograd.grad(dynamics_total, list(model.dynamics.parameters()), retain_graph=True,
                                    allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in dyn_grads)
    image_grads = torch.autograd.grad(losses.image, params, allow_unused=True)
    assert all(g is not None for g in image_grads) and sum(g.abs().sum() for g in image_grads) > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_optimizer_step_bf16_channels_last(variant: str) -> None:
    model = make(variant).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    frames, actions = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, diagnostics = model.joint_losses(frames, actions, OBS, schedule_at(10, 100, TrainConfig(net=model.config), Stage.JOINT))
        total = losses.total + model.config.conv_weight_decay * model.conv_weight_l2()
    assert total.dtype == torch.float32 and torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert sum(changed) >= len(changed) // 2
    assert np.isfinite(diagnostics.keypoint_spread)


def test_determinism_under_manual_seed() -> None:
    def run() -> list[float]:
        model = make()
        frames, actions = batch()
        torch.manual_seed(123)
        losses, _ = model.joint_losses(frames, actions, OBS, Schedule(1.0, 0.5, 0.5))
        torch.manual_seed(7)
        rollout = model.observe(model.detect(frames), actions)
        return [v.item() for v in losses] + rollout.keypoints.flatten().tolist()

    assert run() == run()


def test_generator_makes_sampling_reproducible() -> None:
    model = make()
    frames, actions = batch()
    keypoints = model.detect(frames)
    a = model.observe(keypoints, actions, generator=torch.Generator().manual_seed(5))
    torch.rand(100)  # the global RNG moves; the generator's draws do not
    b = model.observe(keypoints, actions, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.keypoints, b.keypoints)


def test_amplitude_mix_is_remembered_and_gates_sparsity() -> None:
    model = make()
    frames, _ = batch()
    assert float(model.amplitude_mix) == model.config.initial_amplitude_mix == 0.0
    fixed, diag = model.vision_losses(frames)
    assert diag.amplitude_mix == 0.0
    cfg = model.config
    expected = fixed.image + cfg.separation_weight * fixed.separation  # sparsity weighted by mix = 0
    torch.testing.assert_close(fixed.total, expected)
    paper, diag = model.vision_losses(frames, Schedule(amplitude_mix=1.0))
    assert diag.amplitude_mix == 1.0 and float(model.amplitude_mix) == 1.0  # kept for decoding
    torch.testing.assert_close(paper.total, paper.image + cfg.separation_weight * paper.separation
                               + cfg.sparsity_weight * paper.sparsity)
    state = model.state_dict()
    assert "amplitude_mix" in state and "normalizer.std" in state


def test_acceleration_prior_enters_the_vision_loss_only_when_weighted() -> None:
    frames, _ = batch()
    off, _ = make().vision_losses(frames)
    assert off.acceleration.item() == 0.0  # the paper's detector: not computed
    model = make(acceleration_weight=2.0)
    on, _ = model.vision_losses(frames)
    cfg = model.config
    assert on.acceleration.item() > 0
    torch.testing.assert_close(on.total, on.image + cfg.separation_weight * on.separation + 2.0 * on.acceleration)
    model.zero_grad()
    on.acceleration.backward()
    assert model.detector is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.detector.parameters())


def test_relative_image_weights_by_hand() -> None:
    images = torch.zeros(3, 4, 3, 2, 2)
    images[0, 1:] += 1.0  # frames 1-3 each change 12 (3 x 2 x 2 pixels of 1^2): copy error 9 over 4 frames
    images[1, 1:] += 0.5  # copy error 2.25
    # sequence 2 is still: its copy error 0 is floored at 0.1 x the batch mean (3.75)
    raw = torch.tensor([1 / 9, 1 / 2.25, 1 / 0.375])
    torch.testing.assert_close(relative_image_weights(images), raw / raw.mean())


def test_relative_image_loss_weights_each_sequence_by_its_copy_error() -> None:
    """With the flag, L_image is the mean over frames of each frame's error times its sequence's weight: the model's
    untrained reconstructor copies the first frame, so every sequence then scores about the same."""
    frames, _ = batch()
    frames[1] = frames[1, :1]  # the second sequence stands still: only the first has a copy error
    torch.manual_seed(0)
    plain = make()
    torch.manual_seed(0)
    relative = make(relative_image_loss=True)
    off, _ = plain.vision_losses(frames)
    on, _ = relative.vision_losses(frames)
    images = frames_to_images(frames).view(*frames.shape[:2], 3, 64, 64)
    weights = relative_image_weights(images)
    assert weights[0] < weights[1]  # the moving sequence counts less per pixel of error
    reconstruction = relative.decode(relative.detect(frames), frames[:, 0], relative.detect(frames)[:, 0])
    per_frame = 0.5 * (reconstruction - images).square().sum((2, 3, 4))  # (B, T)
    torch.testing.assert_close(on.image, (per_frame * weights[:, None]).mean(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(off.image, per_frame.mean(), rtol=1e-3, atol=1e-3)
    relative.zero_grad()
    on.image.backward()
    assert relative.reconstructor is not None  # its output layer starts at zero: the first gradient reaches it alone
    assert relative.reconstructor.to_rgb.weight.grad is not None and relative.reconstructor.to_rgb.weight.grad.abs().sum() > 0


def test_conv_weight_l2() -> None:
    model = make()
    expected = sum(m.weight.square().sum() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    torch.testing.assert_close(model.conv_weight_l2(), expected)


def test_fit_keypoint_normalization_is_used() -> None:
    """``observe`` runs the dynamics on normalised keypoints and de-normalises what they give back."""
    model = make()
    k = model.config.num_keypoints
    keypoints = torch.rand(4, 6, k, 3) * torch.tensor([0.2, 0.5, 1.0]) + torch.tensor([0.3, -0.4, 0.1])
    actions = torch.rand(2, 6, 6)
    identity = model.observe(keypoints[:2], actions, generator=torch.Generator().manual_seed(7))
    model.fit_keypoint_normalization(keypoints)
    normalizer = model.normalizer
    assert normalizer.std.min() >= model.config.keypoint_std_floor
    assert not torch.allclose(normalizer.mean, torch.zeros_like(normalizer.mean))
    rollout = model.observe(keypoints[:2], actions, generator=torch.Generator().manual_seed(7))
    # The same recurrence by hand, on (x - mean) / std, its outputs mapped back with x * std + mean.
    targets = (keypoints[:2].flatten(2) - normalizer.mean) / normalizer.std
    unroll = model.dynamics.unroll(
        previous_actions(actions), targets, num_observed=6, num_samples=model.dynamics.best_of,
        generator=torch.Generator().manual_seed(7),
    )
    expected = (unroll.keypoints * normalizer.std + normalizer.mean).view(2, 6, k, 3)
    torch.testing.assert_close(rollout.keypoints, expected)
    torch.testing.assert_close(rollout.hidden, unroll.hidden)
    assert not torch.allclose(rollout.hidden, identity.hidden)  # the fitted normaliser changed what the core saw


def render_real_frames(windows: int = 6, length: int = 4) -> torch.Tensor:
    """uint8 (N, L, 64, 64, 3) windows of random-action cartpole and cheetah episodes."""
    from envs.simulator import Simulator

    rng = np.random.default_rng(0)
    out = []
    for task in ("cartpole", "cheetah"):
        sim = Simulator(task)
        frame, _ = sim.reset(0)
        frames = [frame]
        for _ in range(windows * length - 1):
            frames.append(sim.step(rng.uniform(-1, 1, sim.spec.action_dim).astype(np.float32)).frame)
        out.append(np.stack(frames).reshape(windows, length, 64, 64, 3))
    return torch.from_numpy(np.concatenate(out))


def test_short_fit_on_real_frames_lowers_image_loss_without_collapse() -> None:
    pytest.importorskip("dm_control")
    torch.manual_seed(0)
    frames = render_real_frames()  # (12, 4, 64, 64, 3)
    config = ModelConfig.cpu(num_keypoints=16, base_filters=8)
    model = WorldModel(config).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def image_loss() -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model.vision_losses(frames)[0].image.item()

    start = image_loss()
    steps = 100
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        index = torch.randint(0, len(frames), (8,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses, diagnostics = model.vision_losses(frames[index], schedule_at(step, 20 * steps, TrainConfig(net=config), Stage.JOINT))
            total = losses.total + config.conv_weight_decay * model.conv_weight_l2()
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
    end = image_loss()
    with torch.no_grad():
        _, diagnostics = model.vision_losses(frames)
    assert end < 0.92 * start, (start, end)  # measured 0.78-0.83 over 4 seeds
    assert diagnostics.active_keypoints >= 6, diagnostics  # of 16; measured 12-14
    assert diagnostics.keypoint_spread > 0.1, diagnostics  # measured ~0.2
    assert diagnostics.mean_mu > 0.0, diagnostics


def test_reconstructed_frame_indices_by_hand() -> None:
    assert reconstructed_frame_indices(8, 4).tolist() == [1, 3, 5, 7]
    assert reconstructed_frame_indices(8, 2).tolist() == [3, 7]
    assert reconstructed_frame_indices(8, 7).tolist() == [1, 2, 3, 4, 5, 6, 7]  # all but the reference frame
    assert reconstructed_frame_indices(8, 1).tolist() == [7]
    assert reconstructed_frame_indices(8, 0) is None and reconstructed_frame_indices(8, 8) is None  # every frame


def test_image_loss_reads_only_the_reconstructed_frames() -> None:
    """With reconstructed_frames 2 of 4, L_image is the mean error of frames 1 and 3 (by hand, from decode): a
    change to frame 2 moves only its keypoints, which nothing reconstructs, while one to frame 3 moves L_image."""
    frames, _ = batch(t=4)
    model = make(reconstructed_frames=2)
    losses, _ = model.vision_losses(frames)
    keypoints = model.detect(frames)
    images = frames_to_images(frames).view(*frames.shape[:2], 3, 64, 64)
    reconstruction = model.decode(keypoints, frames[:, 0], keypoints[:, 0])
    per_frame = 0.5 * (reconstruction - images).square().sum((2, 3, 4))  # (B, T)
    torch.testing.assert_close(losses.image, per_frame[:, [1, 3]].mean(), rtol=1e-3, atol=1e-3)
    changed = frames.clone()
    changed[:, 2] = 255 - changed[:, 2]
    torch.testing.assert_close(model.vision_losses(changed)[0].image, losses.image)
    changed[:, 3] = 255 - changed[:, 3]
    assert not torch.isclose(model.vision_losses(changed)[0].image, losses.image)
    assert make().vision_losses(frames)[0].image.item() != losses.image.item()  # the default reconstructs all four
