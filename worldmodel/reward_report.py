"""Reports of the reward experiment: normalized MSE per task, per frame, observed vs predicted (Figure 8).

A result is, for one task and one input (a world model's hidden states or a control), the reward
predictor's test MSE divided by the null model's (which predicts the mean training reward at every step),
per fold: per frame for the curves of Figure 8, and over the observed (1 .. num_observed-1) and the
predicted frames (num_observed ..) for the table, as a ratio of summed errors (the share of the reward
variance left unexplained on those steps). Frame 0 has no target (NaN).

Why ratios of sums: random-policy rewards are heavy-tailed (acrobot: mean 0.004, std 0.08, a few
swing-ups), so the null model's error differs several-fold between frame positions of the same windows;
the mean of per-frame ratios would weight the frames where the null model happens to be lucky most.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from worldmodel.atomic import atomic_write, atomic_write_text

# The controls beside the world models, in the order the report shows them: the state-space bound (a
# dynamics core on the true states, through the same protocol), the true states themselves at every step
# (no world model can reach that on predicted steps) and the actions alone.
STATE_BOUND = "state-space bound"
TRUE_STATES = "true states"
ACTIONS_ONLY = "actions only"
CONTROLS = (STATE_BOUND, TRUE_STATES, ACTIONS_ONLY)


class InputResult(NamedTuple):
    normalized_mse: np.ndarray  # (folds, L) per-frame MSE / null-model MSE; NaN at frame 0 (and where null = 0)
    observed_mean: float
    observed_std: float  # spread over folds
    predicted_mean: float
    predicted_std: float


def summarize(errors: np.ndarray, num_observed: int) -> InputResult:
    """errors (folds, 2, L): per-frame test MSE of the predictor (row 0) and of the null model (row 1).
    -> per-frame normalized MSE, and the mean and fold-to-fold spread over observed and predicted frames."""
    mse, null = errors[:, 0], errors[:, 1]  # (folds, L)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized_mse = np.where(null > 0, mse / null, np.nan)
        observed = np.nansum(mse[:, 1:num_observed], 1) / np.nansum(null[:, 1:num_observed], 1)  # (folds,)
        predicted = np.nansum(mse[:, num_observed:], 1) / np.nansum(null[:, num_observed:], 1)
    return InputResult(
        normalized_mse,
        float(observed.mean()),
        float(observed.std()),
        float(predicted.mean()),
        float(predicted.std()),
    )


Results = dict[str, dict[str, InputResult]]  # task -> input label -> result


def fold_mean_and_spread(normalized_mse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame mean and std over folds (L,), NaN where no fold has a value (frame 0) without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: frame 0 has no target
        return np.nanmean(normalized_mse, 0), np.nanstd(normalized_mse, 0)


def write_json(path: Path, results: Results, meta: dict) -> None:
    payload = {
        "meta": meta,
        "tasks": {
            task: {
                label: {
                    "observed": r.observed_mean,
                    "observed_std": r.observed_std,
                    "predicted": r.predicted_mean,
                    "predicted_std": r.predicted_std,
                    "per_frame_mean": _nan_to_none(fold_mean_and_spread(r.normalized_mse)[0]),
                    "per_frame_folds": [_nan_to_none(row) for row in r.normalized_mse],
                }
                for label, r in by_input.items()
            }
            for task, by_input in results.items()
        },
    }
    atomic_write_text(path, json.dumps(payload, indent=2))


def markdown_table(results: Results) -> str:
    """One row per task, one column pair (observed / predicted) per input, and the mean over tasks."""
    labels = list(dict.fromkeys(label for by_input in results.values() for label in by_input))
    header = "| task | " + " | ".join(f"{label} obs. | {label} pred." for label in labels) + " |"
    rule = "|---|" + "---|---|" * len(labels)
    lines = [header, rule]
    for task, by_input in results.items():
        cells = []
        for label in labels:
            r = by_input.get(label)
            cells += (
                [f"{r.observed_mean:.2f} ± {r.observed_std:.2f}", f"{r.predicted_mean:.2f} ± {r.predicted_std:.2f}"]
                if r
                else ["", ""]
            )
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    means = []
    for label in labels:
        rs = [by_input[label] for by_input in results.values() if label in by_input]
        means += [f"{np.mean([r.observed_mean for r in rs]):.2f}", f"{np.mean([r.predicted_mean for r in rs]):.2f}"]
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def plot_figure8(path: Path, results: Results, num_observed: int) -> None:
    """Normalized MSE over time, one panel per task, one line per input (controls dashed); the context
    boundary a dashed grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    columns = min(3, len(tasks))
    rows = int(np.ceil(len(tasks) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis, task in zip(axes.flat, tasks):
        for label, r in results[task].items():
            frames = np.arange(r.normalized_mse.shape[1])
            mean, spread = fold_mean_and_spread(r.normalized_mse)
            style = "--" if label in CONTROLS else "-"
            line, = axis.plot(frames[1:], mean[1:], style, label=label)
            axis.fill_between(frames[1:], (mean - spread)[1:], (mean + spread)[1:], color=line.get_color(), alpha=0.2)
        axis.axvline(num_observed - 0.5, color="gray", linestyle="--", linewidth=1)
        axis.axhline(1.0, color="black", linewidth=0.5)
        axis.set_title(task)
        axis.set_xlabel("frame (observed | predicted)")
        axis.set_ylabel("MSE / null-model MSE")
    for axis in list(axes.flat)[len(tasks):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)


def _nan_to_none(values) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=float)]
