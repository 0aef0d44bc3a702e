"""How well a dynamics core predicts, measured on cached keypoints of the test split (docs/DYNAMICS.md).

Two questions, both asked without pixels (the trainer's keypoint cache holds every detected keypoint):

1. **Open-loop error per horizon.** Observe ``num_observed`` frames through the posterior, then imagine
   ``horizon`` frames from the prior with the true actions, ``num_samples`` times. For each horizon
   h = 1..H the mean keypoint distance (x, y; units of the [-1, 1] image frame) to the detected keypoints
   of a single prior sample, of the mean of the N samples, and of the best of the N (chosen per window by
   its error over the whole horizon, the paper's best-of-N), beside two references that use no model:
   *hold-last* (the last observed keypoints, nothing moves) and *constant velocity* (the last observed
   step repeated). A core whose single sample does not beat hold-last has not learned dynamics.
2. **Keypoint stability** of the detector, which bounds every core: how far keypoints move from one frame
   to the next, and how much of that is *jumps* (moves longer than ``JUMP``, a tenth of the image width,
   more than any limb moves in one agent step): a keypoint that switches to another object moves
   without physics, and no dynamics model can predict it. And how often a keypoint stands still (moves
   shorter than ``STILL``): keypoints snapped to the heatmap's grid stand still, then step a whole cell.
3. **Probe to the true state** (the paper's section 5.2, "keypoints track objects"): a readout from one
   frame's keypoints (K*3) to the task's true low-dimensional state, linear (ridge) or a small MLP
   (``worldmodel.probes``), fit on the train split, R^2 on the test split, per task and per state dimension;
   and the same probe applied to *predicted* keypoints of the open-loop frames, against the true states of
   those frames.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from worldmodel.evaluation import repeat_state
from worldmodel.model import WorldModel
from worldmodel.keypoint_cache import KeypointSplit
from worldmodel.probes import MLP_STEPS, Readout, fit_probe, r_squared, r_squared_per_dim

REFERENCES = ("hold_last", "constant_velocity")
JUMP = 0.2  # a one-frame move longer than this (a tenth of the [-1, 1] image width) counts as a jump
# A one-frame move shorter than this (1/30 of an image pixel) counts as standing still. A detector whose spatial
# softmax has saturated puts each keypoint on one heatmap cell, so its keypoints stand exactly still for
# frames and then step a whole cell (2/15 of the [-1, 1] frame at 16x16): a high still rate is that symptom
# (docs/VISION.md, "Keypoints on a grid").
STILL = 1e-3
PREDICTIONS = ("single", "mean_of_n", "best_of_n")


class HorizonErrors(NamedTuple):
    """Mean keypoint distance at each open-loop horizon h = 1..H, each (H,) float64 numpy."""

    single: np.ndarray  # one prior sample
    mean_of_n: np.ndarray  # the mean of the N samples' keypoints
    best_of_n: np.ndarray  # the sample with the lowest error over the whole horizon, per window
    hold_last: np.ndarray  # the last observed keypoints
    constant_velocity: np.ndarray  # x_{n-1} + h (x_{n-1} - x_{n-2})
    num_windows: int
    num_samples: int

    def ratio_to_hold_last(self, name: str) -> float:
        """Mean over horizons of a row divided by hold-last's mean: < 1 beats holding still."""
        return float(np.mean(getattr(self, name)) / np.mean(self.hold_last))


class OpenLoop(NamedTuple):
    """Keypoints of an open-loop evaluation (all denormalised, (…, K, 3))."""

    detected: Tensor  # (B, n + H, K, 3) the detected keypoints of the whole window
    samples: Tensor  # (N, B, H, K, 3) imagined keypoints of each prior sample
    starts: Tensor  # (B,) flat row of each window's first frame in the split


def choose_window_starts(split: KeypointSplit, length: int, count: int, seed: int) -> Tensor:
    """Up to ``count`` window starts drawn without replacement, fixed by ``seed``."""
    starts = split.window_starts(length)
    if len(starts) == 0:
        raise ValueError(f"no episode of the split has {length} frames; use a shorter horizon")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(starts), generator=generator)[: min(count, len(starts))]
    return starts[chosen.sort().values]


