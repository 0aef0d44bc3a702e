"""Evaluation of a world model on held-out windows: keypoint prediction error, PSNR and SSIM.

The protocol follows the paper's video-prediction evaluation (section 5): condition on
``num_observed`` real frames (posterior), predict the next ``num_predicted`` frames open loop from the
true actions (prior), draw ``num_samples`` predictions and score the best one ("best of N", the
paper's Figure 3 convention for stochastic models).

* Keypoint error: predicted vs *detected* keypoints on the predicted steps (the detector is the
  reference; there is no ground-truth keypoint). ``keypoint_mse`` is the mean squared error over the
  (x, y, mu) triples (training measures ``ModelConfig.keypoint_error`` on normalised keypoints); ``keypoint_distance`` is the mean Euclidean
  distance of the (x, y) positions in the model's [-1, 1] image coordinates (1.0 = half the image).
  Both are reported for the best of N samples (chosen per sequence by ``keypoint_mse``) and for one
  random sample. For ``cnn-vrnn`` the "keypoints" are its feature vector, so the numbers are errors
  in feature space and are not comparable across variants; PSNR/SSIM are.
* PSNR and SSIM of the frames decoded from the best sample's keypoints against the real frames,
  images in [0, 1]. ``recon_*`` scores frames reconstructed from the detected keypoints (the
  decoder's ceiling for the predicted numbers).
* ``*_static``: the "nothing moves" reference, holding the last observed keypoints (or frame) for
  every predicted step; a model that predicts motion should beat it.

SSIM (Wang et al. 2004) comes from ``pytorch-msssim``: Gaussian window 11x11 with sigma 1.5, K1 = 0.01,
K2 = 0.03, data range 1, "valid" filtering (no padding, as tf.image.ssim), the mean over pixels and
channels per image (``tests/test_evaluation.py`` checks it against the formula).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_msssim
import torch
from torch import Tensor

from worldmodel.data import WindowDataset
from worldmodel.model import DynamicsState, WorldModel
from worldmodel.precision import Autocast

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# ----------------------------------------------------------------------------------------------
# Image metrics
# ----------------------------------------------------------------------------------------------
def psnr(prediction: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: inputs (..., C, H, W); returns shape (...).

    Identical images give +inf (mse 0); callers average finite values or clamp as they need.
    """
    mse = (prediction.float() - target.float()).pow(2).flatten(-3).mean(-1)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(prediction: Tensor, target: Tensor) -> Tensor:
    """Structural similarity per image: inputs (..., C, H, W) in [0, 1] with H, W >= SSIM_WINDOW; returns shape (...).

    ``pytorch_msssim.ssim``: local statistics under a Gaussian window with valid filtering, the SSIM map
    averaged over pixels and channels of each image (the module docstring gives the constants).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    batch_shape = prediction.shape[:-3]
    channels, height, width = prediction.shape[-3:]
    if min(height, width) < SSIM_WINDOW:  # the library would skip the filtering along that axis
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}")
    x = prediction.float().reshape(-1, channels, height, width)
    y = target.float().reshape(-1, channels, height, width)
    values = pytorch_msssim.ssim(
        x, y, data_range=1.0, size_average=False, win_size=SSIM_WINDOW, win_sigma=SSIM_SIGMA, K=(SSIM_K1, SSIM_K2)
    )
    return values.reshape(batch_shape)


def to_unit_range(frames: Tensor) -> Tensor:
    """Model-space frames in [-0.5, 0.5] (any layout) -> float in [0, 1], clipped."""
    return (frames.float() + 0.5).clamp(0.0, 1.0)


def uint8_to_chw_unit(frames: Tensor) -> Tensor:
    """uint8 frames (..., H, W, 3) -> float (..., 3, H, W) in [0, 1]."""
    return frames.permute(*range(frames.dim() - 3), -1, -3, -2).float() / 255.0


# ----------------------------------------------------------------------------------------------
# Keypoint metrics
# ----------------------------------------------------------------------------------------------
def keypoint_errors(predicted: Tensor, detected: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence keypoint errors over all given steps and keypoints.

    predicted (..., T, K, 3), detected (..., T, K, 3) -> (mse over (x, y, mu), mean xy distance),
    each of shape (...).
    """
    difference = predicted.float() - detected.float()
    mse = difference.pow(2).flatten(-3).mean(-1)
    distance = difference[..., :2].norm(dim=-1).flatten(-2).mean(-1)
    return mse, distance


