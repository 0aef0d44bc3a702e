"""The folder of a reward experiment (``downstream/reward.py --out``): where it keeps what, and reading it back.

    <out>/results.json                                   the report; its "meta" names the inputs and the settings
    <out>/cache/<model>-s<seed>-n<windows>/<task>.npz    a model's hidden states of the task's test windows
    <out>/cache/fits-s<seed>-n<windows>-f<folds>-<fit key>/<task>/<input>-fold<k>.npy   one fit's test errors
                                                         (one fits folder per predictor seed)

``<model>`` is the first 16 characters of the world model's fingerprint; ``<fit key>`` hashes everything that
changes a fit's numbers (the predictor's version, the result format and the training settings), so a change
to any of them refits instead of reusing old results. The experiment writes these; the analyses that read a
finished experiment (downstream/state_probe.py, downstream/reward_episodes.py) find them through this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

from worldmodel.atomic import atomic_write_text
from worldmodel.errors import InputError
from worldmodel.reward import FIT_VERSION, RewardTrainConfig
from worldmodel.reward_jobs import RESULT_FORMAT, InputKind
from worldmodel.reward_report import ACTIONS_ONLY, STATE_BOUND, TRUE_STATES

# The controls' report rows -> (the key naming their fits, the cached array they read).
CONTROL_KEYS = {TRUE_STATES: ("true-states", "states"), ACTIONS_ONLY: ("actions-only", "actions")}


def features_path(out: Path, fingerprint: str, seed: int, sequences: int, task: str) -> Path:
    """Where the experiment caches a model's hidden states (and the windows' rewards, states and actions)."""
    return out / "cache" / f"{fingerprint[:16]}-s{seed}-n{sequences}" / f"{task}.npz"


def fit_config(settings: Mapping[str, Any]) -> RewardTrainConfig:
    """The predictors' training settings of an experiment, from its options (``downstream/reward.py``'s as a dict,
    or a report's meta "args"): ``predictor_seed`` seeds them where given (reports from before it: ``seed``)."""
    seed = settings.get("predictor_seed")
    return RewardTrainConfig(epochs=settings["epochs"], seed=settings["seed"] if seed is None else seed)


def fit_configs(settings: Mapping[str, Any]) -> list[RewardTrainConfig]:
    """The settings of every predictor the experiment fits per input and fold: ``predictor_repeats`` of them
    (reports from before it: 1), seeded ``fit_config``'s seed, seed + 1, ...; the first is ``fit_config``'s."""
    first = fit_config(settings)
    return [replace(first, seed=first.seed + repeat) for repeat in range(settings.get("predictor_repeats", 1))]


def fits_directory(out: Path, seed: int, sequences: int, folds: int, config: RewardTrainConfig) -> Path:
    """Where the experiment keeps its fits' results for these settings."""
    fit_key = hashlib.sha256(json.dumps([FIT_VERSION, RESULT_FORMAT, asdict(config)]).encode()).hexdigest()[:8]
    return out / "cache" / f"fits-s{seed}-n{sequences}-f{folds}-{fit_key}"


def result_path(fits_dir: Path, task: str, key: str, fold: int) -> Path:
    """One fit's result: the per-frame test MSE of the predictor and of the null model (reward_jobs.run_fit_job)."""
    return fits_dir / task / f"{key}-fold{fold}.npy"


def read_meta(out: Path) -> dict[str, Any]:
    """The "meta" record of a finished experiment's results.json (its settings and inputs)."""
    path = out / "results.json"
    if not path.is_file():
        raise InputError(f"no {path}: run the reward experiment first (python downstream/reward.py --out {out})")
    try:
        meta = json.loads(path.read_text())["meta"]
        missing = [key for key in ("seed", "sequences", "folds", "epochs") if key not in meta["args"]]
        missing += [key for key in ("runs", "num_observed") if key not in meta]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path} is not a report of downstream/reward.py ({error!r}); "
                         "run the experiment again") from None
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: it is not a report of this version of "
                         f"downstream/reward.py; run the experiment again (python downstream/reward.py --out {out})")
    return meta


class CachedInput(NamedTuple):
    """One input of the experiment, as its fits read it."""

    label: str  # its row in the report
    key: str  # names its fits' result files
    features: Path  # the cache it reads
    kind: InputKind  # which of the cached arrays is the predictor's input


def cached_inputs(out: Path, meta: dict[str, Any], task: str, hidden_only: bool = False) -> list[CachedInput]:
    """Every input the experiment fitted on the task: each run's hidden states, the state-space bound's (if any),
    then the controls (if it ran them; they read the first run's cache). ``hidden_only``: the models alone."""
    settings = meta["args"]
    models = [(label, run["fingerprint"]) for label, run in meta["runs"].items()]
    if meta.get("state_bound"):
        models.append((STATE_BOUND, meta["state_bound"]["fingerprint"]))
    seed, sequences = settings["seed"], settings["sequences"]
    inputs = [
        CachedInput(label, fingerprint[:16], features_path(out, fingerprint, seed, sequences, task), "hidden")
        for label, fingerprint in models
    ]
    if settings.get("controls") and not hidden_only and inputs:
        first = inputs[0].features
        inputs += [CachedInput(label, key, first, kind) for label, (key, kind) in CONTROL_KEYS.items()]  # type: ignore[misc]
    for cached in inputs:
        if not cached.features.is_file():
            raise InputError(f"no cached hidden states of {cached.label} for {task} ({cached.features}); rerun the "
                             f"reward experiment with this task (downstream/reward.py --out {out})")  # fmt: skip
    return inputs


def write_analysis(out: Path, name: str, record: dict[str, Any], table: str) -> None:
    """Write an analysis of the experiment beside its report: ``<name>.json`` (the record) and ``<name>.md`` (the
    table, also printed)."""
    atomic_write_text(out / f"{name}.json", json.dumps(record, indent=1))
    atomic_write_text(out / f"{name}.md", table)
    print(table)