@torch.no_grad()
def open_loop(
    model: WorldModel, split: KeypointSplit, starts: Tensor, num_observed: int, horizon: int, num_samples: int,
    seed: int, batch_size: int = 256,
) -> OpenLoop:  # fmt: skip
    """Observe, then imagine ``horizon`` frames ``num_samples`` times, for every window start."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    length = num_observed + horizon
    detected_parts, sample_parts = [], []
    for first in range(0, len(starts), batch_size):
        keypoints, actions = split.windows(starts[first : first + batch_size], length)  # (B, L, K, 3), (B, L, 6)
        keypoints, actions = keypoints.to(device), actions.to(device)
        batch = keypoints.shape[0]
        observed = model.observe(keypoints[:, :num_observed], actions[:, :num_observed], generator=generator)
        # The state after frame n-1 continues with a_{n-1} .. a_{L-2}: it predicts frames n .. L-1.
        future_actions = actions[:, num_observed - 1 : length - 1].repeat(num_samples, 1, 1)
        imagined = model.imagine(repeat_state(observed.final, num_samples), future_actions, num_samples=1, generator=generator)
        samples = imagined.keypoints.reshape(num_samples, batch, horizon, *keypoints.shape[2:])
        detected_parts.append(keypoints.cpu())
        sample_parts.append(samples.float().cpu())
    return OpenLoop(torch.cat(detected_parts), torch.cat(sample_parts, dim=1), starts)


def horizon_errors(result: OpenLoop, num_observed: int) -> HorizonErrors:
    """Reduce an open-loop evaluation to the per-horizon table."""
    target = result.detected[:, num_observed:]  # (B, H, K, 3)
    horizon = target.shape[1]

    def distance(predicted: Tensor) -> Tensor:  # (..., B, H, K, 3) -> (..., B, H)
        return (predicted[..., :2] - target[..., :2]).norm(dim=-1).mean(-1)

    per_sample = distance(result.samples)  # (N, B, H)
    best = per_sample.mean(-1).argmin(0)  # (B,) over the whole horizon
    rows = torch.arange(per_sample.shape[1])
    last = result.detected[:, num_observed - 1 : num_observed]  # (B, 1, K, 3)
    steps = torch.arange(1, horizon + 1, dtype=last.dtype)[None, :, None, None]  # (1, H, 1, 1)
    velocity = last - result.detected[:, num_observed - 2 : num_observed - 1] if num_observed >= 2 else 0 * last
    table = {
        "single": per_sample[0],
        "mean_of_n": distance(result.samples.mean(0)),
        "best_of_n": per_sample[best, rows],
        "hold_last": distance(last.expand_as(target)),
        "constant_velocity": distance(last + steps * velocity),
    }
    means = {name: value.mean(0).double().numpy() for name, value in table.items()}  # (H,) each
    return HorizonErrors(**means, num_windows=int(per_sample.shape[1]), num_samples=int(per_sample.shape[0]))


def benchmark_record(result: OpenLoop, num_observed: int, split: KeypointSplit | None) -> dict[str, Any]:
    """The benchmark's JSON record of one open-loop evaluation, as the trainer's summary.json and
    downstream/dynamics.py store it: per-horizon errors, their means and ratios to hold-last, and, given the
    keypoint ``split`` the windows came from, the detector's stability and the jump-free ratios (None, with no split, for
    models whose features are not keypoint positions: the cnn-vrnn baseline and the state-space bound)."""
    errors = horizon_errors(result, num_observed)
    names = PREDICTIONS + REFERENCES
    return {
        "mean_distance": {name: float(getattr(errors, name).mean()) for name in names},
        "ratio_to_hold_last": {name: errors.ratio_to_hold_last(name) for name in names},
        "per_horizon": {name: getattr(errors, name).tolist() for name in names},
        "num_windows": errors.num_windows,
        "num_samples": errors.num_samples,
        "stability": None if split is None else keypoint_stability(split)._asdict(),
        "jump_free_ratio_to_hold_last": None if split is None else jump_free_ratios(result, num_observed),
    }


class Stability(NamedTuple):
    """One-frame keypoint displacements (x, y) inside the episodes of a split, all keypoints."""

    mean_step: float  # mean distance a keypoint moves from one frame to the next
    median_step: float
    jump_rate: float  # fraction of one-frame moves longer than JUMP
    jump_share: float  # share of the summed displacement that is in those jumps
    still_rate: float  # fraction of one-frame moves shorter than STILL


def keypoint_stability(split: KeypointSplit, jump: float = JUMP) -> Stability:
    """How steadily the detector's keypoints move (see the module docstring)."""
    rows = [
        torch.arange(int(first), int(first) + int(size) - 1)
        for first, size in zip(split.episode_starts, split.episode_lengths)
        if size >= 2
    ]
    if not rows:
        raise ValueError("no episode of the split has two frames")
    row = torch.cat(rows)
    steps = (split.keypoints[row + 1, :, :2] - split.keypoints[row, :, :2]).double().norm(dim=-1).flatten()  # (N*K,)
    jumps = steps > jump
    total = float(steps.sum())
    return Stability(
        mean_step=float(steps.mean()),
        median_step=float(steps.median()),
        jump_rate=float(jumps.double().mean()),
        jump_share=float(steps[jumps].sum()) / total if total > 0 else 0.0,
        still_rate=float((steps < STILL).double().mean()),
    )


