"""The collector collect/dmcs.py, run for real: file layout, contents against a replay through the
Simulator, seeding, resume after SIGKILL, and refusal of bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import worldmodel
from collect.random_episodes import episode_seeds
from envs.simulator import FAST_RENDER_SETTINGS, Simulator
from tests.process_tree import alive, descendants, log_tail, start, wait_for, wait_until_gone
from worldmodel import storage
from worldmodel.tasks import TASK_NAMES, TASKS

REPO_ROOT = Path(__file__).resolve().parents[1]
COLLECTOR = REPO_ROOT / "collect" / "dmcs.py"
TINY = {"seed": 7, "train": 2, "test": 1, "steps": 30}  # what conftest's tiny_dataset was collected with
TINY_OPTIONS = ["--train-episodes", "2", "--test-episodes", "1", "--episode-steps", "30", "--seed", "7"]


def collector_command(out: Path, *options: str) -> list[str]:
    return [sys.executable, str(COLLECTOR), "--out", str(out), *options]


def run_collector(out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(collector_command(out, *options), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def tree_snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under ``folder``."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def frames_close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renderer noise: almost no value differs by more than a few levels."""
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return a.shape == b.shape and difference.mean() < 0.1 and (difference > 8).mean() < 1e-3


def assert_same_dataset(path_a: Path, path_b: Path) -> None:
    with h5py.File(path_a, "r") as a, h5py.File(path_b, "r") as b:
        for name in ("actions", "rewards", "states", "episode_seeds"):
            np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=f"{path_a.name}: {name}")
        assert frames_close(a["frames"][...], b["frames"][...]), path_a.name
        assert dict(a.attrs).keys() == dict(b.attrs).keys()
        assert a.attrs["collection_settings"] == b.attrs["collection_settings"]


# --------------------------------------------------------------------------------------------------
# The tiny dataset: layout and contents


@pytest.mark.parametrize("split", storage.SPLITS)
@pytest.mark.parametrize("task", TASK_NAMES)
def test_layout_and_attrs(tiny_dataset: Path, task: str, split: str) -> None:
    path = storage.dataset_path(tiny_dataset, task, split)
    info = storage.validate_dataset(path)
    spec = TASKS[task]
    episodes, steps = TINY[split], TINY["steps"]
    with h5py.File(path, "r") as file:
        frames = file["frames"]
        assert frames.shape == (episodes, steps + 1, 64, 64, 3) and frames.dtype == np.uint8
        assert frames.chunks == (1, 16, 64, 64, 3) and frames.compression == "gzip"
        assert 1 <= frames.compression_opts <= 4
        assert file["actions"].shape == (episodes, steps, spec.action_dim) and file["actions"].dtype == np.float32
        assert file["rewards"].shape == (episodes, steps) and file["rewards"].dtype == np.float32
        assert file["states"].shape[:2] == (episodes, steps + 1) and file["states"].dtype == np.float32
        assert file["episode_seeds"].shape == (episodes,) and file["episode_seeds"].dtype == np.int64
        actions = file["actions"][...]
    assert np.all(np.abs(actions) <= 1) and actions.std() > 0.4  # uniform in [-1, 1]: std 0.58
    attrs = info.attrs
    expected = {
        "task": task, "domain": spec.domain, "dm_task": spec.task, "split": split,
        "action_repeat": spec.action_repeat, "horizon": 1000 // spec.action_repeat, "episode_steps": steps,
        "num_episodes": episodes, "seed": TINY["seed"], "action_dim": spec.action_dim,
        "package_version": worldmodel.__version__, "format_version": storage.FORMAT_VERSION,
        "render_fast_render": True, "render_image_size": 64, "render_camera_id": 0,
        **{f"render_{key}": value for key, value in FAST_RENDER_SETTINGS.items()},
    }
    assert {key: attrs[key] for key in expected} == expected
    simulator = Simulator(task)
    assert list(zip(attrs["state_keys"], attrs["state_sizes"])) == simulator.state_layout
    simulator.close()
    assert json.loads(attrs["collection_settings"])["seed"] == TINY["seed"]


