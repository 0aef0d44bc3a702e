"""Metrics (PSNR, SSIM, keypoint errors), best-of-N evaluation and the pictures, on known answers."""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worldmodel.config import ModelConfig
from worldmodel.evaluation import (
    EvalSet,
    evaluate,
    keypoint_errors,
    psnr,
    ssim,
)
from worldmodel.model import WorldModel
from worldmodel.visualize import keypoints_to_pixels, save_keypoint_png, save_prediction_gif, video_frames

C1, C2 = 0.01**2, 0.03**2  # SSIM constants for data range 1


# ---- PSNR ---------------------------------------------------------------------------------------
def test_psnr_known_values() -> None:
    target = torch.zeros(2, 3, 8, 8)
    assert psnr(target + 0.1, target).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # mse 0.01
    assert psnr(target + 0.01, target).tolist() == pytest.approx([40.0, 40.0], abs=1e-3)
    assert math.isinf(float(psnr(target, target)[0]))


# ---- SSIM ---------------------------------------------------------------------------------------
def test_ssim_of_identical_images_is_one() -> None:
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(images, images).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # Constant images: no variance or covariance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.6
    value = float(ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))[0])
    assert value == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), rel=1e-4)  # 0.60010...
    black_white = float(ssim(torch.zeros(1, 1, 11, 11), torch.ones(1, 1, 11, 11))[0])
    assert black_white == pytest.approx(C1 / (1 + C1), rel=1e-3)  # ~1e-4


def test_ssim_matches_the_formula_with_a_gaussian_window() -> None:
    # An 11x11 image gives exactly one valid window: compute SSIM from its definition in numpy.
    rng = np.random.default_rng(3)
    x, y = rng.random((11, 11)), rng.random((11, 11))
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
    cxy = (w * x * y).sum() - mx * my
    expected = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    value = float(ssim(torch.tensor(x)[None, None], torch.tensor(y)[None, None])[0])
    assert value == pytest.approx(expected, rel=1e-4)


def formula_ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM written out (float64): separable Gaussian window, valid filtering, map averaged per image."""
    channels = x.shape[1]
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    rows, columns = g.view(1, 1, 1, -1).expand(channels, 1, 1, -1), g.view(1, 1, -1, 1).expand(channels, 1, -1, 1)

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(image, rows, groups=channels), columns, groups=channels)

    x, y = x.double(), y.double()
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    value = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    return value.flatten(1).mean(1)


def test_ssim_matches_the_formula_on_frames() -> None:
    """The library's SSIM equals the formula on 64x64 RGB frames, similar and unrelated ones."""
    generator = torch.Generator().manual_seed(4)
    real = torch.rand(4, 3, 64, 64, generator=generator)
    predicted = torch.cat([(real[:2] + 0.1 * torch.randn(2, 3, 64, 64, generator=generator)).clamp(0, 1),
                           torch.rand(2, 3, 64, 64, generator=generator)])  # fmt: skip
    expected = formula_ssim(predicted, real)
    assert expected[:2].min() > 0.5 > expected[2:].max()  # the two kinds of pairs score apart
    torch.testing.assert_close(ssim(predicted, real).double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(real[..., :8, :8], real[..., :8, :8])


def test_ssim_falls_with_noise_and_keeps_batch_shape() -> None:
    generator = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 4, 3, 16, 16, generator=generator)
    slight = (clean + 0.05 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    strong = (clean + 0.3 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    slight_ssim, strong_ssim = ssim(slight, clean), ssim(strong, clean)
    assert slight_ssim.shape == (2, 4)
    assert bool((strong_ssim < slight_ssim).all()) and bool((slight_ssim < 1).all())


# ---- keypoint errors ------------------------------------------------------------------------------
def test_keypoint_errors_known_answer() -> None:
    detected = torch.zeros(2, 5, 4, 3)
    predicted = detected.clone()
    predicted[..., 0] += 0.3
    predicted[..., 1] += 0.4  # every keypoint 0.5 away; mu unchanged
    mse, distance = keypoint_errors(predicted, detected)
    assert mse.tolist() == pytest.approx([0.25 / 3] * 2)
    assert distance.tolist() == pytest.approx([0.5] * 2)


# ---- best-of-N evaluation -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model() -> WorldModel:
    torch.manual_seed(0)
    return WorldModel(ModelConfig.smoke()).eval()


def synthetic_eval_set(windows: int = 3, length: int = 6) -> EvalSet:
    generator = torch.Generator().manual_seed(5)
    frames = torch.randint(0, 256, (windows, length, 64, 64, 3), generator=generator, dtype=torch.uint8)
    actions = torch.rand((windows, length, 6), generator=generator) * 2 - 1
    return EvalSet(frames, actions, torch.zeros(windows, dtype=torch.int64))


def test_evaluate_is_seeded_leaves_global_rng_alone_and_best_beats_random(tiny_model: WorldModel) -> None:
    eval_set = synthetic_eval_set()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, prediction = evaluate(tiny_model, eval_set, 3, 5, 2, seed=9, device=torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_next), "evaluation must not consume the global RNG"
    second, _ = evaluate(tiny_model, eval_set, 3, 5, 2, seed=9, device=torch.device("cpu"))
    assert first == second
    assert first.num_windows == 3 and first.num_samples == 5
    assert first.keypoint_mse_best <= first.keypoint_mse_random
    assert 0.0 < first.ssim < 1.0 and 0.0 < first.recon_ssim < 1.0
    assert prediction.samples.shape == (5, 2, 3, 8, 3)
    assert prediction.predicted_frames.shape == (2, 6, 3, 64, 64)
    # Observed steps of the prediction are the posterior reconstruction, the rest the best sample.
    best = prediction.samples[prediction.best_index, torch.arange(2)]
    assert torch.equal(prediction.predicted[:, 3:], best)


# ---- pictures -------------------------------------------------------------------------------------
def test_keypoint_pixels_follow_the_model_grid() -> None:
    columns, rows = keypoints_to_pixels(np.array([[-1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]), 64)
    assert columns.tolist() == pytest.approx([0.0, 63.0, 31.5])  # x -> right
    assert rows.tolist() == pytest.approx([0.0, 63.0, 31.5])  # y points up: y = 1 is the top row


def test_png_and_gif_are_written(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    real = torch.rand(3, 6, 3, 64, 64, generator=generator)
    model = torch.rand(3, 6, 3, 64, 64, generator=generator)
    keypoints = torch.rand(3, 6, 5, 3, generator=generator) * 2 - 1
    save_keypoint_png(tmp_path / "k.png", real, model, keypoints, keypoints, num_observed=4, max_sequences=2)
    save_prediction_gif(tmp_path / "p.gif", real, model, num_observed=4, max_sequences=2)
    assert imageio.imread(tmp_path / "k.png").ndim == 3
    frames = imageio.mimread(tmp_path / "p.gif")
    assert len(frames) == 6  # one GIF frame per time step
    assert sorted(path.name for path in tmp_path.iterdir()) == ["k.png", "p.gif"]  # no temp files left
    # Observed steps have a green border, predicted steps a red one; real on the left, model on the right.
    video = video_frames(real, model, num_observed=4, max_sequences=2, scale=1, border=2)
    assert video.shape[0] == 6 and video.shape[2] == 2 * (64 + 4) + 4
    assert tuple(video[0, 0, 0]) == (40, 200, 40) and tuple(video[5, 0, 0]) == (220, 40, 40)
