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
    observed_folds: np.ndarray  # (folds,) each fold's ratio over the observed frames
    predicted_folds: np.ndarray  # (folds,) and over the predicted frames


class PairedDifference(NamedTuple):
    """One world model's normalized MSE minus another's on the same folds (the same test windows)."""

    mean: float  # mean over folds of (first - second); negative: the first is better
    std: float  # spread over folds of that difference
    first_lower: int  # folds in which the first model's error is lower
    folds: int


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
        observed,
        predicted,
    )


Results = dict[str, dict[str, InputResult]]  # task -> input label -> result


class EpisodeError(NamedTuple):
    """One test episode's part in a fold's predicted-step error (``episode_errors``)."""

    episode: int
    windows: int  # the fold's test windows cut from it
    share: float  # of the fold's summed squared error on predicted frames
    fold_without: float  # the fold's predicted-step normalized MSE with this episode's windows left out
    max_reward: float  # the highest true reward on its windows' predicted frames
    max_predicted: float  # the highest reward the predictor gave there


def episode_errors(
    predicted: np.ndarray, targets: np.ndarray, null_reward: float, episodes: np.ndarray, num_observed: int
) -> tuple[float, list[EpisodeError]]:
    """A fold's predicted-step normalized MSE, and each test episode's part in it, largest share first.

    predicted, targets (N, L): the predictor's rewards and the aligned true ones (``reward.align_rewards``) of the
    fold's N test windows; null_reward: the null model's constant prediction; episodes (N,): each window's
    episode. Over frames num_observed .. L-1, as ``summarize``'s predicted-step figure (a ratio of sums).

    Why per episode: on heavy-tailed rewards one false imagined swing-up can carry nearly all of a fold's error
    (docs/DYNAMICS.md), and the fold's figure alone cannot show it.
    """
    squared = ((predicted - targets)[:, num_observed:] ** 2).sum(1)  # (N,)
    null_squared = ((targets[:, num_observed:] - null_reward) ** 2).sum(1)  # (N,)
    total, null_total = squared.sum(), null_squared.sum()
    rows = []
    for episode in np.unique(episodes):
        mine = episodes == episode
        rest = null_total - null_squared[mine].sum()
        rows.append(EpisodeError(
            int(episode), int(mine.sum()), float(squared[mine].sum() / total) if total > 0 else 0.0,
            float((total - squared[mine].sum()) / rest) if rest > 0 else float("nan"),
            float(targets[mine, num_observed:].max()), float(predicted[mine, num_observed:].max()),
        ))  # fmt: skip
    rows.sort(key=lambda row: -row.share)
    return float(total / null_total) if null_total > 0 else float("nan"), rows


def fold_mean_and_spread(normalized_mse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame mean and std over folds (L,), NaN where no fold has a value (frame 0) without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: frame 0 has no target
        return np.nanmean(normalized_mse, 0), np.nanstd(normalized_mse, 0)


def world_models(results: Results) -> list[str]:
    """The labels of the world models in the results (every input that is not a control), in order."""
    labels = dict.fromkeys(label for by_input in results.values() for label in by_input)
    return [label for label in labels if label not in CONTROLS]


def paired_differences(results: Results, first: str, second: str, predicted: bool = True) -> dict[str, PairedDifference]:
    """Per task, ``first``'s normalized MSE minus ``second``'s fold by fold, on the predicted (or observed) frames.

    Why paired: every input of a task is fitted and tested on the same folds of the same windows, and which
    episodes a fold tests on moves both models' errors together (acrobot: a fold with a rare swing-up is hard
    for every model). The spread of the difference is what separates two models; the spread of each alone
    mostly measures the folds.
    """
    differences = {}
    for task, by_input in results.items():
        if first not in by_input or second not in by_input:
            continue
        a, b = by_input[first], by_input[second]
        delta = (a.predicted_folds - b.predicted_folds) if predicted else (a.observed_folds - b.observed_folds)
        differences[task] = PairedDifference(float(delta.mean()), float(delta.std()), int((delta < 0).sum()), len(delta))
    return differences


def verdict(difference: PairedDifference) -> str:
    """Whether the first model is lower, higher or level by more than the spread of the paired difference."""
    if difference.mean + difference.std < 0:
        return "lower"
    if difference.mean - difference.std > 0:
        return "higher"
    return "within spread"


def write_json(path: Path, results: Results, meta: dict, seeds: dict | None = None) -> None:
    """results.json; ``seeds``: the comparison over training seeds (``seed_report.seed_json``), if any."""
    models = world_models(results)
    payload = {
        "meta": meta,
        "tasks": {
            task: {
                label: {
                    "observed": r.observed_mean,
                    "observed_std": r.observed_std,
                    "predicted": r.predicted_mean,
                    "predicted_std": r.predicted_std,
                    "observed_folds": _nan_to_none(r.observed_folds),
                    "predicted_folds": _nan_to_none(r.predicted_folds),
                    "per_frame_mean": _nan_to_none(fold_mean_and_spread(r.normalized_mse)[0]),
                    "per_frame_folds": [_nan_to_none(row) for row in r.normalized_mse],
                }
                for label, r in by_input.items()
            }
            for task, by_input in results.items()
        },
        # The first world model against each other one, fold by fold on the predicted frames.
        "paired_predicted": {
            f"{models[0]} - {other}": {
                task: {**d._asdict(), "verdict": verdict(d)}
                for task, d in paired_differences(results, models[0], other).items()
            }
            for other in models[1:]
        },
        "seeds": seeds or {},
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


def paired_table(results: Results) -> str:
    """The first world model against each other one on the predicted frames, fold by fold; '' for one model."""
    models = world_models(results)
    blocks = []
    for other in models[1:]:
        first = models[0]
        lines = [
            f"{first} - {other}, predicted frames, paired by fold (mean ± spread of the difference; "
            f"'lower': {first} below {other} by more than that spread)",
            "",
            "| task | difference | folds where lower | verdict |",
            "|---|---|---|---|",
        ]
        differences = paired_differences(results, first, other)
        for task, d in differences.items():
            lines.append(f"| {task} | {d.mean:+.3f} ± {d.std:.3f} | {d.first_lower} of {d.folds} | {verdict(d)} |")
        lower = sum(verdict(d) == "lower" for d in differences.values())
        lines.append(f"\n{first} lower beyond the paired spread on {lower} of {len(differences)} tasks.")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


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
