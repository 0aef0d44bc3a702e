"""The paper's reward experiment (Minderer et al. 2019, Figure 8 and S2.3): do the VRNN hidden states predict reward?

    python downstream/reward.py --run runs/world_model --run runs/cnn_vrnn --state-bound runs/state_vrnn

For each task: hidden states of up to ``--sequences`` length-20 test windows (8 observed through the
posterior, 12 predicted through the prior from the true actions), cached under ``--out``; a GRU reward
predictor per task and input trained on 80% of the windows (split by episode) and tested on the rest,
over several folds; MSE normalized by the null model's (the mean training reward at every step). Two controls: the true
low-dimensional states (upper bound) and the actions alone; a third with ``--state-bound``: the hidden
states of a dynamics core trained on the true states (``train/world_model.py --model state-vrnn``), the
best a world model with perfect perception reaches through the same protocol. With several ``--run``s, the
first is also compared with each other one fold by fold (every input is tested on the same folds, so their
difference is measured against its own spread, not each model's); with several independently trained runs of
one kind (variant and dynamics core: other ``--seed``s), the kinds are compared over seeds too (Welch's t-test
on the runs' scores, ``worldmodel/seed_report.py``), which is what tells two models apart. Writes results.json,
results.md and figure8.png to ``--out``, and each run's fold-0 predictors to
``<run>/reward_predictors/<task>.pt`` (tagged with the world model's fingerprint, which the imagination
envs check, and with this experiment's ``--out``; none for the state-space bound, which has no imagination env).
Predictors that another experiment saved are never replaced: an experiment on other data (a validation set)
runs with ``--no-save-predictors``, which leaves every run's predictors as they are.

The fits run as independent jobs in ``--workers`` processes, each writing its result under ``--out/cache``:
an interrupted experiment continues where it stopped, and a rerun with the same settings fits nothing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np
import torch
import tyro
from tqdm.auto import tqdm

from worldmodel.atomic import atomic_write_text
from worldmodel.checkpoint import check_dataset_fits, find_checkpoint, load_world_model
from worldmodel.config import OBSERVED_STEPS
from worldmodel.devices import resolve_device
from worldmodel.errors import InputError, check_options, run_cli
from worldmodel.fingerprint import model_fingerprint
from worldmodel.heap import HeapDecision, keep_freed_memory
from worldmodel.hidden_states import extract_window_features, save_features
from worldmodel.keypoint_cache import vision_fingerprint
from worldmodel.machine import available_cores
from worldmodel.model import WorldModel
from worldmodel.reward import RewardTrainConfig, episode_folds, predictor_experiment
from worldmodel.reward_experiment import CONTROL_KEYS, features_path, fit_configs, fits_directory, result_path
from worldmodel.reward_jobs import FitJob, InputKind, SavedPredictor, run_fit_jobs
from worldmodel.reward_report import (
    STATE_BOUND,
    Results,
    markdown_table,
    paired_table,
    plot_figure8,
    summarize,
    write_json,
)
from worldmodel.seed_report import RunKind, seed_comparisons, seed_groups, seed_json, seed_table
from worldmodel.state_bound import StateSizeMismatch, check_state_dim
from worldmodel.storage import DatasetInfo, checked_dataset_files
from worldmodel.tasks import parse_tasks

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
    predictor_seed: int | None = None
    """Seeds the reward predictors alone (initialisation, early-stopping split, batch order); default: --seed. Another value fits other predictors on the same hidden states and folds (cached apart): how far the figures move is the predictors' own noise. The runs' saved predictors become this seed's, unless --no-save-predictors."""
    predictor_repeats: int = 1
    """Reward predictors fitted per input and fold, seeded --predictor-seed, +1, +2, ...; each fold's figure is the mean of their test errors, so the predictors' own noise (up to 0.1 per task on a validation-sized test set) shrinks. Each seed's fits are cached apart, and reused by a later experiment with more repeats. Saved predictors are the first seed's."""
    device: str = "auto"
    """'cpu', 'cuda', or 'auto' (cuda if available)."""
    batch_size: int = 256
    """Windows per batch when extracting hidden states."""
    workers: int = available_cores()
    """Processes fitting reward predictors side by side (default: one per CPU core); 1 fits in this process."""
    keep_freed_memory: bool = True
    """Keep freed memory in this process (glibc malloc: no mmap per large tensor, no trimming), so that extracting hidden states stops page-faulting each batch's activations in anew: with the detector's calls of 64 windows, 1.3-1.4x windows/s on 2 cores for ~0.1-0.2 GiB more peak memory, which stays (docs/PERFORMANCE.md, "Freed memory kept in the process"). The fitting workers keep glibc's defaults."""
    save_predictors: bool = True
    """Save each run's fold-0 predictors to <run>/reward_predictors/ for the imagination envs. Predictors that another experiment (another --out) saved are not replaced: this experiment stops first and says so. --no-save-predictors leaves them all as they are (an experiment on a validation set, say)."""


