"""Every entry point treats its inputs as hostile: damaged or foreign files, too little data, a dataset and a
checkpoint that do not belong together, out-of-range numbers and missing files each get one line that says
what was wrong and how to fix it (scripts: exit code 2, no traceback), and nothing already written changes.

Scripts run as subprocesses where the script's own top level is what is tested; otherwise their ``main`` is
called in-process (fast), and the envs through their constructors. All data are copies of the session's tiny
dataset and smoke run, damaged here on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers the ids)
from envs.imagination_models import load_imagination_models
from envs.real import RealPixelEnv
from envs.through_model import RealTaskThroughModel
from worldmodel import storage
from worldmodel.checkpoint import load_world_model
from worldmodel.data import WindowDataset
from worldmodel.errors import InputError, MissingInputError, check_options
from worldmodel.fingerprint import model_fingerprint
from worldmodel.reward import RewardPredictor, save_reward_predictor

REPO_ROOT = Path(__file__).resolve().parents[1]
DAMAGE_KINDS = ("truncated", "not_hdf5", "wrong_layout", "other_task")
# What each kind of damaged cartpole file is reported as (beside its path and how to collect it again).
DAMAGE_PHRASES = {
    "truncated": "not a readable HDF5 file",
    "not_hdf5": "not a readable HDF5 file",
    "wrong_layout": "missing",
    "other_task": "holds cheetah train, not cartpole train",
}


# ----------------------------------------------------------------------------------------------
# Helpers and fixtures
# ----------------------------------------------------------------------------------------------
def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, script, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def assert_refused(result: subprocess.CompletedProcess[str], *phrases: str, after_progress: bool = False) -> None:
    """Exit code 2, no traceback, one line on stderr holding every phrase (``after_progress``: the last line,
    after the progress or compute report of work that had started)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or after_progress, result.stderr[-3000:]
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in lines[-1], lines[-1]


def assert_one_line(error: pytest.ExceptionInfo[BaseException], *phrases: str) -> None:
    message = str(error.value)
    assert "\n" not in message and ";" in message, message  # what was wrong; how to fix it
    for phrase in phrases:
        assert phrase in message, message


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes ({} when the folder does not exist)."""
    if not folder.exists():
        return {}
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def damage(path: Path, kind: str) -> None:
    """Damage a dataset file the way real accidents do: a killed copy, a foreign file, another layout, a
    file renamed from another task."""
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_hdf5":
        path.write_text("these are not the frames you are looking for\n")
    elif kind == "wrong_layout":
        path.unlink()
        with h5py.File(path, "w") as file:
            file["frames"] = np.zeros((1, 2, 64, 64, 3), np.uint8)
    elif kind == "other_task":
        shutil.copyfile(path.with_name(path.name.replace("cartpole", "cheetah")), path)
    else:
        raise AssertionError(kind)


@pytest.fixture(scope="module")
def damaged_datasets(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of the tiny dataset, each with cartpole_train.h5 and cartpole_test.h5 damaged in one way."""
    root = tmp_path_factory.mktemp("damaged")
    folders = {}
    for kind in DAMAGE_KINDS:
        folder = root / kind
        shutil.copytree(tiny_dataset, folder)
        for split in storage.SPLITS:
            damage(storage.dataset_path(folder, "cartpole", split), kind)
        folders[kind] = folder
    return folders