def test_nothing_but_final_files_is_left(tiny_dataset: Path) -> None:
    names = sorted(path.name for path in tiny_dataset.iterdir())
    assert names == sorted(f"{task}_{split}.h5" for task in TASK_NAMES for split in storage.SPLITS)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_rewards_are_sums_of_control_rewards(tiny_dataset: Path, task: str) -> None:
    repeat = TASKS[task].action_repeat
    for split in storage.SPLITS:
        with h5py.File(storage.dataset_path(tiny_dataset, task, split), "r") as file:
            rewards = file["rewards"][...]
        assert np.isfinite(rewards).all()
        assert rewards.min() >= 0 and rewards.max() <= repeat + 1e-5  # each control step earns [0, 1]
        if task == "reacher":  # reacher-easy pays exactly 0 or 1 per control step
            np.testing.assert_array_equal(rewards, np.round(rewards))


@pytest.mark.parametrize("task", TASK_NAMES)
def test_contents_replay_through_the_simulator(tiny_dataset: Path, task: str) -> None:
    """Known answers: seeds and actions from the documented derivation, frames/rewards/states from
    replaying the stored seed and actions in envs.simulator.Simulator."""
    simulator = Simulator(task)
    for split in storage.SPLITS:
        with h5py.File(storage.dataset_path(tiny_dataset, task, split), "r") as file:
            stored = {name: file[name][...] for name in ("frames", "actions", "rewards", "states", "episode_seeds")}
        for episode in range(TINY[split]):
            seed, action_sequence = episode_seeds(TINY["seed"], task, split, episode)
            assert stored["episode_seeds"][episode] == seed
            uniform = np.random.default_rng(action_sequence).uniform(-1, 1, (TINY["steps"], TASKS[task].action_dim))
            np.testing.assert_array_equal(stored["actions"][episode], uniform.astype(np.float32))
            frame, state = simulator.reset(seed)
            frames, rewards, states = [frame], [], [state]
            for action in stored["actions"][episode]:
                transition = simulator.step(action)
                frames.append(transition.frame)
                rewards.append(transition.reward)
                states.append(transition.state)
            np.testing.assert_array_equal(stored["rewards"][episode], np.float32(rewards))
            np.testing.assert_array_equal(stored["states"][episode], np.stack(states))
            assert frames_close(stored["frames"][episode], np.stack(frames))
    simulator.close()


def test_episodes_start_from_their_own_reset(tiny_dataset: Path) -> None:
    """Each episode row begins at a reset: different seeds, different initial states, and the frame
    tolerance used above does tell consecutive frames apart."""
    with h5py.File(storage.dataset_path(tiny_dataset, "walker-walk", "train"), "r") as file:
        frames, states = file["frames"][...], file["states"][...]
    assert not np.array_equal(states[0, 0], states[1, 0])
    assert not frames_close(frames[0, 0], frames[1, 0])
    assert not frames_close(frames[0, 10], frames[0, 11])


def test_train_and_test_seeds_are_disjoint(tiny_dataset: Path) -> None:
    for task in TASK_NAMES:
        seeds = {}
        for split in storage.SPLITS:
            with h5py.File(storage.dataset_path(tiny_dataset, task, split), "r") as file:
                seeds[split] = set(file["episode_seeds"][...].tolist())
        assert len(seeds["train"]) == TINY["train"] and not seeds["train"] & seeds["test"]
    # The rule behind it (split in the lowest bit) holds for any number of episodes and root seeds.
    for root_seed in (0, 1, 12345):
        train = {episode_seeds(root_seed, "cheetah", "train", e)[0] for e in range(2000)}
        test = {episode_seeds(root_seed, "cheetah", "test", e)[0] for e in range(2000)}
        assert not train & test and len(train) > 1990


def test_same_seed_same_data_other_seed_other_data(tiny_dataset: Path, tmp_path: Path) -> None:
    same, other = tmp_path / "same", tmp_path / "other"
    assert run_collector(same, "--domains", "cartpole", "--workers", "1", *TINY_OPTIONS).returncode == 0
    options = [*TINY_OPTIONS[:-1], "8"]
    assert run_collector(other, "--domains", "cartpole", "--workers", "1", *options).returncode == 0
    for split in storage.SPLITS:
        original = storage.dataset_path(tiny_dataset, "cartpole", split)
        assert_same_dataset(original, storage.dataset_path(same, "cartpole", split))
        with h5py.File(original) as a, h5py.File(storage.dataset_path(other, "cartpole", split)) as b:
            assert not set(a["episode_seeds"][...].tolist()) & set(b["episode_seeds"][...].tolist())
            assert not np.array_equal(a["actions"][...], b["actions"][...])
            assert not np.array_equal(a["frames"][:, 0], b["frames"][:, 0])