class ProbedModel(NamedTuple):
    """A world model whose hidden states are probed for reward."""

    label: str  # its column in the report
    model: WorldModel
    fingerprint: str  # model_fingerprint: names its hidden-state cache and tags its saved predictors
    run_dir: Path
    kind: RunKind | None  # its sample in the comparison over seeds; None for the state-space bound


def check_args(args: Args) -> dict[str, list[DatasetInfo]]:
    """The test files of each task (the main file, then its parts), once every option is known to be usable."""
    check_options(args, 1, "sequences", "epochs", "folds", "folds_run", "batch_size", "workers", "predictor_repeats")
    if args.folds_run > args.folds or args.folds < 2:
        raise InputError(f"need 2 <= --folds and --folds-run <= --folds, got {args.folds} and {args.folds_run}")
    check_options(args, 0, "seed")
    if args.predictor_seed is not None and args.predictor_seed < 0:
        raise InputError(f"--predictor-seed must be >= 0, got {args.predictor_seed}")
    tasks = parse_tasks(args.tasks)
    for run_path in args.run or DEFAULT_RUNS:
        checkpoint = find_checkpoint(run_path)  # missing: CheckpointError saying how to train one (loaded later)
        if args.save_predictors:
            check_predictors_are_ours(args, checkpoint.parent, tasks)
    # Absent, damaged or mismatched files and parts: InputError.
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
    return test_files


def experiment_name(args: Args) -> str:
    """How this experiment signs the predictors it saves: its --out, absolute."""
    return str(args.out.resolve())


def check_predictors_are_ours(args: Args, run_dir: Path, tasks: list[str]) -> None:
    """Refuse to replace a run's predictors that another experiment saved (the imagination envs read them)."""
    for task in tasks:
        path = run_dir / PREDICTOR_DIR / f"{task}.pt"
        owner = predictor_experiment(path)
        if owner is not None and owner != experiment_name(args):
            raise InputError(
                f"{path} was saved by the reward experiment in {owner}, and this one (--out {args.out}) would "
                f"replace it: pass --no-save-predictors to leave every run's predictors as they are, or delete "
                f"{path.parent} to let this experiment save its own"
            )


def load_runs(args: Args, test_files: dict[str, list[DatasetInfo]], device: torch.device) -> list[ProbedModel]:
    """The world models of --run; each must have been trained on this data."""
    runs: list[ProbedModel] = []
    for run_path in args.run or DEFAULT_RUNS:
        loaded = load_world_model(run_path, device)  # absent, damaged or foreign: CheckpointError
        for files in test_files.values():
            for info in files:
                check_dataset_fits(loaded.info, loaded.config, info)
        if loaded.config.reads_states:
            raise InputError(f"{run_path} is a state-space bound (state-vrnn); pass it with --state-bound, not --run")
        label = loaded.config.variant
        if any(label == other.label for other in runs):
            label = f"{label} ({Path(run_path).name})"
        kind = RunKind(label, f"{loaded.config.variant} / {loaded.config.dynamics}", vision_fingerprint(loaded.model))
        runs.append(ProbedModel(label, loaded.model, model_fingerprint(loaded.model), loaded.info.path.parent, kind))
    return runs


