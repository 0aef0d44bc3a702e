"""Which test episodes carry a task's predicted-step reward error? A finished reward experiment, fold by fold.

    python downstream/reward_episodes.py --task acrobot --reward-out runs/reward --folds 1

Refits the experiment's reward predictors (downstream/reward.py, the same ``--out``) on its cached hidden states
for one task and the chosen folds, with the experiment's own settings (a fit runs on one torch thread, so it
gives the experiment's numbers again: the report says whether it did; of an experiment with --predictor-repeats,
those of its first predictor seed), and splits each fold's predicted-step
normalized MSE by test episode: each episode's share of the summed squared error, the fold's figure without
it, and the highest true and predicted rewards on its predicted frames.

Why: random-policy rewards are heavy-tailed, so the null model's error (the normaliser) is small and one
confident false prediction can decide a fold. On acrobot, one test episode that the world models imagine as a
swing-up carries 90-98% of the error of the folds that blew up (docs/DYNAMICS.md). Writes
``episodes-<task>.json`` and ``episodes-<task>.md`` to ``--reward-out``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np
from tqdm.auto import tqdm

from worldmodel.errors import InputError, run_cli
from worldmodel.hidden_states import WindowFeatures, load_features
from worldmodel.reward import (
    RewardTrainConfig,
    align_rewards,
    episode_folds,
    fit_reward_predictor,
    null_reward,
    predict_rewards,
)
from worldmodel.reward_experiment import (
    cached_inputs,
    fit_config,
    fits_directory,
    read_meta,
    result_path,
    write_analysis,
)
from worldmodel.reward_jobs import InputKind
from worldmodel.reward_report import EpisodeError, episode_errors, summarize


@dataclass(frozen=True)
class Args:
    task: str
    """The task to look into (one the experiment ran, e.g. acrobot)."""
    reward_out: Path = Path("runs/reward")
    """The ``--out`` folder of a finished downstream/reward.py run (its results.json and caches)."""
    folds: str = "all"
    """Comma-separated folds to refit (0-based), or 'all': every fold the experiment ran (--folds-run)."""
    inputs: str = "all"
    """Comma-separated report rows to look into (e.g. 'struct-vrnn,cnn-vrnn'), or 'all'."""
    top: int = 5
    """Episodes listed per input and fold, largest share first."""


def chosen(values: str, available: list[Any], option: str) -> list[Any]:
    """The comma-separated choice of --folds or --inputs, checked against what the experiment has."""
    if values == "all":
        return available
    try:
        picked = [type(available[0])(value.strip()) if available else value.strip() for value in values.split(",")]
    except ValueError:
        raise InputError(f"--{option}: {values!r} is not a comma-separated list of numbers, nor 'all'") from None
    unknown = [value for value in picked if value not in available]
    if unknown:
        raise InputError(f"--{option}: {', '.join(map(str, unknown))} not in the experiment "
                         f"(it has {', '.join(map(str, available))})")  # fmt: skip
    return picked


def cached_figure(path: Path, num_observed: int) -> float | None:
    """The experiment's own predicted-step figure of a fit, from its result file (None if it has none)."""
    if not path.is_file():
        return None
    return summarize(np.load(path)[None], num_observed).predicted_mean  # (2, L) -> one fold of (folds, 2, L)


def refit_fold(features: WindowFeatures, kind: InputKind, fold: tuple[np.ndarray, np.ndarray],
               config: RewardTrainConfig, num_observed: int) -> tuple[float, list[EpisodeError]]:  # fmt: skip
    """Fit a predictor on the fold's training windows of one input (``kind`` of the cached features) and split
    its test error by episode."""
    inputs = getattr(features, kind)
    train, test = fold
    fit = fit_reward_predictor(inputs[train], features.rewards[train], features.episodes[train], config)
    predicted = predict_rewards(fit.predictor, inputs[test]).numpy()  # (N, L)
    targets = align_rewards(features.rewards[test])[0].numpy()  # (N, L)
    null = null_reward(features.rewards[train])
    return episode_errors(predicted, targets, null, features.episodes[test], num_observed)


def markdown(task: str, report: dict[str, dict[int, dict[str, Any]]]) -> str:
    lines = [f"{task}: predicted-step normalized reward MSE per fold, and the test episode with the largest share",
             "", "| input | fold | figure | experiment's fit | worst episode | its share | fold without it "
             "| its max reward | max predicted there |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, per_fold in report.items():
        for fold, entry in per_fold.items():
            worst = entry["episodes"][0]
            cached = "-" if entry["experiment"] is None else f"{entry['experiment']:.3f}"
            lines.append(f"| {label} | {fold} | {entry['figure']:.3f} | {cached} | {worst['episode']} "
                         f"({worst['windows']} windows) | {worst['share']:.0%} | {worst['fold_without']:.3f} | "
                         f"{worst['max_reward']:.3f} | {worst['max_predicted']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict[str, Any]:
    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    meta = read_meta(args.reward_out)
    settings, num_observed = meta["args"], meta["num_observed"]
    inputs = {cached.label: cached for cached in cached_inputs(args.reward_out, meta, args.task)}  # missing: InputError
    labels = chosen(args.inputs, list(inputs), "inputs")
    folds_run = settings.get("folds_run", settings["folds"])
    folds = chosen(args.folds, list(range(folds_run)), "folds")
    config = fit_config(settings)  # as downstream/reward.py fits
    fits_dir = fits_directory(args.reward_out, settings["seed"], settings["sequences"], settings["folds"], config)
    with np.load(inputs[labels[0]].features) as cached:
        splits = episode_folds(cached["episodes"], settings["folds"], settings["seed"])  # the experiment's folds

    report: dict[str, dict[int, dict[str, Any]]] = {}
    progress = tqdm(total=len(labels) * len(folds), desc=f"{args.task} refits", unit="fit")
    for label in labels:
        features = load_features(inputs[label].features)  # once per input: a task's cache is ~200 MB
        for fold in folds:
            figure, episodes = refit_fold(features, inputs[label].kind, splits[fold], config, num_observed)
            experiment = cached_figure(result_path(fits_dir, args.task, inputs[label].key, fold), num_observed)
            report.setdefault(label, {})[fold] = {
                "figure": figure, "experiment": experiment,
                "reproduced": experiment is not None and bool(np.isclose(figure, experiment, rtol=1e-4)),
                "episodes": [row._asdict() for row in episodes[: args.top]],
            }  # fmt: skip
            progress.update(1)
    progress.close()
    record = {"task": args.task, "num_observed": num_observed, "inputs": report}
    write_analysis(args.reward_out, f"episodes-{args.task}", record, markdown(args.task, report))
    return record


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, argv, __doc__)


if __name__ == "__main__":
    sys.exit(cli())