def test_preset_and_explicit_options(tmp_path: Path) -> None:
    """--preset quick sets defaults (here its 200-step cap); explicit options win over it."""
    result = run_collector(tmp_path, "--preset", "quick", "--domains", "cartpole", "--train-episodes", "1",
                           "--test-episodes", "1", "--episode-steps", "12")
    assert result.returncode == 0, result.stderr
    settings = json.loads(storage.read_info(tmp_path / "cartpole_train.h5").attrs["collection_settings"])
    assert (settings["episodes"], settings["episode_steps"], settings["episode_steps_cap"]) == (1, 12, 12)
    assert "cartpole_train.h5" in result.stdout  # the summary


# --------------------------------------------------------------------------------------------------
# Resume after SIGKILL


def live_members(process_group: int) -> list[int]:
    """Processes of ``process_group`` that are still running (zombies have released their files)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)"
        except OSError:  # the process ended while we looked
            continue
        state, group = fields[0], int(fields[2])
        if group == process_group and state not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def kill_process_tree(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGKILL the collector, as ``kill -9`` would, and wait until every worker of it has died too (they
    follow through PR_SET_PDEATHSIG, asynchronously): only then is the folder what a resume will see."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while live_members(process.pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers of the killed collector still alive: {live_members(process.pid)}")
        time.sleep(0.02)


def partial_episodes(out: Path) -> list[Path]:
    return list((out / ".partial").glob("*/episode_*.h5"))


def final_files(out: Path) -> list[Path]:
    return list(out.glob("*.h5"))


def assert_only_complete_files_visible(out: Path, episodes: dict[str, int]) -> None:
    for path in final_files(out):
        assert storage.validate_dataset(path).num_episodes == episodes[path.stem.rsplit("_", 1)[1]]


def test_resume_after_sigkill_gives_the_uninterrupted_dataset(tmp_path: Path) -> None:
    options = ["--domains", "cartpole,reacher", "--train-episodes", "6", "--test-episodes", "3",
               "--episode-steps", "40", "--seed", "3", "--workers", "1"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert run_collector(reference, *options).returncode == 0

    # Kill 1: after two episodes are on disk. Kill 2: once a first final file exists (or whenever
    # the second run has made some progress).
    kill_points = [lambda: len(partial_episodes(resumed)) >= 2, lambda: len(final_files(resumed)) >= 1]
    kills = 0
    for kill_point in kill_points:
        process = start(collector_command(resumed, *options), REPO_ROOT)  # its own process group
        if wait_for(kill_point, process, timeout=120) and process.poll() is None:
            kill_process_tree(process)
            kills += 1
        process.wait(timeout=60)
        assert_only_complete_files_visible(resumed, {"train": 6, "test": 3})
    assert kills >= 1
    assert len(final_files(resumed)) < 4, "the kills came too late to test anything"

    # A rerun with other settings is refused and leaves the unfinished collection untouched.
    before = tree_snapshot(resumed)
    refused = run_collector(resumed, *options[:-4], "--seed", "4", "--workers", "1")
    assert refused.returncode == 2 and "refusing to mix" in refused.stderr
    assert tree_snapshot(resumed) == before

    finished = run_collector(resumed, *options)
    assert finished.returncode == 0, finished.stderr
    assert sorted(os.listdir(resumed)) == sorted(os.listdir(reference))  # no .partial left
    for path in final_files(reference):
        assert_same_dataset(path, resumed / path.name)

    # Complete files are skipped: a rerun writes nothing.
    before = tree_snapshot(resumed)
    assert run_collector(resumed, *options).returncode == 0
    assert tree_snapshot(resumed) == before


def spawned_workers(root: int) -> set[int]:
    """The pool's worker processes below ``root`` (multiprocessing 'spawn' children; not its resource tracker)."""
    found = set()
    for pid in descendants(root) - {root}:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # ended while we looked
            continue
        if b"spawn_main" in command:
            found.add(pid)
    return found


