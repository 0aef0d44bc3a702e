"""The reward experiment's predictor fits as independent, resumable jobs that run in parallel processes.

One job = one task, one input (a world model's hidden states or a control) and one fold: fit a
``RewardPredictor`` on the fold's training windows, then measure its per-frame MSE on the test windows
beside the null model's (``reward_report.summarize`` turns the two into normalized errors).
Jobs read their inputs from the hidden-state cache (``hidden_states.save_features``), so only a
path crosses the process boundary, and each writes its per-frame errors to its own result file
(atomically, last), so an interrupted experiment resumes with the jobs that are not done yet and a rerun
with the same settings fits nothing.

A job may also save its predictor for the imagination envs (fold 0 of a world model's hidden states);
its result file is written after the predictor, so a finished job always has its predictor on disk.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from worldmodel.atomic import atomic_write_stream
from worldmodel.devices import cpu_threads
from worldmodel.hidden_states import load_features
from worldmodel.reward import (
    FIT_THREADS,
    RewardTrainConfig,
    evaluate_mse,
    fit_reward_predictor,
    null_model_mse,
    save_reward_predictor,
)

InputKind = Literal["hidden", "states", "actions"]
RESULT_FORMAT = 2  # what a result file holds; part of the key of the result cache (downstream/reward.py)


class SavedPredictor(NamedTuple):
    """Where a job saves its predictor, the world model (fingerprint) whose hidden states it reads, and the
    experiment that fits it (its ``--out``, recorded in the file)."""

    path: Path
    world_model: str
    experiment: str | None = None


class FitJob(NamedTuple):
    task: str
    label: str  # the row of the report: a world model's label, "true states" or "actions only"
    features: Path  # the hidden-state cache (.npz) holding the inputs, rewards and episodes
    kind: InputKind  # which of the cached arrays is the predictor's input
    fold: int
    train: np.ndarray  # window indices the predictor trains on (its validation part comes out of these)
    test: np.ndarray  # window indices it is scored on
    result: Path  # .npy (2, L): the predictor's and the null model's per-frame test MSE, written when done
    predictor: SavedPredictor | None = None

    @property
    def done(self) -> bool:
        return self.result.is_file() and (self.predictor is None or self.predictor.path.is_file())


def run_fit_job(job: FitJob, config: RewardTrainConfig) -> np.ndarray:
    """Fit and score one job; write its result (and predictor). -> (2, L): per-frame test MSE of the
    predictor (row 0) and of the null model (row 1); frame 0 (no target) is NaN.

    The fit and the scoring run on ``reward.FIT_THREADS`` torch threads whatever the caller's setting (restored
    afterwards), so results do not depend on the machine (see ``fit_reward_predictor``).
    """
    with cpu_threads(FIT_THREADS, torch.device("cpu")):  # the fits run on the CPU (the cached features are there)
        features = load_features(job.features)
        inputs = getattr(features, job.kind)
        fit = fit_reward_predictor(
            inputs[job.train], features.rewards[job.train], features.episodes[job.train], config
        )
        mse = evaluate_mse(fit.predictor, inputs[job.test], features.rewards[job.test])
        null = null_model_mse(features.rewards[job.train], features.rewards[job.test])
        errors = torch.stack([mse, null]).numpy()  # (2, L)
        if job.predictor is not None:
            saved = job.predictor
            save_reward_predictor(saved.path, fit.predictor, job.task, saved.world_model, saved.experiment)
        atomic_write_stream(job.result, lambda handle: np.save(handle, errors))
        return errors


def run_fit_jobs(
    jobs: Sequence[FitJob], config: RewardTrainConfig, workers: int, on_done: Callable[[FitJob, np.ndarray], None]
) -> None:
    """Run the jobs that are not done yet (``workers`` processes, or in this process for 1) and load the
    results of those that are; ``on_done(job, errors)`` gets each job's errors (2, L) (see ``run_fit_job``)
    as it finishes or is loaded.

    Each fit uses ``FIT_THREADS`` (1) torch thread, so ``workers`` processes use that many cores: one-thread
    processes side by side beat threads inside one process (the GRU's steps are too small to split well), and a
    fit's result does not depend on the thread count (see ``run_fit_job``).
    """
    pending = []
    for job in jobs:
        if job.done:
            on_done(job, np.load(job.result))
        else:
            pending.append(job)
    if workers <= 1 or len(pending) <= 1:
        for job in pending:
            on_done(job, run_fit_job(job, config))
        return

    # spawn, not fork: the parent has torch's thread pools running, which a forked child must not inherit.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=context) as pool:
        running = {pool.submit(run_fit_job, job, config): job for job in pending}
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    on_done(job, future.result())  # a failed fit raises here; finished ones are on disk
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
