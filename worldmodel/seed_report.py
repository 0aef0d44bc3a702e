"""Two kinds of world model compared over training seeds, in the reward experiment.

The fold-paired test of ``reward_report`` asks whether two *runs* differ on the same test folds. Reseeding
the dynamics stage alone moves a run's predicted-step error by a few hundredths, beyond that test's spread
on half the tasks (docs/RESULTS.md), so it cannot say whether two *models* differ. This module asks
that over seeds: each kind (variant and dynamics core, e.g. ``struct-vrnn / vrnn``) is a sample of
independently trained runs, each run scored by its mean over the folds, and two kinds are compared by
Welch's t-test on those scores (unequal variances; the paper averaged 5 initialisations per model).

Independent means trained apart: a run whose perception (the vision weights, ``vision_fingerprint``) is the
same as an earlier run's, as with ``train/world_model.py --vision-from``, shares that run's detector and would
understate the spread, so it is left out of its kind's sample and named in the report.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

from worldmodel.reward_report import Results

SIGNIFICANCE = 0.05  # two-sided level of the verdict


class RunKind(NamedTuple):
    """Which sample a world model of the report belongs to."""

    label: str  # its column in the report
    kind: str  # variant and dynamics core, e.g. "struct-vrnn / vrnn"
    perception: str  # keypoint_cache.vision_fingerprint: runs that share one are not independent


class SeedGroups(NamedTuple):
    samples: dict[str, list[str]]  # kind -> labels of its independently trained runs, in report order
    left_out: dict[str, str]  # label -> label of the earlier run whose perception it shares


class SeedComparison(NamedTuple):
    """One kind's mean predicted-step error over its runs minus another's, with Welch's t-test."""

    first_mean: float
    first_std: float  # spread over runs (sample standard deviation)
    first_runs: int
    second_mean: float
    second_std: float
    second_runs: int
    difference: float  # first_mean - second_mean; negative: the first kind is better
    standard_error: float  # of that difference
    degrees_of_freedom: float  # Welch-Satterthwaite
    p_value: float  # two-sided


def seed_groups(runs: list[RunKind]) -> SeedGroups:
    """The runs of each kind that count as independent samples: the first of those sharing a perception."""
    samples: dict[str, list[str]] = {}
    left_out: dict[str, str] = {}
    first_with: dict[str, str] = {}  # perception fingerprint -> label of the first run with it
    for run in runs:
        if run.perception in first_with:
            left_out[run.label] = first_with[run.perception]
            continue
        first_with[run.perception] = run.label
        samples.setdefault(run.kind, []).append(run.label)
    return SeedGroups(samples, left_out)


def welch(first: np.ndarray, second: np.ndarray) -> SeedComparison:
    """Welch's t-test of mean(first) - mean(second); each needs >= 2 values."""
    if len(first) < 2 or len(second) < 2:
        raise ValueError(f"a seed comparison needs >= 2 runs of each kind, got {len(first)} and {len(second)}")
    first_var, second_var = first.var(ddof=1) / len(first), second.var(ddof=1) / len(second)
    difference = float(first.mean() - second.mean())
    standard_error = math.sqrt(first_var + second_var)
    if standard_error == 0:  # every run of both kinds scored the same: no spread to test against
        dof, p_value = float("inf"), (1.0 if difference == 0 else 0.0)
    else:
        dof = (first_var + second_var) ** 2 / (first_var**2 / (len(first) - 1) + second_var**2 / (len(second) - 1))
        p_value = float(2 * stats.t.sf(abs(difference) / standard_error, dof))
    return SeedComparison(
        float(first.mean()), float(first.std(ddof=1)), len(first),
        float(second.mean()), float(second.std(ddof=1)), len(second),
        difference, standard_error, float(dof), p_value,
    )  # fmt: skip