def test_workers_of_a_main_process_killed_while_they_start_end_on_their_own(tmp_path: Path) -> None:
    """SIGKILL of the main process alone (as the OOM killer does), the moment its workers exist, while they
    still import dm_control: each must end by itself (its initializer sees another parent) and write nothing."""
    out = tmp_path / "out"
    options = ["--domains", "cartpole", *TINY_OPTIONS, "--workers", "2"]
    process = start(collector_command(out, *options), REPO_ROOT)
    assert wait_for(lambda: len(spawned_workers(process.pid)) == 2, process, timeout=120), "no workers started"
    workers = spawned_workers(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    try:
        wait_until_gone(workers, timeout=180, what="workers outlived their killed main process")
    finally:  # a failing run must not leave its orphans running
        for pid in alive(workers):
            os.kill(pid, signal.SIGKILL)
    assert not final_files(out) and not partial_episodes(out)


def test_a_worker_that_dies_is_replaced_and_the_dataset_is_the_uninterrupted_one(tmp_path: Path) -> None:
    """SIGKILL one worker mid-run (as a crash in its C libraries or the OOM killer ends one): the run replaces
    the workers, redoes the lost jobs, and ends (exit 0) with the dataset of an uninterrupted run."""
    options = ["--domains", "cartpole", "--train-episodes", "12", "--test-episodes", "2", "--episode-steps", "40",
               "--seed", "3", "--workers", "2"]
    reference, out, log = tmp_path / "reference", tmp_path / "out", tmp_path / "collector.log"
    assert run_collector(reference, *options).returncode == 0
    process = start(collector_command(out, *options), REPO_ROOT, log=log)
    try:
        assert wait_for(lambda: len(partial_episodes(out)) >= 1, process, timeout=120), log_tail(log)
        workers = spawned_workers(process.pid)
        assert workers and process.poll() is None, "the run ended before a worker could be killed"
        os.kill(min(workers), signal.SIGKILL)
        assert process.wait(timeout=300) == 0, log_tail(log)
    finally:
        if process.poll() is None:  # a failing run must not outlive the test
            kill_process_tree(process)
    assert "a worker process died (killed, or crashed); restarting the workers" in log.read_text(), log_tail(log)
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # no .partial left
    for path in final_files(reference):
        assert_same_dataset(path, out / path.name)


# --------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, nothing written


def assert_refused(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("options", "phrases"),
    [
        (["--domains", "cartpole,pendulum"], ["unknown task 'pendulum'", ", ".join(TASK_NAMES)]),
        (["--train-episodes", "0"], ["--train-episodes must be positive"]),
        (["--test-episodes", "-3"], ["--test-episodes must be positive"]),
        (["--episode-steps", "0"], ["--episode-steps must be positive"]),
        (["--workers", "0"], ["--workers must be positive"]),
        (["--seed", "-1"], ["--seed"]),
        (["--action-repeat", "0"], ["--action-repeat must be positive"]),
        (["--action-repeat", "cartpole=0"], ["--action-repeat cartpole must be positive"]),
        (["--action-repeat", "cartpole=two"], ["expected a positive integer"]),
        (["--action-repeat", "pendulum=2"], ["unknown task 'pendulum'"]),
        (["--action-repeat", "cartpole=2000"], ["no agent step"]),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, options: list[str], phrases: list[str]) -> None:
    out = tmp_path / "out"
    assert_refused(run_collector(out, *options), *phrases)
    assert not out.exists()


def test_output_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "a_file"
    out.write_text("keep me")
    assert_refused(run_collector(out, "--domains", "cartpole"), "is a file")
    assert out.read_text() == "keep me"


@pytest.mark.parametrize(
    ("options", "phrases"),
    [
        (["--domains", "cartpole", *TINY_OPTIONS[:-1], "8"], ["seed=7", "seed=8", "refusing to mix"]),
        (["--domains", "cartpole", *TINY_OPTIONS, "--action-repeat", "4"], ["action_repeat=8", "action_repeat=4"]),
        (["--domains", "cartpole", *TINY_OPTIONS[:-3], "20", "--seed", "7"], ["episode_steps"]),
        (["--domains", "cartpole", *TINY_OPTIONS, "--no-fast-render"], ["render"]),
        (["--domains", "cartpole", "--train-episodes", "3", *TINY_OPTIONS[2:]], ["episodes=2", "episodes=3"]),
        # Another task into the same folder must share the folder-wide settings (here the seed).
        (["--domains", "cheetah", *TINY_OPTIONS[:-1], "9"], ["cartpole_", "seed=7", "seed=9"]),
    ],
)
def test_existing_dataset_with_other_settings_is_refused(
    tiny_dataset: Path, tmp_path: Path, options: list[str], phrases: list[str]
) -> None:
    out = tmp_path / "dmcs"
    out.mkdir()
    for split in storage.SPLITS:
        shutil.copy(storage.dataset_path(tiny_dataset, "cartpole", split), out)
    before = tree_snapshot(out)
    assert_refused(run_collector(out, *options), *phrases)
    assert tree_snapshot(out) == before
