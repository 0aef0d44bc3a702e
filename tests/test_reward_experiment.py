"""The reward experiment end to end (downstream/reward.py) and its hidden-state extraction (Figure 8)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel import heap
from worldmodel.checkpoint import load_world_model
from worldmodel.config import OBSERVED_STEPS
from worldmodel.data import WindowDataset
from worldmodel.fingerprint import model_fingerprint
from worldmodel.hidden_states import extract_window_features, observe_then_imagine
from worldmodel.reward import (
    RewardPredictor,
    RewardPredictorMismatch,
    RewardTrainConfig,
    load_reward_predictor,
    predictor_experiment,
    save_reward_predictor,
)
from worldmodel.reward_experiment import fit_config, fit_configs

REPO_ROOT = Path(__file__).resolve().parents[1]


def hidden_states(model: torch.nn.Module, frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)  # the same prior draws for every call
    return observe_then_imagine(model, frames, actions, num_observed=8)


def test_observed_steps_use_the_posterior_and_predicted_steps_the_prior(smoke_run: Path, tiny_dataset: Path) -> None:
    model = load_world_model(smoke_run, "cpu").model
    window = WindowDataset(tiny_dataset, ["cheetah"], "test", length=20)[0]
    frames, actions = window.frames[None], window.actions[None]  # (1, 20, 64, 64, 3), (1, 20, 6)
    reference = hidden_states(model, frames, actions)
    assert reference.shape == (1, 20, model.config.rnn_size)

    garbage = frames.clone()
    garbage[:, 8:] = torch.randint(0, 256, garbage[:, 8:].shape, dtype=torch.uint8)
    assert torch.equal(hidden_states(model, garbage, actions), reference)  # predicted frames are never seen

    changed_context = frames.clone()
    changed_context[:, 3] = 255 - changed_context[:, 3]
    changed = hidden_states(model, changed_context, actions)
    assert torch.equal(changed[:, :4], reference[:, :4])  # h_t has seen frames < t only
    assert not torch.allclose(changed[:, 4:], reference[:, 4:])  # the posterior read frame 3

    other_actions = actions.clone()
    other_actions[:, 12] = -other_actions[:, 12] + 0.5
    moved = hidden_states(model, frames, other_actions)
    assert torch.equal(moved[:, :13], reference[:, :13]) and not torch.allclose(moved[:, 13:], reference[:, 13:])


def test_a_predictor_of_another_world_model_or_task_is_refused(tmp_path: Path) -> None:
    predictor = RewardPredictor(4)
    path = tmp_path / "cheetah.pt"
    save_reward_predictor(path, predictor, "cheetah", world_model="a" * 64)
    loaded = load_reward_predictor(path, "cheetah", world_model="a" * 64)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), predictor.state_dict().values()))
    with pytest.raises(RewardPredictorMismatch, match="another world model"):
        load_reward_predictor(path, "cheetah", world_model="b" * 64)
    with pytest.raises(RewardPredictorMismatch, match="not 'cartpole'"):
        load_reward_predictor(path, "cartpole", world_model="a" * 64)
    with pytest.raises(FileNotFoundError, match="downstream/reward.py"):
        load_reward_predictor(tmp_path / "missing.pt", "cheetah", world_model="a" * 64)


@pytest.fixture(scope="module")
def reward_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three short test episodes (folds need several episodes) of two tasks, by the real collector."""
    out = tmp_path_factory.mktemp("reward_data") / "dmcs"
    command = [sys.executable, "collect/dmcs.py", "--domains", "cartpole,cheetah", "--out", str(out),
               "--train-episodes", "1", "--test-episodes", "3", "--episode-steps", "30", "--seed", "3"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_extraction_reads_its_windows_without_forking_a_worker(
    smoke_run: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked DataLoader worker shares the extracting process's heap copy-on-write; with the heap kept
    (worldmodel/heap.py) every page of it written afterwards was copied, and extraction ran 2x slower."""
    model = load_world_model(smoke_run, "cpu").model
    reference = extract_window_features(model, tiny_dataset, "cheetah", 6, batch_size=4)

    def no_fork() -> int:
        raise AssertionError("extraction forked a process")

    monkeypatch.setattr("os.fork", no_fork)
    features = extract_window_features(model, tiny_dataset, "cheetah", 6, batch_size=4)
    assert features.hidden.shape == (6, 20, model.config.rnn_size) and len(features.episodes) == 6
    assert torch.equal(features.hidden, reference.hidden)  # seeded: the same windows and prior draws


def test_extraction_detects_a_few_windows_at_a_time_without_changing_the_hidden_states(
    smoke_run: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The detector takes DETECT_WINDOWS windows per call (bounded memory); the hidden states of a batch that does
    not divide into such chunks are those of one call on the whole batch: no window dropped, mixed or reordered."""
    from worldmodel import hidden_states as extraction

    model = load_world_model(smoke_run, "cpu").model
    whole = extract_window_features(model, tiny_dataset, "cheetah", 7, batch_size=7)
    monkeypatch.setattr(extraction, "DETECT_WINDOWS", 2)  # 7 windows: chunks of 2, 2, 2, 1
    chunked = extract_window_features(model, tiny_dataset, "cheetah", 7, batch_size=7)
    torch.testing.assert_close(chunked.hidden, whole.hidden, rtol=0, atol=1e-5)  # bit for bit on the CPUs measured
    assert torch.equal(chunked.rewards, whole.rewards) and (chunked.episodes == whole.episodes).all()

    # What the dynamics read: each window's own detected keypoints, in order (against one detect call on the batch).
    windows = [WindowDataset(tiny_dataset, ["cheetah"], "test", length=20)[i] for i in range(7)]
    frames, actions = torch.stack([w.frames for w in windows]), torch.stack([w.actions for w in windows])
    fed: list[torch.Tensor] = []
    observe = model.observe
    monkeypatch.setattr(model, "observe", lambda keypoints, *rest: fed.append(keypoints) or observe(keypoints, *rest))
    observe_then_imagine(model, frames, actions, OBSERVED_STEPS)
    torch.testing.assert_close(fed[0], model.detect(frames[:, :OBSERVED_STEPS]), rtol=0, atol=1e-6)


def run_reward(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "downstream/reward.py", *options], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_end_to_end_report_predictors_and_cache(smoke_run: Path, reward_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    out = tmp_path / "report"
    options = ["--run", str(run), "--data", str(reward_dataset), "--out", str(out), "--tasks", "cartpole,cheetah",
               "--sequences", "24", "--epochs", "2", "--folds", "3", "--folds-run", "2", "--device", "cpu",
               "--workers", "2"]
    result = run_reward(*options)
    assert result.returncode == 0, result.stderr[-3000:]
    if heap.glibc() is not None:  # the default: the extraction's batches reuse the pages of the batches before
        assert "heap: freed memory kept in the process (glibc" in result.stderr

    report = json.loads((out / "results.json").read_text())
    assert report["meta"]["args"]["keep_freed_memory"] is True and report["meta"]["heap"].startswith("heap: ")
    assert set(report["tasks"]) == {"cartpole", "cheetah"}
    for by_input in report["tasks"].values():
        assert set(by_input) == {"struct-vrnn", "true states", "actions only"}
        for numbers in by_input.values():
            assert len(numbers["per_frame_folds"]) == 2 and len(numbers["per_frame_mean"]) == 20
            assert numbers["per_frame_mean"][0] is None  # frame 0 has no reward target
            assert np.isfinite(numbers["observed"]) and np.isfinite(numbers["predicted"])
    assert "| cartpole |" in (out / "results.md").read_text()
    assert report["paired_predicted"] == {}  # one world model: nothing to pair it with
    assert report["seeds"] == {"samples": {"struct-vrnn / vrnn": ["struct-vrnn"]}, "left_out": {}, "comparisons": {}}
    assert (out / "figure8.png").stat().st_size > 10_000

    fingerprint = model_fingerprint(load_world_model(run, "cpu").model)
    for task in ("cartpole", "cheetah"):
        load_reward_predictor(run / "reward_predictors" / f"{task}.pt", task, fingerprint)  # matches its model

    caches = sorted((out / "cache").rglob("*.npz"))
    fits = sorted((out / "cache").rglob("*.npy"))
    assert len(caches) == 2 and len(fits) == 2 * 3 * 2  # tasks x inputs x folds
    stamps = [path.stat().st_mtime_ns for path in [*caches, *fits]]
    again = run_reward(*options)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [path.stat().st_mtime_ns for path in [*caches, *fits]] == stamps  # nothing recomputed
    assert json.loads((out / "results.json").read_text())["tasks"] == report["tasks"]

    # An interrupted experiment: the fits not done yet run again, in one process this time, and are seeded.
    lost = [path for path in fits if "cartpole" in str(path) and "fold1" in path.name]
    for path in lost:
        path.unlink()
    resumed = run_reward(*options[:-1], "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert all(path.is_file() for path in lost)
    assert [path.stat().st_mtime_ns for path in [*caches, *fits] if path not in lost] == [
        stamp for path, stamp in zip([*caches, *fits], stamps) if path not in lost
    ]
    resumed_tasks = json.loads((out / "results.json").read_text())["tasks"]
    for task, by_input in report["tasks"].items():
        for label, numbers in by_input.items():
            np.testing.assert_allclose(resumed_tasks[task][label]["observed"], numbers["observed"], rtol=1e-4)


def test_predictors_another_experiment_saved_are_never_replaced(
    smoke_run: Path, reward_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    options = ["--run", str(run), "--data", str(reward_dataset), "--tasks", "cartpole", "--sequences", "12",
               "--epochs", "1", "--folds", "3", "--folds-run", "1", "--no-controls", "--device", "cpu",
               "--workers", "1"]
    main, validation = tmp_path / "main", tmp_path / "validation"
    assert run_reward(*options, "--out", str(main)).returncode == 0
    saved = run / "reward_predictors" / "cartpole.pt"
    assert predictor_experiment(saved) == str(main.resolve())
    contents = saved.read_bytes()

    refused = run_reward(*options, "--out", str(validation))  # e.g. the same model on a validation set
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert str(main.resolve()) in refused.stderr and "--no-save-predictors" in refused.stderr
    assert not validation.exists() and saved.read_bytes() == contents  # refused before writing anything

    kept = run_reward(*options, "--out", str(validation), "--no-save-predictors")
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert (validation / "results.json").is_file() and saved.read_bytes() == contents
    again = run_reward(*options, "--out", str(main))  # its own experiment may rewrite them (here: nothing to fit)
    assert again.returncode == 0 and saved.read_bytes() == contents


def test_a_predictor_seed_refits_the_same_hidden_states_apart(
    smoke_run: Path, reward_dataset: Path, tmp_path: Path
) -> None:
    assert fit_config({"epochs": 5, "seed": 2}) == RewardTrainConfig(epochs=5, seed=2)  # reports from before it
    assert fit_config({"epochs": 5, "seed": 2, "predictor_seed": 7}) == RewardTrainConfig(epochs=5, seed=7)
    out = tmp_path / "report"
    options = ["--run", str(smoke_run), "--data", str(reward_dataset), "--out", str(out), "--tasks", "cartpole",
               "--sequences", "12", "--epochs", "2", "--folds", "3", "--folds-run", "1", "--no-controls",
               "--device", "cpu", "--workers", "1", "--no-save-predictors"]
    assert run_reward(*options).returncode == 0
    cache = next((out / "cache").rglob("*.npz"))
    stamp = cache.stat().st_mtime_ns
    assert run_reward(*options, "--predictor-seed", "0").returncode == 0  # = --seed: the same fits, nothing new
    assert len(list((out / "cache").glob("fits-*"))) == 1
    assert run_reward(*options, "--predictor-seed", "1").returncode == 0
    assert len(list((out / "cache").glob("fits-*"))) == 2 and cache.stat().st_mtime_ns == stamp  # same hidden states
    assert json.loads((out / "results.json").read_text())["meta"]["args"]["predictor_seed"] == 1

    # Two repeats from seed 0 are the two fits above, reused, and each fold's figure is the mean of their errors.
    assert run_reward(*options, "--predictor-repeats", "2").returncode == 0
    assert len(list((out / "cache").glob("fits-*"))) == 2 and cache.stat().st_mtime_ns == stamp
    seed0, seed1 = (np.load(next(fits.rglob("*-fold0.npy"))) for fits in sorted((out / "cache").glob("fits-*")))
    assert np.array_equal(seed0[1], seed1[1], equal_nan=True)  # the same null model: the same fold
    assert not np.allclose(seed0[0], seed1[0], equal_nan=True)  # two different predictors
    mse, null = (seed0[0] + seed1[0]) / 2, seed0[1]
    expected = mse[OBSERVED_STEPS:].sum() / null[OBSERVED_STEPS:].sum()  # the predicted frames of the window
    report = json.loads((out / "results.json").read_text())
    assert report["tasks"]["cartpole"]["struct-vrnn"]["predicted_folds"] == pytest.approx([expected], rel=1e-6)
    assert "the mean of 2 predictors" in (out / "results.md").read_text()


def test_predictor_repeats_count_up_from_the_predictor_seed() -> None:
    settings = {"epochs": 5, "seed": 2, "predictor_seed": 7, "predictor_repeats": 3}
    assert [config.seed for config in fit_configs(settings)] == [7, 8, 9]
    assert fit_configs({"epochs": 5, "seed": 2}) == [RewardTrainConfig(epochs=5, seed=2)]  # reports from before it


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sequences", "0"], "--sequences must be positive"),
        (["--tasks", "humanoid"], "unknown task"),
        (["--folds", "2", "--folds-run", "3"], "--folds-run"),
    ],
)
def test_bad_input_exits_2_with_one_line(smoke_run: Path, reward_dataset: Path, tmp_path: Path,
                                          options: list[str], message: str) -> None:
    result = run_reward("--run", str(smoke_run), "--data", str(reward_dataset), "--out", str(tmp_path), *options)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_run_says_how_to_train_one(reward_dataset: Path, tmp_path: Path) -> None:
    result = run_reward("--run", str(tmp_path / "nothing"), "--data", str(reward_dataset), "--out", str(tmp_path),
                        "--tasks", "cartpole")
    assert result.returncode == 2 and "train/world_model.py" in result.stderr


def test_repeated_run_flags_compare_every_run() -> None:
    import importlib.util

    import tyro

    spec = importlib.util.spec_from_file_location("reward_script", REPO_ROOT / "downstream" / "reward.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses and tyro resolve the annotations through it
    try:
        spec.loader.exec_module(script)
        assert tyro.cli(script.Args, args=["--run", "a", "--run", "b"]).run == (Path("a"), Path("b"))
        assert tyro.cli(script.Args, args=[]).run == ()  # main() then uses DEFAULT_RUNS
        assert script.DEFAULT_RUNS == (Path("runs/world_model"),)
    finally:
        del sys.modules[spec.name]
