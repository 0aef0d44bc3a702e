"""Shared test fixture: ``tiny_dataset``, a real dataset of all six tasks made by the real collector.

It runs ``python collect/dmcs.py`` once per test session (real dm_control rendering, both splits,
2 train + 1 test episodes of 30 agent steps per task, seed 7, default action repeats) into a temporary
folder and returns that folder's Path; read its files with ``worldmodel.data.WindowDataset`` or h5py.
Tests must not modify it (copy it first). ``smoke_run`` is a smoke-profile world model trained on it, and
``imagination_run`` a copy of that run with reward predictors for ``PREDICTOR_TASKS`` (what the imagination
envs need).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the packages are importable without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

TINY_DATASET_OPTIONS = ("--train-episodes", "2", "--test-episodes", "1", "--episode-steps", "30", "--seed", "7")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a test of tiny tensors: small-batch CPU work was up to ~25x slower with 2 OpenMP
    threads on a busy 2-core machine (a short fit: 6 s with 1 thread, 160 s with 2, while other jobs ran)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with <task>_<split>.h5 for the six tasks, train (2 episodes) and test (1 episode), T = 30."""
    out = tmp_path_factory.mktemp("tiny_dataset") / "dmcs"
    command = [sys.executable, str(REPO_ROOT / "collect" / "dmcs.py"), "--out", str(out), *TINY_DATASET_OPTIONS]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"collecting the tiny dataset failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return out


@pytest.fixture(scope="session")
def smoke_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of ``train/world_model.py --profile smoke`` trained on ``tiny_dataset`` (CPU).

    Shared by the session: copy it (shutil.copytree) before writing into it.
    """
    run = tmp_path_factory.mktemp("smoke_run") / "run"
    command = [sys.executable, str(REPO_ROOT / "train" / "world_model.py"), "--profile", "smoke",
               "--data", str(tiny_dataset), "--out", str(run), "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        pytest.fail(f"training the smoke world model failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return run


PREDICTOR_TASKS = ("cheetah", "cartpole", "reacher")


@pytest.fixture(scope="session")
def imagination_run(smoke_run: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``smoke_run`` with reward predictors fit on its hidden states (a few windows, a few epochs)
    for PREDICTOR_TASKS: a world model the imagination envs and downstream/rl.py can run. Do not modify it."""
    import shutil

    import torch

    from worldmodel.checkpoint import load_world_model
    from worldmodel.fingerprint import model_fingerprint
    from worldmodel.hidden_states import extract_window_features
    from worldmodel.reward import RewardTrainConfig, fit_reward_predictor, save_reward_predictor

    run = tmp_path_factory.mktemp("imagination") / "run"
    shutil.copytree(smoke_run, run)
    model = load_world_model(run, "cpu").model
    fingerprint = model_fingerprint(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same predictors whatever the session's thread count
    try:
        for task in PREDICTOR_TASKS:
            features = extract_window_features(model, tiny_dataset, task, num_sequences=12, batch_size=12, seed=0)
            fit = fit_reward_predictor(
                features.hidden, features.rewards, features.episodes, RewardTrainConfig(epochs=2, batch_size=12)
            )
            save_reward_predictor(run / "reward_predictors" / f"{task}.pt", fit.predictor, task, fingerprint)
    finally:
        torch.set_num_threads(threads)
    return run
