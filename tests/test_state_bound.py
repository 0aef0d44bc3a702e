"""The state-space bound (``--model state-vrnn``): a dynamics core on the true states, no pixels, and its
column in the reward experiment."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from train.world_model import main
from worldmodel.checkpoint import CheckpointError, load_checkpoint, load_world_model
from worldmodel.data import WindowDataset
from worldmodel.hidden_states import extract_window_features, observe_then_imagine
from worldmodel.state_bound import StateSizeMismatch
from worldmodel.tasks import TASK_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--profile", "smoke", "--model", "state-vrnn", "--data", str(data), "--out", str(out), "--device", "cpu",
            "--log-every", "1", *extra]  # fmt: skip


def copy_dataset(source: Path, target: Path, tasks: tuple[str, ...] | None = None) -> Path:
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.h5")):
        if tasks is None or any(path.name.startswith(f"{task}_") for task in tasks):
            shutil.copyfile(path, target / path.name)
    return target


def blank_frames(root: Path) -> None:
    """Every frame of every file set to zero (the files stay valid datasets)."""
    for path in root.glob("*.h5"):
        with h5py.File(path, "r+") as file:
            frames = file["frames"]
            frames.write_direct(np.zeros(frames.shape, frames.dtype))  # whole chunks (a scalar fill takes minutes)


def widen_states(path: Path) -> None:
    """One more state dimension in a dataset file (as if its task's observation had changed)."""
    with h5py.File(path, "r+") as file:
        states = file["states"][...]
        del file["states"]
        file.create_dataset("states", data=np.concatenate([states, np.ones_like(states[..., :1])], -1))
        # A consistent file of another kind: its attributes describe the extra dimension too.
        file.attrs["state_sizes"] = np.append(file.attrs["state_sizes"], 1)
        file.attrs["state_keys"] = np.append(file.attrs["state_keys"], "extra").astype(object)


@pytest.fixture(scope="module")
def state_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("state_run") / "run"
    assert main(train_args(tiny_dataset, run)) == 0
    return run


def test_trains_on_states_and_records_the_variant_and_state_sizes(state_run: Path, tiny_dataset: Path) -> None:
    checkpoint = load_checkpoint(state_run)
    config = checkpoint["model_config"]
    sizes = {}
    for task in TASK_NAMES:
        with h5py.File(tiny_dataset / f"{task}_train.h5", "r") as file:
            sizes[task] = file["states"].shape[-1]
    assert config["variant"] == "state-vrnn" and config["dynamics"] == "vrnn"
    assert list(config["state_dims"]) == [sizes[task] for task in TASK_NAMES]  # cartpole 5 ... walkers 24
    assert config["num_keypoints"] == math.ceil(max(sizes.values()) / 3)
    assert checkpoint["complete"] and checkpoint["dataset"]["keypoint_cache"] is None
    assert not any(key.startswith(("detector.", "encoder.", "appearance.", "reconstructor.")) for key in checkpoint["model"])
    assert not (state_run / "keypoints.pt").exists() and not (state_run / "prediction.gif").exists()
    summary = json.loads((state_run / "summary.json").read_text())
    assert summary["model"] == "state-vrnn" and set(summary["stage_seconds"]) == {"dynamics"}
    assert summary["dynamics_benchmark"]["ratio_to_hold_last"]["hold_last"] == 1.0
    losses = [json.loads(line) for line in (state_run / "metrics.jsonl").read_text().splitlines()]
    assert {record["stage"] for record in losses if record.get("kind") == "train"} <= {"dynamics"}
    # The normaliser was fitted on the states: the padded features (24 = 3 * 8, none here) and the
    # varying ones have their own statistics, not the identity it starts from.
    model = load_world_model(state_run).model
    assert not torch.equal(model.normalizer.mean, torch.zeros_like(model.normalizer.mean))


def test_no_frame_is_ever_read(state_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    blank = copy_dataset(tiny_dataset, tmp_path / "blank")
    blank_frames(blank)
    run = tmp_path / "run"
    assert main(train_args(blank, run)) == 0
    ours, theirs = load_checkpoint(run)["model"], load_checkpoint(state_run)["model"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    model = load_world_model(run).model
    torch.manual_seed(0)
    features = extract_window_features(model, tiny_dataset, "cheetah", 6, seed=3)
    blank_features = extract_window_features(model, blank, "cheetah", 6, seed=3)
    assert torch.equal(features.hidden, blank_features.hidden)


def test_an_interrupted_run_resumes_to_the_same_weights(state_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(train_args(tiny_dataset, run, "--halt-after", "3")) == 0
    assert load_checkpoint(run)["stage"] == "dynamics" and not load_checkpoint(run)["complete"]
    assert main(train_args(tiny_dataset, run, "--resume")) == 0
    ours, theirs = load_checkpoint(run)["model"], load_checkpoint(state_run)["model"]
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


@pytest.mark.parametrize("core", ["srvp", "hvrnn"])
def test_every_core_serves_as_the_bound(core: str, tiny_dataset: Path, tmp_path: Path) -> None:
    assert main(train_args(tiny_dataset, tmp_path / "run", "--dynamics", core)) == 0
    loaded = load_world_model(tmp_path / "run")
    assert (loaded.config.variant, loaded.config.dynamics) == ("state-vrnn", core)
    features = extract_window_features(loaded.model, tiny_dataset, "cartpole", 4)
    assert features.hidden.shape == (4, 20, loaded.model.dynamics.hidden_size) and torch.isfinite(features.hidden).all()


def test_chunked_perception_reads_each_window_s_own_states(
    state_run: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extraction perceives a few windows at a time (hidden_states.DETECT_WINDOWS), which concerns the detector
    only: the bound reads its windows' true states, and its hidden states do not change with the chunk size."""
    from worldmodel import hidden_states as extraction

    model = load_world_model(state_run, "cpu").model
    whole = extract_window_features(model, tiny_dataset, "cheetah", 5, batch_size=5)
    monkeypatch.setattr(extraction, "DETECT_WINDOWS", 2)
    torch.testing.assert_close(extract_window_features(model, tiny_dataset, "cheetah", 5, batch_size=5).hidden,
                               whole.hidden, rtol=0, atol=1e-5)


def test_hidden_states_have_the_protocols_shapes(state_run: Path, tiny_dataset: Path) -> None:
    model = load_world_model(state_run).model
    features = extract_window_features(model, tiny_dataset, "cheetah", 8)
    assert features.hidden.shape == (8, 20, model.config.rnn_size)
    assert features.states.shape == (8, 20, 17) and features.rewards.shape == (8, 20)
    assert torch.isfinite(features.hidden).all()


def test_the_prediction_of_frame_t_plus_1_reads_a_t_and_not_a_t_plus_1(state_run: Path, tiny_dataset: Path) -> None:
    model = load_world_model(state_run).model
    window = WindowDataset(tiny_dataset, ["walker-walk"], "test", length=20, states=True, frames=False)[0]
    states, actions = window.states[None], window.actions[None]  # (1, 20, 24), (1, 20, 6)
    n = 8

    def predicted(actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Imagined states of frames n .. 19 and the hidden states of all 20 frames, same prior draws."""
        generator = torch.Generator().manual_seed(0)
        observed = model.observe(model.perceive(window.frames[None], states[:, :n]), actions[:, :n], generator=generator)
        future = model.imagine(observed.final, actions[:, n - 1 : 19], generator=generator)
        return future.keypoints.flatten(2), hidden_states(actions, states)

    def hidden_states(actions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # the same posterior and prior draws for every call
        return observe_then_imagine(model, window.frames[None], actions, n, states)

    reference, reference_hidden = predicted(actions)
    later = actions.clone()
    later[:, n] = -later[:, n] + 0.5  # a_8: applied at frame 8, it produces frame 9
    changed, changed_hidden = predicted(later)
    assert torch.equal(changed[:, 0], reference[:, 0])  # frame 8 does not see a_8
    assert not torch.allclose(changed[:, 1], reference[:, 1])  # frame 9 does
    assert torch.equal(changed_hidden[:, : n + 1], reference_hidden[:, : n + 1])
    assert not torch.allclose(changed_hidden[:, n + 1 :], reference_hidden[:, n + 1 :])
    earlier = actions.clone()
    earlier[:, n - 1] = -earlier[:, n - 1] + 0.5  # a_7 produces frame 8
    assert not torch.allclose(predicted(earlier)[0][:, 0], reference[:, 0])
    context = states.clone()
    context[:, 3] += 1.0  # the posterior reads frame 3's state: the hidden state from frame 4 on changes
    moved = hidden_states(actions, context)
    assert torch.equal(moved[:, :4], reference_hidden[:, :4]) and not torch.allclose(moved[:, 4:], reference_hidden[:, 4:])


def test_pixel_uses_the_imagination_envs_and_the_keypoint_benchmark_refuse_it(state_run: Path) -> None:
    from envs.imagination_models import load_imagination_models

    model = load_world_model(state_run).model
    with pytest.raises(ValueError, match="state-space bound"):
        model.detect(torch.zeros(1, 2, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match="state-space bound"):
        load_imagination_models("cheetah", checkpoint=state_run, device="cpu")
    result = subprocess.run([sys.executable, "downstream/dynamics.py", "--run", str(state_run), "--out", "unused"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "state-space bound" in result.stderr and "Traceback" not in result.stderr


def test_the_trainer_refuses_joint_mode_with_one_line(tiny_dataset: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "train/world_model.py", *train_args(tiny_dataset, tmp_path / "r", "--mode", "joint")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "--mode staged" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


# ---- the reward experiment ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three short test episodes (folds need several episodes) of two tasks, by the real collector."""
    out = tmp_path_factory.mktemp("reward_data") / "dmcs"
    command = [sys.executable, "collect/dmcs.py", "--domains", "cartpole,cheetah", "--out", str(out),
               "--train-episodes", "1", "--test-episodes", "3", "--episode-steps", "30", "--seed", "3"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def run_reward(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "downstream/reward.py", *options], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def one_error_line(stderr: str) -> bool:
    """The script ended with one line saying what was wrong (after the line that says how it computes)."""
    lines = stderr.strip().splitlines()
    return "Traceback" not in stderr and [line for line in lines if line.startswith("error:")] == lines[-1:]


def test_reward_report_has_the_state_space_bound_column(
    smoke_run: Path, state_run: Path, reward_dataset: Path, tmp_path: Path
) -> None:
    out, run = tmp_path / "report", tmp_path / "run"
    shutil.copytree(smoke_run, run)  # it saves the run's predictors: not into the run other tests share
    result = run_reward("--run", str(run), "--state-bound", str(state_run), "--data", str(reward_dataset),
                        "--out", str(out), "--tasks", "cartpole,cheetah", "--sequences", "24", "--epochs", "2",
                        "--folds", "3", "--folds-run", "2", "--device", "cpu", "--workers", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    for by_input in report["tasks"].values():
        assert list(by_input) == ["struct-vrnn", "state-space bound", "true states", "actions only"]
        bound = by_input["state-space bound"]
        assert np.isfinite(bound["observed"]) and np.isfinite(bound["predicted"]) and len(bound["per_frame_mean"]) == 20
    assert report["meta"]["state_bound"]["dir"] == str(state_run.resolve())
    table = (out / "results.md").read_text()
    assert "state-space bound obs. | state-space bound pred." in table
    assert not (state_run / "reward_predictors").exists()  # nothing to imagine with: no predictor saved
    caches = sorted({path.parent for path in (out / "cache").rglob("*.npz")})
    assert len(caches) == 2  # the run's hidden states and the bound's, each cached
    # The bound's are its own hidden states (of its own size), not a copy of the run's.
    hidden = [np.load(folder / "cartpole.npz")["hidden"] for folder in caches]
    assert hidden[0].shape[:2] == hidden[1].shape[:2] and not np.array_equal(hidden[0], hidden[1])


def test_reward_refuses_data_whose_states_differ_from_the_bounds(
    smoke_run: Path, state_run: Path, reward_dataset: Path, tmp_path: Path
) -> None:
    data = copy_dataset(reward_dataset, tmp_path / "data")
    widen_states(data / "cartpole_test.h5")  # 6 numbers per cartpole state instead of 5
    out = tmp_path / "report"
    result = run_reward("--run", str(smoke_run), "--state-bound", str(state_run), "--data", str(data),
                        "--out", str(out), "--tasks", "cartpole,cheetah", "--device", "cpu", "--folds", "3",
                        "--folds-run", "2")  # fmt: skip
    assert result.returncode == 2 and one_error_line(result.stderr)
    assert "size 6" in result.stderr and "trained on size 5" in result.stderr
    assert not out.exists()  # refused before anything was computed
    model = load_world_model(state_run).model
    with pytest.raises(StateSizeMismatch, match="size 6"):
        extract_window_features(model, data, "cartpole", 4)


@pytest.mark.parametrize("flag", ["--run", "--state-bound"])
def test_reward_refuses_a_run_in_the_wrong_place(smoke_run: Path, state_run: Path, reward_dataset: Path,
                                                 tmp_path: Path, flag: str) -> None:  # fmt: skip
    wrong = ["--run", str(state_run)] if flag == "--run" else ["--run", str(smoke_run), "--state-bound", str(smoke_run)]
    result = run_reward(*wrong, "--data", str(reward_dataset), "--out", str(tmp_path / "out"), "--tasks", "cartpole",
                        "--folds", "2", "--folds-run", "2")  # fmt: skip
    assert result.returncode == 2 and one_error_line(result.stderr)
    assert ("pass it with --state-bound" if flag == "--run" else "--model state-vrnn") in result.stderr