def compare_over_seeds(results: Results, first: list[str], second: list[str]) -> dict[str, SeedComparison]:
    """Per task, the kind of runs ``first`` against that of ``second`` on the predicted frames."""
    comparisons = {}
    for task, by_input in results.items():
        if all(label in by_input for label in (*first, *second)):
            scores = [np.array([by_input[label].predicted_mean for label in labels]) for labels in (first, second)]
            comparisons[task] = welch(*scores)
    return comparisons


def seed_verdict(comparison: SeedComparison) -> str:
    """'lower' / 'higher' where the first kind differs at the SIGNIFICANCE level, else 'not separable'."""
    if comparison.p_value >= SIGNIFICANCE:
        return "not separable"
    return "lower" if comparison.difference < 0 else "higher"


def comparable_pairs(groups: SeedGroups) -> list[tuple[str, str]]:
    """The first kind against each other kind, where both have >= 2 independent runs."""
    kinds = [kind for kind, labels in groups.samples.items() if len(labels) >= 2]
    first = next(iter(groups.samples), None)  # the first run's kind
    if first is None or first not in kinds:
        return []
    return [(first, other) for other in kinds if other != first]


def seed_comparisons(results: Results, groups: SeedGroups) -> dict[tuple[str, str], dict[str, SeedComparison]]:
    """(first kind, other kind) -> per task comparison, for every comparable pair."""
    return {
        (first, second): compare_over_seeds(results, groups.samples[first], groups.samples[second])
        for first, second in comparable_pairs(groups)
    }


def seed_json(groups: SeedGroups, comparisons: dict[tuple[str, str], dict[str, SeedComparison]]) -> dict:
    return {
        "samples": groups.samples,
        "left_out": groups.left_out,
        "comparisons": {
            f"{first} - {second}": {
                task: {**_finite_or_none(c._asdict()), "verdict": seed_verdict(c)} for task, c in by_task.items()
            }
            for (first, second), by_task in comparisons.items()
        },
    }


def seed_table(groups: SeedGroups, comparisons: dict[tuple[str, str], dict[str, SeedComparison]]) -> str:
    """The report's section on seeds: which runs form each kind's sample and, where two kinds have >= 2 runs
    each, the comparison per task; '' when every kind has a single run and nothing was left out."""
    if all(len(labels) < 2 for labels in groups.samples.values()) and not groups.left_out:
        return ""
    lines = ["Over training seeds (each run scored by its mean over the folds; Welch's t-test between kinds)", ""]
    for kind, labels in groups.samples.items():
        lines.append(f"- {kind}: {len(labels)} independent run{'s' * (len(labels) != 1)} ({', '.join(labels)})")
    for label, shares in groups.left_out.items():
        lines.append(f"- left out: {label}, whose perception is that of {shares} (not an independent seed)")
    if not comparisons:
        lines.append("\nNo two kinds have 2 or more independent runs each: nothing to compare over seeds.")
    for (first, second), by_task in comparisons.items():
        lines += [
            "",
            f"{first} - {second}, predicted frames (mean ± std over runs; p: two-sided, "
            f"'lower' / 'higher' at p < {SIGNIFICANCE})",
            "",
            f"| task | {first} | {second} | difference | p | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for task, c in by_task.items():
            lines.append(
                f"| {task} | {c.first_mean:.3f} ± {c.first_std:.3f} | {c.second_mean:.3f} ± {c.second_std:.3f} "
                f"| {c.difference:+.3f} ± {c.standard_error:.3f} | {c.p_value:.3f} | {seed_verdict(c)} |"
            )
        lower = sum(seed_verdict(c) == "lower" for c in by_task.values())
        runs = f"{len(groups.samples[first])} and {len(groups.samples[second])} runs"
        lines.append(f"\n{first} lower over seeds on {lower} of {len(by_task)} tasks ({runs}).")
    return "\n".join(lines) + "\n"


def _finite_or_none(numbers: dict) -> dict:
    """JSON has no infinity (the degrees of freedom where no run differs from another): null instead."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in numbers.items()}