def load_bound(path: Path, test_files: dict[str, list[DatasetInfo]], device: torch.device) -> ProbedModel:
    """The state-space bound of --state-bound, checked against the states of the data."""
    loaded = load_world_model(path, device)  # absent, damaged or foreign: CheckpointError
    if not loaded.config.reads_states:
        raise InputError(f"--state-bound {path} is a {loaded.config.variant} run, not a state-space bound; "
                         "train one with `python train/world_model.py --model state-vrnn`")  # fmt: skip
    for task, files in test_files.items():  # before any hidden state is extracted: the bound must read these states
        main_file = files[0]  # its parts share its state layout
        try:
            check_state_dim(loaded.config, task, main_file.state_dim, main_file.path)
        except StateSizeMismatch as error:
            raise InputError(f"--state-bound {path}: {error}") from None
    return ProbedModel(STATE_BOUND, loaded.model, model_fingerprint(loaded.model), loaded.info.path.parent, None)


def hidden_state_cache(args: Args, probed: ProbedModel, task: str, device: torch.device) -> Path:
    """The model's hidden states of the task's test windows, extracted once into ``--out/cache``."""
    cache = features_path(args.out, probed.fingerprint, args.seed, args.sequences, task)
    if not cache.is_file():
        extracted = extract_window_features(
            probed.model, args.data, task, args.sequences, length=WINDOW_LENGTH, num_observed=NUM_OBSERVED,
            batch_size=args.batch_size, seed=args.seed, device=device,
        )  # fmt: skip
        save_features(cache, extracted)
    return cache


def task_jobs(
    args: Args,
    task: str,
    runs: list[ProbedModel],
    bound: ProbedModel | None,
    fits_dir: Path,
    device: torch.device,
    save_predictors: bool,
) -> tuple[list[FitJob], list[str]]:
    """One fit job per input (each run, the bound, the controls) and fold of a task, and the inputs' labels;
    ``save_predictors``: fold 0's jobs of the runs save their predictors for the imagination envs."""
    caches = [hidden_state_cache(args, probed, task, device) for probed in runs]
    # Fits always read the cache (hidden states in float16), so a rerun gives the same numbers.
    def saved(probed: ProbedModel) -> SavedPredictor | None:
        path = probed.run_dir / PREDICTOR_DIR / f"{task}.pt"
        return SavedPredictor(path, probed.fingerprint, experiment_name(args)) if save_predictors else None

    inputs: list[tuple[str, str, Path, InputKind, SavedPredictor | None]] = [
        (probed.label, probed.fingerprint[:16], cache, "hidden", saved(probed)) for probed, cache in zip(runs, caches)
    ]
    if bound is not None:  # its own hidden states, of the same windows (no predictor: it has no env)
        inputs.append((STATE_BOUND, bound.fingerprint[:16], hidden_state_cache(args, bound, task, device), "hidden", None))
    if args.controls:  # the same windows for every run: take them from the first run's cache
        inputs += [(label, key, caches[0], kind, None) for label, (key, kind) in CONTROL_KEYS.items()]  # type: ignore[misc]
    with np.load(caches[0]) as cached:
        episodes = cached["episodes"]
    folds = episode_folds(episodes, args.folds, args.seed)[: args.folds_run]
    jobs = [
        FitJob(task, label, cache, kind, fold, train, test, result_path(fits_dir, task, key, fold),
               predictor if fold == 0 else None)  # fold 0's predictor is the one the imagination env uses
        for label, key, cache, kind, predictor in inputs
        for fold, (train, test) in enumerate(folds)
    ]  # fmt: skip
    return jobs, [label for label, *_ in inputs]