# ----------------------------------------------------------------------------------------------
# Open-loop prediction with N samples
# ----------------------------------------------------------------------------------------------
class BestOfNPrediction(NamedTuple):
    """The result of conditioning on real frames and predicting the rest N times open loop, with the sample
    nearest the true future chosen per sequence afterwards."""

    detected: Tensor  # (B, T, K, 3) keypoints detected on all real frames
    predicted: Tensor  # (B, T, K, 3) observed steps: posterior reconstruction; then best sample
    samples: Tensor  # (N, B, P, K, 3) all sampled keypoints of the P predicted steps
    best_index: Tensor  # (B,) int64, the sample with the lowest keypoint_mse per sequence
    predicted_frames: Tensor  # (B, T, 3, 64, 64) in [0, 1]: decoded from `predicted`
    reconstructed_frames: Tensor  # (B, T, 3, 64, 64) in [0, 1]: decoded from `detected`
    real_frames: Tensor  # (B, T, 3, 64, 64) in [0, 1]


def repeat_state(state: DynamicsState, times: int) -> DynamicsState:
    """Tile a recurrent state (and the core's carry inside it) along the batch, sample-major: row s*B + b
    is a copy of row b."""

    def tile(field: Any) -> Any:
        if isinstance(field, tuple):  # the core's carry, a NamedTuple of tensors
            return type(field)(*(tile(part) for part in field))
        return field.repeat(times, *([1] * (field.dim() - 1)))

    return tile(state)