@pytest.fixture(scope="module")
def two_test_episodes(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset with a cartpole test file of two episodes (its one, twice, assembled by the real
    storage code): enough for the reward experiment's smallest number of folds, 2."""
    folder = tmp_path_factory.mktemp("two_test_episodes") / "dmcs"
    shutil.copytree(tiny_dataset, folder)
    path = storage.dataset_path(folder, "cartpole", "test")
    with h5py.File(path, "r") as file:
        arrays = [file[name][0] for name in ("frames", "actions", "rewards", "states")]
        episode = storage.Episode(*arrays, seed=int(file["episode_seeds"][0]))
        attrs = storage.decode_attrs(file.attrs)
    single = folder / "episode.h5"
    storage.write_episode(single, episode, {})
    path.unlink()
    storage.assemble_dataset([single, single], path, {**attrs, "num_episodes": 2})
    single.unlink()
    return folder


@pytest.fixture(scope="module")
def other_repeat_dataset(two_test_episodes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset whose cartpole files claim action repeat 4 (the smoke run's data used 8): a dataset that does
    not belong with the smoke run."""
    folder = tmp_path_factory.mktemp("other_repeat") / "dmcs"
    shutil.copytree(two_test_episodes, folder)
    for split in storage.SPLITS:
        with h5py.File(storage.dataset_path(folder, "cartpole", split), "r+") as file:
            file.attrs["action_repeat"] = 4
    return folder


@pytest.fixture(scope="module")
def imagination_run(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the smoke run with an (untrained) cartpole reward predictor of its own model."""
    run_dir = tmp_path_factory.mktemp("hostile_imagination") / "run"
    shutil.copytree(smoke_run, run_dir)
    model = load_world_model(run_dir, "cpu").model
    predictor = RewardPredictor(model.dynamics.hidden_size)
    save_reward_predictor(run_dir / "reward_predictors" / "cartpole.pt", predictor, "cartpole", model_fingerprint(model))
    return run_dir


def damaged_checkpoint(smoke_run: Path, folder: Path, kind: str) -> Path:
    """A copy of the smoke run whose checkpoint is truncated, not a torch file, or a foreign torch file."""
    shutil.copytree(smoke_run, folder)
    path = folder / "checkpoint.pt"
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "not_torch":
        path.write_text("weights\n")
    else:
        torch.save({"format": 1, "model": {}}, path)
    return folder


# ----------------------------------------------------------------------------------------------
# train/world_model.py
# ----------------------------------------------------------------------------------------------
def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--profile", "smoke", "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def test_train_script_refuses_a_truncated_dataset_file(damaged_datasets: dict[str, Path], tmp_path: Path) -> None:
    """The reported case: a dataset folder with one truncated .h5 (a killed copy) ended in an h5py traceback."""
    out = tmp_path / "run"
    result = run("train/world_model.py", *train_args(damaged_datasets["truncated"], out))
    assert_refused(result, "cartpole_train.h5", "not a readable HDF5 file", "collect/dmcs.py")
    assert not out.exists()


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_train_refuses_damaged_or_foreign_dataset_files(
    kind: str, damaged_datasets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from train.world_model import main

    out = tmp_path / "run"
    assert main(train_args(damaged_datasets[kind], out)) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "cartpole_train.h5" in error and DAMAGE_PHRASES[kind] in error, error
    assert "delete it and rerun the collect/dmcs.py command" in error
    assert not out.exists()


@pytest.mark.parametrize(
    ("prepare", "extra", "phrase"),
    [
        ("empty", [], "no dataset file"),  # no files at all
        ("none", [], "no dataset folder"),  # no folder
        ("tiny", ["--num-predicted", "40"], "shorter than a training window of 48"),  # episodes of 30 steps
    ],
)
def test_train_refuses_missing_or_too_small_data(
    prepare: str, extra: list[str], phrase: str, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from train.world_model import main

    data = {"empty": tmp_path / "empty", "none": tmp_path / "none", "tiny": tiny_dataset}[prepare]
    if prepare == "empty":
        data.mkdir()
    out = tmp_path / "run"
    assert main(train_args(data, out, *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and phrase in error and ("collect/dmcs.py" in error), error
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--adam-betas", "1.5", "0.9"], "--adam-betas must be in [0, 1)"),
        (["--device", "tpu9"], "unknown device"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--sampling-final-predicted", "1.5"], "must be in [0, 1]"),
    ],
)
def test_train_refuses_out_of_range_numbers_before_writing(
    extra: list[str], phrase: str, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from train.world_model import main

    out = tmp_path / "run"
    assert main(train_args(tiny_dataset, out, *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and phrase in error, error
    assert not out.exists()


@pytest.mark.parametrize("kind", ["truncated", "not_torch", "foreign"])
def test_train_resume_refuses_a_damaged_checkpoint(
    kind: str, smoke_run: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from train.world_model import main

    run_dir = damaged_checkpoint(smoke_run, tmp_path / "run", kind)
    before = snapshot(run_dir)
    assert main(train_args(tiny_dataset, run_dir, "--resume")) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "checkpoint.pt" in error and "train/world_model.py" in error, error
    assert snapshot(run_dir) == before


def test_train_resume_refuses_a_dataset_the_run_was_not_trained_on(
    smoke_run: Path, other_repeat_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from train.world_model import main

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.save({**checkpoint, "complete": False}, run_dir / "checkpoint.pt")  # a run still to be continued
    before = snapshot(run_dir)
    assert main(train_args(other_repeat_dataset, run_dir, "--resume")) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "action repeats" in error and "resume with its dataset" in error, error
    assert snapshot(run_dir) == before


def test_train_rerun_of_a_finished_run_is_a_no_op(smoke_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    before = snapshot(run_dir)
    result = run("train/world_model.py", *train_args(tiny_dataset, run_dir, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already complete: nothing to do" in result.stdout
    assert snapshot(run_dir) == before


def test_train_refuses_an_out_that_is_a_file(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from train.world_model import main

    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    assert main(train_args(tiny_dataset, out)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "keep me"


# ----------------------------------------------------------------------------------------------
# collect/dmcs.py
# ----------------------------------------------------------------------------------------------
COLLECT_OPTIONS = ("--domains", "cartpole", "--train-episodes", "2", "--test-episodes", "1", "--episode-steps", "30",
                   "--seed", "7", "--workers", "1")  # fmt: skip  (the tiny dataset's settings)


@pytest.mark.parametrize("kind", ["truncated", "not_hdf5", "wrong_layout"])
def test_collector_refuses_a_damaged_final_file(kind: str, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "dmcs"
    out.mkdir()
    for split in storage.SPLITS:
        shutil.copy(storage.dataset_path(tiny_dataset, "cartpole", split), out)
    damage(out / "cartpole_train.h5", kind)
    before = snapshot(out)
    assert_refused(run("collect/dmcs.py", "--out", str(out), *COLLECT_OPTIONS), "cartpole_train.h5", "delete it")
    assert snapshot(out) == before


def test_collector_refuses_a_damaged_partial_episode(tiny_dataset: Path, tmp_path: Path) -> None:
    """Episode files are written atomically, but a copied or restored folder can hold a damaged one: the
    assembly names it instead of failing with a traceback."""
    out = tmp_path / "dmcs"
    partial = out / ".partial" / "cartpole_train"
    partial.mkdir(parents=True)
    shutil.copy(storage.dataset_path(tiny_dataset, "cartpole", "test"), out)  # that split is done
    for index in range(2):  # every train episode is there, so the assembly runs at once
        (partial / f"episode_{index:05d}.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    final = snapshot(out)
    result = run("collect/dmcs.py", "--out", str(out), *COLLECT_OPTIONS)
    assert_refused(result, "episode_00000.h5 is damaged", "rerun the same command", after_progress=True)
    assert not (out / "cartpole_train.h5").exists()
    assert {name: data for name, data in snapshot(out).items() if "episode_" in name or name.endswith("test.h5")} == {
        name: data for name, data in final.items() if "episode_" in name or name.endswith("test.h5")
    }


# ----------------------------------------------------------------------------------------------
# downstream/reward.py
# ----------------------------------------------------------------------------------------------
def test_reward_script_with_fewer_test_episodes_than_folds(smoke_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """The reported case: 1 test episode and the default 5 folds ended in an uncaught ValueError."""
    out = tmp_path / "reward"
    result = run("downstream/reward.py", "--run", str(smoke_run), "--data", str(tiny_dataset), "--out", str(out),
                 "--tasks", "cartpole", "--device", "cpu")  # fmt: skip
    assert_refused(result, "1 test episodes, fewer than --folds 5", "--test-episodes", "lower --folds")
    assert not out.exists()


def reward_args(run_dir: Path, data: Path, out: Path, **options: object) -> object:
    from downstream.reward import Args

    settings = {"folds": 2, "folds_run": 1, **options}
    return Args(run=(run_dir,), data=data, out=out, tasks="cartpole", device="cpu", **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["truncated", "wrong_layout", "other_task"])
def test_reward_refuses_a_damaged_test_file(
    kind: str, smoke_run: Path, damaged_datasets: dict[str, Path], tmp_path: Path
) -> None:
    from downstream.reward import main

    out = tmp_path / "reward"
    with pytest.raises(InputError) as error:
        main(reward_args(smoke_run, damaged_datasets[kind], out))  # type: ignore[arg-type]
    assert_one_line(error, "cartpole_test.h5", "collect/dmcs.py")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["truncated", "not_torch", "foreign"])
def test_reward_refuses_a_damaged_checkpoint(kind: str, smoke_run: Path, two_test_episodes: Path, tmp_path: Path) -> None:
    from downstream.reward import main

    run_dir = damaged_checkpoint(smoke_run, tmp_path / "run", kind)
    before, out = snapshot(run_dir), tmp_path / "reward"
    with pytest.raises(InputError) as error:
        main(reward_args(run_dir, two_test_episodes, out))  # type: ignore[arg-type]
    assert_one_line(error, "checkpoint.pt")
    assert snapshot(run_dir) == before and not out.exists()


def test_reward_refuses_a_dataset_the_model_was_not_trained_on(
    smoke_run: Path, other_repeat_dataset: Path, tmp_path: Path
) -> None:
    from downstream.reward import main

    out = tmp_path / "reward"
    with pytest.raises(InputError) as error:
        main(reward_args(smoke_run, other_repeat_dataset, out))  # type: ignore[arg-type]
    assert_one_line(error, "action repeat 4", "action repeat 8", "use the dataset it was trained on")
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "phrase"),
    [({"seed": -3}, "--seed must be >= 0"), ({"folds": 1}, "2 <= --folds"), ({"epochs": 0}, "--epochs must be positive")],
)
def test_reward_refuses_out_of_range_numbers(
    options: dict[str, int], phrase: str, smoke_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    from downstream.reward import main

    with pytest.raises(InputError, match=phrase.replace("[", r"\[")):
        main(reward_args(smoke_run, tiny_dataset, tmp_path / "reward", **options))  # type: ignore[arg-type]
    assert not (tmp_path / "reward").exists()


# ----------------------------------------------------------------------------------------------
# downstream/rl.py and downstream/dynamics.py
# ----------------------------------------------------------------------------------------------
def rl_args(run_dir: Path, out: Path, **options: object) -> object:
    from downstream.rl import Args

    return Args(task="cartpole", algo="ppo", steps=64, num_envs=2, checkpoint=run_dir, eval_episodes=1, out=out,
                device="cpu", **options)  # type: ignore[arg-type]  # fmt: skip


def test_rl_script_refuses_a_damaged_reward_predictor(imagination_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(imagination_run, run_dir)
    predictor = run_dir / "reward_predictors" / "cartpole.pt"
    predictor.write_bytes(predictor.read_bytes()[:100])
    before, out = snapshot(run_dir), tmp_path / "rl"
    result = run("downstream/rl.py", "--task", "cartpole", "--checkpoint", str(run_dir), "--out", str(out),
                 "--device", "cpu")  # fmt: skip
    assert_refused(result, "cannot read reward predictor", "downstream/reward.py", after_progress=True)  # compute: ...
    assert snapshot(run_dir) == before and not out.exists()


def test_rl_refuses_data_and_numbers_that_do_not_fit(
    imagination_run: Path, other_repeat_dataset: Path, damaged_datasets: dict[str, Path], tmp_path: Path
) -> None:
    from downstream.rl import main

    out = tmp_path / "rl"
    with pytest.raises(InputError) as error:
        main(rl_args(imagination_run, out, data=other_repeat_dataset))  # type: ignore[arg-type]
    assert_one_line(error, "action repeat 4", "pass data= a matching dataset")
    with pytest.raises(InputError) as error:
        main(rl_args(imagination_run, out, data=damaged_datasets["truncated"]))  # type: ignore[arg-type]
    assert_one_line(error, "cartpole_test.h5", "not a readable HDF5 file")
    with pytest.raises(InputError, match="--seed must be >= 0"):
        main(rl_args(imagination_run, out, seed=-1))  # type: ignore[arg-type]
    assert not out.exists()


def test_rl_rerun_of_finished_work_is_a_no_op(imagination_run: Path, tmp_path: Path) -> None:
    """The results file is written last: with it there under the same options, nothing is trained or written."""
    from downstream.rl import args_record, main

    out = tmp_path / "rl"
    out.mkdir()
    args = rl_args(imagination_run, out)
    returns = {"mean": 1.0, "std": 0.0, "values": [1.0]}
    record = {"args": args_record(args), "real_agent": returns, "real_random": returns, "imagined_agent": returns}  # type: ignore[arg-type]
    (out / "cartpole-ppo.json").write_text(json.dumps(record))
    before = snapshot(out)
    report = main(args)  # type: ignore[arg-type]
    assert report.real_agent.values == [1.0] and snapshot(out) == before
    assert not (out / "cartpole-ppo.zip").exists()  # no agent was trained


def test_dynamics_benchmark_refuses_a_damaged_checkpoint(smoke_run: Path, tmp_path: Path) -> None:
    from downstream.dynamics import Args, main

    run_dir = damaged_checkpoint(smoke_run, tmp_path / "run", "truncated")
    with pytest.raises(InputError) as error:
        main(Args(run=(run_dir,), out=tmp_path / "out", device="cpu"))
    assert_one_line(error, "cannot read checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["collect/dmcs.py", "train/world_model.py", "downstream/reward.py"])
def test_help_into_a_closed_pipe_ends_quietly(script: str) -> None:
    """``script --help | head -3``: the reader goes away while the help is printed. The script stops with the
    shell's code for it (141) and no traceback. The reading end is closed before the script starts, so its very
    first write fails (a real ``| head`` only sometimes closes before the help is out)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr[-3000:]
    assert result.stderr == "", result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# The env constructors and the data API (library callers get the InputError)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["truncated", "not_torch", "foreign"])
def test_imagined_env_refuses_a_damaged_checkpoint(kind: str, smoke_run: Path, tmp_path: Path) -> None:
    run_dir = damaged_checkpoint(smoke_run, tmp_path / "run", kind)
    with pytest.raises(InputError) as error:
        gym.make("StructVRNN-Imagined-cartpole", checkpoint=run_dir, device="cpu")
    assert_one_line(error, "checkpoint.pt", "train/world_model.py")


def test_imagined_envs_refuse_damaged_missing_or_foreign_inputs(
    imagination_run: Path, damaged_datasets: dict[str, Path], other_repeat_dataset: Path, tmp_path: Path
) -> None:
    def make(**options: object) -> None:
        gym.make("StructVRNN-Imagined-cartpole", checkpoint=imagination_run, device="cpu", **options)

    with pytest.raises(InputError) as error:
        make(data=damaged_datasets["wrong_layout"])
    assert_one_line(error, "cartpole_test.h5", "missing")
    with pytest.raises(InputError) as error:
        make(data=other_repeat_dataset)
    assert_one_line(error, "action repeat 4", "action repeat 8")
    with pytest.raises(MissingInputError) as error:
        make(data=tmp_path)
    assert_one_line(error, "no dataset file", "collect/dmcs.py")
    with pytest.raises(InputError) as error:
        make(horizon=-5)
    assert "horizon must be >= 1" in str(error.value)
    with pytest.raises(InputError, match="num_envs must be >= 1"):
        gym.make_vec("StructVRNN-Imagined-cartpole", num_envs=0, checkpoint=imagination_run, device="cpu")
    damaged = tmp_path / "cartpole.pt"
    damaged.write_text("not a predictor")
    with pytest.raises(InputError) as error:
        make(reward_predictor=damaged)
    assert_one_line(error, "cannot read reward predictor", "downstream/reward.py")


def test_real_task_through_the_model_refuses_what_does_not_fit(imagination_run: Path) -> None:
    models = load_imagination_models("cartpole", imagination_run, device="cpu")
    with pytest.raises(InputError) as error:
        RealTaskThroughModel(RealPixelEnv("cartpole", action_repeat=2), models)
    assert_one_line(error, "action repeat 2", "action_repeat=8")
    with pytest.raises(InputError, match="warmup_steps must be >= 0"):
        RealTaskThroughModel(RealPixelEnv("cartpole"), models, warmup_steps=-1)
    with pytest.raises(InputError, match="unknown device"):
        load_imagination_models("cartpole", imagination_run, device="gpu0")


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_window_dataset_names_the_damaged_file(kind: str, damaged_datasets: dict[str, Path]) -> None:
    with pytest.raises(InputError) as error:
        WindowDataset(damaged_datasets[kind], ["cheetah", "cartpole"], "train", length=8)
    assert_one_line(error, "cartpole_train.h5", DAMAGE_PHRASES[kind], "collect/dmcs.py")


def test_check_options_names_the_first_flag_out_of_range() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Options:
        num_envs: int = 4
        eval_episodes: int = 0
        seed: int = -1

    check_options(Options(), 1, "num_envs")  # in range: nothing raised
    with pytest.raises(InputError, match=r"^--eval-episodes must be positive, got 0$"):
        check_options(Options(), 1, "num_envs", "eval_episodes")
    with pytest.raises(InputError, match=r"^--seed must be >= 0, got -1$"):
        check_options(Options(), 0, "eval_episodes", "seed")