def fit_all(
    args: Args, jobs_by_seed: list[tuple[RewardTrainConfig, list[FitJob]]], labels: dict[str, list[str]]
) -> Results:
    """Run the fit jobs of every predictor seed (a line per input once its folds are done) and summarise them per
    task and input: each fold's errors are the mean over the predictor seeds (the null model's are the same)."""
    progress = tqdm(total=sum(len(seed_jobs) for _, seed_jobs in jobs_by_seed), desc="reward predictors", unit="fit")
    by_input: dict[tuple[str, str], dict[int, list[np.ndarray]]] = {}

    def fold_errors(done: dict[int, list[np.ndarray]]) -> np.ndarray:
        return np.stack([np.mean(done[fold], axis=0) for fold in range(args.folds_run)])  # (folds, 2, L)

    def on_done(job: FitJob, errors: np.ndarray) -> None:
        progress.update(1)
        done = by_input.setdefault((job.task, job.label), {})
        done.setdefault(job.fold, []).append(errors)
        if sum(map(len, done.values())) == args.folds_run * len(jobs_by_seed):  # every fold of every predictor seed
            summary = summarize(fold_errors(done), NUM_OBSERVED)
            progress.write(f"{job.task:13s} {job.label:28s} observed {summary.observed_mean:.3f}"
                           f"  predicted {summary.predicted_mean:.3f}")  # fmt: skip

    for train_config, seed_jobs in jobs_by_seed:
        run_fit_jobs(seed_jobs, train_config, args.workers, on_done)
    progress.close()
    return {
        task: {label: summarize(fold_errors(by_input[task, label]), NUM_OBSERVED) for label in task_labels}
        for task, task_labels in labels.items()
    }


def write_report(
    args: Args, results: Results, runs: list[ProbedModel], bound: ProbedModel | None, heap: HeapDecision
) -> None:
    meta = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "runs": {probed.label: {"dir": str(probed.run_dir), "fingerprint": probed.fingerprint} for probed in runs},
        "state_bound": None if bound is None else {
            "dir": str(bound.run_dir), "fingerprint": bound.fingerprint, "dynamics": bound.model.config.dynamics,
        },
        "num_observed": NUM_OBSERVED,
        "length": WINDOW_LENGTH,
        "heap": heap.reason,
    }  # fmt: skip
    meta["args"]["run"] = [str(path) for path in args.run or DEFAULT_RUNS]
    groups = seed_groups([probed.kind for probed in runs if probed.kind is not None])
    comparisons = seed_comparisons(results, groups)
    write_json(args.out / "results.json", results, meta, seeds=seed_json(groups, comparisons))
    table = markdown_table(results)
    for section in (paired_table(results), seed_table(groups, comparisons)):  # '' where there is nothing to compare
        table += f"\n{section}" if section else ""
    repeats = "" if args.predictor_repeats == 1 else f"; each fold the mean of {args.predictor_repeats} predictors"
    heading = f"Normalized reward MSE (mean ± spread over folds{repeats}; 1 = null model)"
    atomic_write_text(args.out / "results.md", f"{heading}\n\n{table}")
    plot_figure8(args.out / "figure8.png", results, num_observed=NUM_OBSERVED)
    print(table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'figure8.png'}")


def main(args: Args) -> None:
    """The experiment; bad input raises InputError before anything is written."""
    test_files = check_args(args)
    device = resolve_device(args.device)
    heap = keep_freed_memory(args.keep_freed_memory)  # before the models take their memory
    print(heap.reason, file=sys.stderr)
    runs = load_runs(args, test_files, device)
    bound = None if args.state_bound is None else load_bound(args.state_bound, test_files, device)
    jobs_by_seed: list[tuple[RewardTrainConfig, list[FitJob]]] = []
    labels: dict[str, list[str]] = {}
    for repeat, train_config in enumerate(fit_configs(asdict(args))):  # each predictor seed fits apart
        fits_dir = fits_directory(args.out, args.seed, args.sequences, args.folds, train_config)
        seed_jobs: list[FitJob] = []
        for task in test_files:  # hidden states of every model (extracted once), then a fit job per input and fold
            task_job_list, labels[task] = task_jobs(
                args, task, runs, bound, fits_dir, device, args.save_predictors and repeat == 0
            )
            seed_jobs += task_job_list
        jobs_by_seed.append((train_config, seed_jobs))
    results = fit_all(args, jobs_by_seed, labels)
    write_report(args, results, runs, bound, heap)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, argv, __doc__)


if __name__ == "__main__":
    sys.exit(cli())
