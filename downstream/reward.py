"""The paper's reward experiment (Minderer et al. 2019, Figure 8 and S2.3): do the VRNN hidden states predict reward?

    python downstream/reward.py --run runs/world_model --run runs/cnn_vrnn --state-bound runs/state_vrnn

For each task: hidden states of up to ``--sequences`` length-20 test windows (8 observed through the
posterior, 12 predicted through the prior from the true actions), cached under ``--out``; a GRU reward
predictor per task and input trained on 80% of the windows (split by episode) and tested on the rest,
over several folds; MSE normalized by the null model's (the mean training reward at every step). Two controls: the true
low-dimensional states (upper bound) and the actions alone; a third with ``--state-bound``: the hidden
states of a dynamics core trained on the true states (``train/world_model.py --model state-vrnn``), the
best a world model with perfect perception reaches through the same protocol. Writes results.json,
results.md and figure8.png to ``--out``, and each run's fold-0 predictors to
``<run>/reward_predictors/<task>.pt`` (tagged with the world model's fingerprint, which the imagination
envs check; none for the state-space bound, which has no imagination env).

The fits run as independent jobs in ``--workers`` processes, each writing its result under ``--out/cache``:
an interrupted experiment continues where it stopped, and a rerun with the same settings fits nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np
import tyro
from tqdm.auto import tqdm

from worldmodel.atomic import atomic_write_text
from worldmodel.checkpoint import check_dataset_fits, find_checkpoint, load_world_model
from worldmodel.devices import resolve_device
from worldmodel.errors import InputError, run_script
from worldmodel.fingerprint import model_fingerprint
from worldmodel.hidden_states import extract_window_features, save_features
from worldmodel.reward import FIT_VERSION, RewardTrainConfig, episode_folds
from worldmodel.machine import available_cores
from worldmodel.reward_jobs import RESULT_FORMAT, FitJob, InputKind, SavedPredictor, run_fit_jobs
from worldmodel.reward_report import (
    ACTIONS_ONLY,
    STATE_BOUND,
    TRUE_STATES,
    Results,
    markdown_table,
    plot_figure8,
    summarize,
    write_json,
)
from worldmodel.state_bound import StateSizeMismatch, check_state_dim
from worldmodel.storage import checked_dataset_files
from worldmodel.tasks import parse_tasks
from worldmodel.config import OBSERVED_STEPS

PREDICTOR_DIR = "reward_predictors"
DEFAULT_RUNS = (Path("runs/world_model"),)
NUM_OBSERVED = OBSERVED_STEPS  # of the 20 frames of a window: through the posterior; the rest open loop (Figure 8)
WINDOW_LENGTH = 20


@dataclass(frozen=True)
class Args:
    run: tyro.conf.UseAppendAction[tuple[Path, ...]] = ()
    """World-model run directory (or checkpoint file) of train/world_model.py; repeat the flag to compare several (--run A --run B). None given: runs/world_model."""
    state_bound: Path | None = None
    """Run directory of a state-space bound (train/world_model.py --model state-vrnn on the same tasks): its hidden states are reported as the control column 'state-space bound'."""
    data: Path = Path("data/dmcs")
    """Dataset directory of collect/dmcs.py; its test split is used."""
    out: Path = Path("runs/reward")
    """Where the report, the plot and the hidden-state cache go."""
    tasks: str = "all"
    """Comma-separated tasks, or 'all'."""
    sequences: int = 10_000
    """Length-20 test windows per task (fewer if the test split has fewer)."""
    epochs: int = 60
    """Maximum epochs per reward predictor (early stopping usually ends sooner)."""
    folds: int = 5
    """Splits by episode: each fold tests on 1/folds of the episodes (5 = 80/20, S2.3)."""
    folds_run: int = 3
    """How many of the folds to train and test; their spread is reported."""
    controls: bool = True
    """Also fit the controls: true low-dimensional states (upper bound) and actions only."""
    seed: int = 0
    """Seeds window choice, prior samples, splits and predictor training."""
    device: str = "auto"
    """'cpu', 'cuda', or 'auto' (cuda if available)."""
    batch_size: int = 256
    """Windows per batch when extracting hidden states."""
    workers: int = available_cores()
    """Processes fitting reward predictors side by side (default: one per CPU core); 1 fits in this process."""


def main(args: Args) -> None:
    """The experiment; bad input raises InputError before anything is written."""
    for name in ("sequences", "epochs", "folds", "folds_run", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.folds_run > args.folds or args.folds < 2:
        raise InputError(f"need 2 <= --folds and --folds-run <= --folds, got {args.folds} and {args.folds_run}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    tasks = parse_tasks(args.tasks)
    for run_path in args.run or DEFAULT_RUNS:
        find_checkpoint(run_path)  # missing: CheckpointError saying how to train one (loaded, and checked, below)
    # Each task's test files: the main file, then its parts (absent, damaged, mismatched parts: InputError).
    test_files = {task: checked_dataset_files(args.data, task, "test") for task in tasks}
    for files in test_files.values():  # enough test data for the folds and the windows
        info, episodes = files[0], sum(part.num_episodes for part in files)
        if episodes < args.folds:  # folds split the test windows by episode
            raise InputError(
                f"{info.path} holds {episodes} test episodes, fewer than --folds {args.folds}; collect more "
                f"test episodes (collect/dmcs.py --test-episodes) or lower --folds"
            )
        if info.episode_steps < WINDOW_LENGTH:
            raise InputError(
                f"episodes of {info.path} have {info.episode_steps} steps, shorter than the {WINDOW_LENGTH}-step "
                "windows of this experiment; collect longer episodes (collect/dmcs.py --episode-steps)"
            )
    device = resolve_device(args.device)

    # ---- the world models whose hidden states we probe (each must have been trained on this data)
    runs = []
    for run_path in args.run or DEFAULT_RUNS:
        loaded = load_world_model(run_path, device)  # absent, damaged or foreign: CheckpointError
        for files in test_files.values():
            for info in files:
                check_dataset_fits(loaded.info, loaded.config, info)
        if loaded.config.reads_states:
            raise InputError(f"{run_path} is a state-space bound (state-vrnn); pass it with --state-bound, not --run")
        label = loaded.config.variant
        if any(label == other[0] for other in runs):
            label = f"{label} ({Path(run_path).name})"
        run_dir = loaded.info.path.parent
        runs.append((label, loaded.model, model_fingerprint(loaded.model), run_dir))
    bound = None  # (label, model, fingerprint, run dir) of the state-space bound, like the runs
    if args.state_bound is not None:
        loaded = load_world_model(args.state_bound, device)  # absent, damaged or foreign: CheckpointError
        if not loaded.config.reads_states:
            raise InputError(f"--state-bound {args.state_bound} is a {loaded.config.variant} run, not a state-space bound; "
                             "train one with `python train/world_model.py --model state-vrnn`")  # fmt: skip
        for task in tasks:  # before any hidden state is extracted: the bound must read these states
            main = test_files[task][0]  # its parts share its state layout
            try:
                check_state_dim(loaded.config, task, main.state_dim, main.path)
            except StateSizeMismatch as error:
                raise InputError(f"--state-bound {args.state_bound}: {error}") from None
        bound = (STATE_BOUND, loaded.model, model_fingerprint(loaded.model), loaded.info.path.parent)
    train_config = RewardTrainConfig(epochs=args.epochs, seed=args.seed)

    # ---- per task: hidden states of every run (cached), then one fit job per input and fold
    cache_dir = args.out / "cache"
    fit_settings = json.dumps([FIT_VERSION, RESULT_FORMAT, asdict(train_config)])
    fit_key = hashlib.sha256(fit_settings.encode()).hexdigest()[:8]
    fits_dir = cache_dir / f"fits-s{args.seed}-n{args.sequences}-f{args.folds}-{fit_key}"
    jobs: list[FitJob] = []
    labels: dict[str, list[str]] = {}
    for task in tasks:
        caches = []
        for _, model, fingerprint, _ in runs + ([bound] if bound is not None else []):
            cache = cache_dir / f"{fingerprint[:16]}-s{args.seed}-n{args.sequences}" / f"{task}.npz"
            if not cache.is_file():
                extracted = extract_window_features(
                    model, args.data, task, args.sequences, length=WINDOW_LENGTH, num_observed=NUM_OBSERVED,
                    batch_size=args.batch_size,
                    seed=args.seed, device=device,
                )  # fmt: skip
                save_features(cache, extracted)
            caches.append(cache)
        # Fits always read the cache (hidden states in float16), so a rerun gives the same numbers.
        inputs: list[tuple[str, str, Path, InputKind, SavedPredictor | None]] = [
            (label, fingerprint[:16], cache, "hidden", SavedPredictor(run_dir / PREDICTOR_DIR / f"{task}.pt", fingerprint))
            for (label, _, fingerprint, run_dir), cache in zip(runs, caches)
        ]
        if bound is not None:  # its own hidden states, of the same windows (no predictor: it has no env)
            inputs.append((STATE_BOUND, bound[2][:16], caches[-1], "hidden", None))
        if args.controls:  # the same windows for every run: take them from the first run's cache
            inputs += [(TRUE_STATES, "true-states", caches[0], "states", None),
                       (ACTIONS_ONLY, "actions-only", caches[0], "actions", None)]  # fmt: skip
        with np.load(caches[0]) as cached:
            episodes = cached["episodes"]
        folds = episode_folds(episodes, args.folds, args.seed)[: args.folds_run]
        labels[task] = [label for label, *_ in inputs]
        for label, key, cache, kind, predictor in inputs:
            for fold, (train, test) in enumerate(folds):
                jobs.append(FitJob(
                    task, label, cache, kind, fold, train, test, fits_dir / task / f"{key}-fold{fold}.npy",
                    predictor if fold == 0 else None,  # fold 0's predictor is the one the imagination env uses
                ))  # fmt: skip

    progress = tqdm(total=len(jobs), desc="reward predictors", unit="fit")
    by_input: dict[tuple[str, str], dict[int, np.ndarray]] = {}

    def on_done(job: FitJob, errors: np.ndarray) -> None:
        progress.update(1)
        folds_done = by_input.setdefault((job.task, job.label), {})
        folds_done[job.fold] = errors
        if len(folds_done) == args.folds_run:
            summary = summarize(np.stack([folds_done[f] for f in sorted(folds_done)]), NUM_OBSERVED)
            progress.write(f"{job.task:13s} {job.label:28s} observed {summary.observed_mean:.3f}"
                           f"  predicted {summary.predicted_mean:.3f}")  # fmt: skip

    run_fit_jobs(jobs, train_config, args.workers, on_done)
    progress.close()
    results: Results = {
        task: {
            label: summarize(np.stack([by_input[task, label][f] for f in range(args.folds_run)]), NUM_OBSERVED)
            for label in labels[task]
        }
        for task in tasks
    }

    # ---- report
    meta = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "runs": {label: {"dir": str(run_dir), "fingerprint": fp} for label, _, fp, run_dir in runs},
        "state_bound": None if bound is None else {
            "dir": str(bound[3]), "fingerprint": bound[2], "dynamics": bound[1].config.dynamics,
        },
        "num_observed": NUM_OBSERVED,
        "length": WINDOW_LENGTH,
    }
    meta["args"]["run"] = [str(path) for path in args.run or DEFAULT_RUNS]
    write_json(args.out / "results.json", results, meta)
    table = markdown_table(results)
    atomic_write_text(args.out / "results.md", "Normalized reward MSE (mean ± spread over folds; 1 = null model)\n\n" + table)
    plot_figure8(args.out / "figure8.png", results, num_observed=NUM_OBSERVED)
    print(table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'figure8.png'}")


def cli() -> None:
    main(tyro.cli(Args))


if __name__ == "__main__":
    sys.exit(run_script(cli))