@torch.no_grad()
def predict_best_of_n(
    model: WorldModel,
    frames: Tensor,
    actions: Tensor,
    num_observed: int,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> BestOfNPrediction:
    """Observe ``num_observed`` frames, imagine the rest of the window ``num_samples`` times.

    frames uint8 (B, T, 64, 64, 3), actions (B, T, 6) with actions[:, t] applied at frame t. Action
    ordering (CONTRACTS.md): the state after frame t-1 plus action a_{t-1} predicts frame t, so the
    open-loop part starts from the last observed state with the action applied at the last observed
    frame. Each of the N predictions is a plain prior rollout (no peeking at the future); the best one
    is chosen per sequence afterwards by its keypoint error over all predicted steps (the paper's
    best-of-N evaluation). Random draws use ``generator`` only, so evaluating leaves the global RNG
    (and hence training) untouched.
    """
    batch, length = frames.shape[:2]
    num_predicted = length - num_observed
    if num_observed < 1 or num_predicted < 1:
        raise ValueError(f"need 1 <= num_observed < {length}, got {num_observed}")
    detected = model.detect(frames)
    observed = model.observe(detected[:, :num_observed], actions[:, :num_observed], generator=generator)
    future_actions = actions[:, num_observed - 1 : length - 1].repeat(num_samples, 1, 1)
    imagined = model.imagine(
        repeat_state(observed.final, num_samples), future_actions, num_samples=1, generator=generator
    )
    samples = imagined.keypoints.reshape(num_samples, batch, num_predicted, *detected.shape[2:])
    sample_mse, _ = keypoint_errors(samples, detected[None, :, num_observed:])
    best_index = sample_mse.argmin(0)
    best = samples[best_index, torch.arange(batch, device=samples.device)]
    predicted = torch.cat([observed.keypoints, best], dim=1)
    first_frame, first_keypoints = frames[:, 0], detected[:, 0]
    return BestOfNPrediction(
        detected=detected,
        predicted=predicted,
        samples=samples,
        best_index=best_index,
        predicted_frames=to_unit_range(model.decode(predicted, first_frame, first_keypoints)),
        reconstructed_frames=to_unit_range(model.decode(detected, first_frame, first_keypoints)),
        real_frames=uint8_to_chw_unit(frames),
    )


class EvalResult(NamedTuple):
    """Averages over the evaluation windows (floats, JSON-ready via ``_asdict``)."""

    keypoint_mse_best: float
    keypoint_mse_random: float
    keypoint_distance_best: float
    keypoint_distance_random: float
    psnr: float  # predicted steps, best sample
    ssim: float
    recon_psnr: float  # all steps, frames reconstructed from detected keypoints
    recon_ssim: float
    # Reference: "nothing moves" - the last observed keypoints / frame held for every predicted step.
    keypoint_mse_static: float
    keypoint_distance_static: float
    psnr_static: float
    ssim_static: float
    num_windows: int
    num_samples: int


def _finite_mean(values: Tensor) -> float:
    # PSNR of a pixel-perfect frame is +inf; cap it at 100 dB so one perfect frame cannot dominate.
    return float(values.clamp(max=100.0).mean())


def score(prediction: BestOfNPrediction, num_observed: int) -> EvalResult:
    """Reduce a BestOfNPrediction (one batch) to the averaged metrics."""
    future = slice(num_observed, None)
    detected_future = prediction.detected[None, :, future]
    mse, distance = keypoint_errors(prediction.samples, detected_future)  # (N, B)
    batch_index = torch.arange(mse.shape[1], device=mse.device)
    best = prediction.best_index
    predicted, real = prediction.predicted_frames[:, future], prediction.real_frames[:, future]
    last = num_observed - 1
    static_mse, static_distance = keypoint_errors(
        prediction.detected[:, last : last + 1].expand_as(detected_future[0]), detected_future[0]
    )
    held_frame = prediction.real_frames[:, last : last + 1].expand_as(real)
    return EvalResult(
        keypoint_mse_best=float(mse[best, batch_index].mean()),
        keypoint_mse_random=float(mse[0].mean()),  # sample 0 is a random draw like any other
        keypoint_distance_best=float(distance[best, batch_index].mean()),
        keypoint_distance_random=float(distance[0].mean()),
        psnr=_finite_mean(psnr(predicted, real)),
        ssim=float(ssim(predicted, real).mean()),
        recon_psnr=_finite_mean(psnr(prediction.reconstructed_frames, prediction.real_frames)),
        recon_ssim=float(ssim(prediction.reconstructed_frames, prediction.real_frames).mean()),
        keypoint_mse_static=float(static_mse.mean()),
        keypoint_distance_static=float(static_distance.mean()),
        psnr_static=_finite_mean(psnr(held_frame, real)),
        ssim_static=float(ssim(held_frame, real).mean()),
        num_windows=int(mse.shape[1]),
        num_samples=int(mse.shape[0]),
    )


def combine(results: list[EvalResult]) -> EvalResult:
    """Window-weighted average of per-batch results."""
    total = sum(result.num_windows for result in results)
    if total == 0:
        raise ValueError("no evaluation windows")
    averaged = {
        name: sum(getattr(result, name) * result.num_windows for result in results) / total
        for name in EvalResult._fields
        if name not in ("num_windows", "num_samples")
    }
    return EvalResult(**averaged, num_windows=total, num_samples=results[0].num_samples)


# ----------------------------------------------------------------------------------------------
# The evaluation set and the evaluation passes
# ----------------------------------------------------------------------------------------------
class EvalSet(NamedTuple):
    """Fixed test windows held in memory, chosen by the seed, balanced over tasks and interleaved (the
    first few windows, which the pictures show, come from different tasks)."""

    frames: Tensor  # (N, L, 64, 64, 3) uint8
    actions: Tensor  # (N, L, 6) float32
    task_ids: Tensor  # (N,) int64


def load_eval_set(root: Path, tasks: Sequence[str], length: int, count: int, seed: int) -> EvalSet:
    """``count`` windows of ``length`` frames from the test split (fewer if the split is smaller)."""
    per_task: list[list[Any]] = []
    for number, task in enumerate(tasks):
        dataset = WindowDataset(root, [task], "test", length=length)
        quota = count // len(tasks) + (1 if number < count % len(tasks) else 0)
        rng = np.random.default_rng([seed, number])
        chosen = rng.permutation(len(dataset))[:quota]
        per_task.append([dataset[int(index)] for index in sorted(chosen)])
        dataset.close()
    interleaved = [windows[i] for i in range(max(map(len, per_task))) for windows in per_task if i < len(windows)]
    if not interleaved:
        raise ValueError(f"no test windows of {length} frames in {root}")
    return EvalSet(
        frames=torch.stack([window.frames for window in interleaved]),
        actions=torch.stack([window.actions for window in interleaved]),
        task_ids=torch.stack([window.task_id for window in interleaved]),
    )


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block; its previous mode is restored after, also on errors."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def eval_batches(eval_set: EvalSet, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """The eval windows' frames (B, T, 64, 64, 3) uint8 and actions (B, T, A), batch by batch, on ``device``."""
    for start in range(0, len(eval_set.frames), batch_size):
        stop = start + batch_size
        yield eval_set.frames[start:stop].to(device), eval_set.actions[start:stop].to(device)


@torch.no_grad()
def evaluate(
    model: WorldModel, eval_set: EvalSet, num_observed: int, num_samples: int, batch_size: int, seed: int,
    device: torch.device, autocast: Autocast = contextlib.nullcontext,
) -> tuple[EvalResult, BestOfNPrediction]:  # fmt: skip
    """Best-of-N open-loop prediction on every eval window; returns the averages and the first batch's
    BestOfNPrediction (for pictures). The model is put in eval mode and restored afterwards."""
    generator = torch.Generator(device=device).manual_seed(seed)
    results, first = [], None
    with eval_mode(model):
        for frames, actions in eval_batches(eval_set, batch_size, device):
            with autocast():
                prediction = predict_best_of_n(model, frames, actions, num_observed, num_samples, generator)
            results.append(score(prediction, num_observed))
            first = prediction if first is None else first
    assert first is not None
    return combine(results), first


class ReconstructionResult(NamedTuple):
    """The vision side alone: frames reconstructed from detected keypoints, and collapse diagnostics."""

    recon_psnr: float
    recon_ssim: float
    mean_mu: float
    active_keypoints: float
    keypoint_spread: float
    num_windows: int


class Reconstruction(NamedTuple):
    detected: Tensor  # (B, T, K, 3)
    reconstructed_frames: Tensor  # (B, T, 3, 64, 64) in [0, 1]
    real_frames: Tensor  # (B, T, 3, 64, 64) in [0, 1]


@torch.no_grad()
def evaluate_reconstruction(
    model: WorldModel, eval_set: EvalSet, batch_size: int, device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
) -> tuple[ReconstructionResult, Reconstruction]:  # fmt: skip
    """Detector + reconstructor on the eval windows (after the vision stage, before any dynamics)."""
    psnrs, ssims, keypoints, first = [], [], [], None
    with eval_mode(model):
        for frames, _ in eval_batches(eval_set, batch_size, device):
            with autocast():
                detected = model.detect(frames)
                decoded = to_unit_range(model.decode(detected, frames[:, 0], detected[:, 0]))
            real = uint8_to_chw_unit(frames)
            psnrs.append(psnr(decoded, real).clamp(max=100.0).flatten())
            ssims.append(ssim(decoded, real).flatten())
            keypoints.append(detected)
            first = Reconstruction(detected, decoded, real) if first is None else first
    assert first is not None
    diagnostics = model.diagnose(torch.cat(keypoints))
    result = ReconstructionResult(
        recon_psnr=float(torch.cat(psnrs).mean()),
        recon_ssim=float(torch.cat(ssims).mean()),
        mean_mu=diagnostics.mean_mu,
        active_keypoints=diagnostics.active_keypoints,
        keypoint_spread=diagnostics.keypoint_spread,
        num_windows=len(eval_set.frames),
    )
    return result, first