def jump_free_ratios(result: OpenLoop, num_observed: int, jump: float = JUMP) -> dict[str, float]:
    """The open-loop ratios to hold-last restricted to keypoint tracks without a jump: the (window,
    keypoint) pairs whose detected track moves at most ``jump`` per frame from the last observed frame to
    the end of the horizon. What a core predicts of the motion that physics explains, apart from the
    detector's jumps. Keys: PREDICTIONS, the share of tracks kept, and ``jump_floor``: the ratio to hold-last
    over all tracks of a predictor exact on the steady tracks that holds the jumping ones still, i.e. about
    the lowest ratio a core can reach on this detector's keypoints unless it foresees jumps."""
    detected = result.detected[:, num_observed - 1 :, :, :2]  # (B, 1 + H, K, 2)
    steady = (detected[:, 1:] - detected[:, :-1]).norm(dim=-1).amax(1) <= jump  # (B, K)
    target = detected[:, 1:]  # (B, H, K, 2)
    weight = steady[:, None, :].expand(target.shape[:3]).double()  # (B, H, K)

    def mean_distance(predicted: Tensor) -> float:  # (B, H, K, 2)
        distance = (predicted - target).norm(dim=-1).double()
        return float((distance * weight).sum() / weight.sum().clamp_min(1.0))

    samples = result.samples[..., :2]  # (N, B, H, K, 2)
    hold = mean_distance(detected[:, :1].expand_as(target))
    per_sample = (samples - target).norm(dim=-1).double()  # (N, B, H, K)
    per_window = (per_sample * weight).sum((2, 3)) / weight.sum((1, 2)).clamp_min(1.0)  # (N, B)
    best = samples[per_window.argmin(0), torch.arange(samples.shape[1])]  # (B, H, K, 2)
    ratios = {
        "single": mean_distance(samples[0]) / hold,
        "mean_of_n": mean_distance(samples.mean(0)) / hold,
        "best_of_n": mean_distance(best) / hold,
    }
    hold_distance = (detected[:, :1].expand_as(target) - target).norm(dim=-1).double()  # (B, H, K)
    floor = float((hold_distance * (1.0 - weight)).sum() / hold_distance.sum().clamp_min(1e-12))
    return ratios | {"tracks_kept": float(steady.double().mean()), "jump_floor": floor}


# ----------------------------------------------------------------------------------------------
# Probes: keypoints -> true state (worldmodel.probes)
# ----------------------------------------------------------------------------------------------
def task_rows(split: KeypointSplit, task_id: int) -> Tensor:
    """Flat rows of every frame of the task's episodes, in episode order."""
    rows = [
        torch.arange(int(first), int(first) + int(size))
        for first, size, task in zip(split.episode_starts, split.episode_lengths, split.task_ids)
        if int(task) == task_id
    ]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)


class ProbeResult(NamedTuple):
    detected_r2: float  # probe on detected test keypoints, mean over the state's dimensions
    predicted_r2: float  # the same probe on open-loop predicted keypoints (single sample); NaN if none
    detected_r2_per_dim: list[float]  # probe on detected test keypoints, each state dimension (NaN: constant)


def probe_task(
    train: KeypointSplit, test: KeypointSplit, task_id: int, train_states: Tensor, test_states: Tensor,
    open_loop_result: OpenLoop | None = None, num_observed: int = 0, readout: Readout = "linear", seed: int = 0,
    mlp_steps: int = MLP_STEPS,
) -> ProbeResult:  # fmt: skip
    """R^2 of the keypoints -> state probe (``readout``: worldmodel.probes) for one task. ``train_states`` /
    ``test_states`` (rows, D) hold the true state of every frame of the task's episodes, in the order of
    ``task_rows``."""
    train_rows, test_rows = task_rows(train, task_id), task_rows(test, task_id)
    if len(train_rows) != len(train_states) or len(test_rows) != len(test_states):
        raise ValueError("the true states do not line up with the keypoint cache's frames")
    probe = fit_probe(train.keypoints[train_rows].flatten(1), train_states, readout, seed, mlp_steps)
    per_dim = r_squared_per_dim(probe.predict(test.keypoints[test_rows].flatten(1)), test_states)
    detected = float(per_dim[~per_dim.isnan()].mean())
    predicted = float("nan")
    if open_loop_result is not None:
        horizon = open_loop_result.samples.shape[2]
        mine = torch.isin(open_loop_result.starts, test_rows)
        if mine.any():
            rows = open_loop_result.starts[mine, None] + num_observed + torch.arange(horizon)  # (B', H) split rows
            positions = torch.searchsorted(test_rows, rows.flatten())  # test_rows is sorted
            keypoints = open_loop_result.samples[0, mine].flatten(0, 1).flatten(1)  # (B' * H, K*3)
            predicted = r_squared(probe.predict(keypoints), test_states[positions])
    return ProbeResult(detected, predicted, per_dim.tolist())
