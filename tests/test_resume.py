"""Killed and resumed runs end exactly where uninterrupted ones do: the trainer (one process and torchrun),
the reward experiment and RL in imagination.

Every kill is real (SIGKILL of the command and every process it started, ``tests/process_tree.py``), at a
moment chosen by what is on disk (a checkpoint, a finished fit, a saved agent), never by a fixed sleep.
Every command runs as a subprocess with one thread, as the uninterrupted run it is compared with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.process_tree import kill_tree, log_tail, start, wait_for
from worldmodel.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = REPO_ROOT / "train" / "world_model.py"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMING_FIELDS = {"time", "steps_per_s", "frames_per_s", "seconds"}


def run(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO_ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def records(run_dir: Path, *kinds: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{key: value for key, value in record.items() if key not in TIMING_FIELDS}
            for record in map(json.loads, lines) if record["kind"] in kinds]  # fmt: skip


class CheckpointWatch:
    """The checkpoint of a run directory, re-read only when the file was replaced (polling stays cheap)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "checkpoint.pt"
        self.seen: tuple[int, int] | None = None
        self.checkpoint: dict[str, Any] | None = None

    def now(self) -> dict[str, Any] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        if (stat.st_ino, stat.st_mtime_ns) != self.seen:
            self.seen, self.checkpoint = (stat.st_ino, stat.st_mtime_ns), load_checkpoint(self.path)
        return self.checkpoint


def kill_at(command: list[str], run_dir: Path, condition: Any) -> dict[str, Any]:
    """Start ``command``, kill it (and its children) as soon as its checkpoint satisfies ``condition``; the
    checkpoint it leaves behind (what --resume starts from)."""
    watch = CheckpointWatch(run_dir)
    log = run_dir.with_name(run_dir.name + ".log")
    process = start(command, REPO_ROOT, ONE_THREAD, log)
    try:
        reached = wait_for(lambda: (checkpoint := watch.now()) is not None and condition(checkpoint), process)
    finally:
        kill_tree(process)
    assert reached, f"the run ended before the kill point (exit {process.returncode}):\n{log_tail(log)}"
    checkpoint = load_checkpoint(run_dir)
    assert not checkpoint["complete"], f"the kill came too late to test a resume:\n{log_tail(log)}"
    return checkpoint


def assert_same_tensors(actual: Any, expected: Any, where: str = "") -> None:
    """Nested dicts / lists / tensors equal, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same_tensors(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, b) in enumerate(zip(actual, expected)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


# ---- the trainer, one process ------------------------------------------------------------------------
def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TRAIN), "--profile", "smoke", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--log-every", "1", "--eval-every", "1000", "--checkpoint-every", "4", *extra]  # fmt: skip


def test_joint_training_killed_and_resumed_matches_the_uninterrupted_run(tiny_dataset: Path, tmp_path: Path) -> None:
    """Killed after a periodic checkpoint, resumed: at step 12 the weights, the Adam state and every process's
    random generators equal the uninterrupted run's, and so does the finished model."""
    options = ("--mode", "joint", "--steps", "20")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(train_command(tiny_dataset, reference, *options, "--halt-after", "12"))
    reference_at_12 = load_checkpoint(reference)
    run(train_command(tiny_dataset, reference, *options, "--resume"))

    killed = kill_at(train_command(tiny_dataset, resumed, *options), resumed, lambda c: c["step"] >= 4)
    assert killed["stage"] == "joint" and killed["step"] < 12, "the kill came too late"
    run(train_command(tiny_dataset, resumed, *options, "--resume", "--halt-after", str(12 - killed["step"])))
    resumed_at_12 = load_checkpoint(resumed)
    assert (resumed_at_12["stage"], resumed_at_12["step"], resumed_at_12["global_step"]) == ("joint", 12, 12)
    for part in ("model", "optimizer", "rng_ranks"):
        assert_same_tensors(resumed_at_12[part], reference_at_12[part], part)
    assert len(resumed_at_12["rng_ranks"]) == 1

    run(train_command(tiny_dataset, resumed, *options, "--resume"))
    final, expected = load_checkpoint(resumed), load_checkpoint(reference)
    assert final["complete"] and expected["complete"]
    assert_same_tensors(final["model"], expected["model"], "model")
    assert records(resumed, "train", "eval") == records(reference, "train", "eval")  # losses, lr, grad norms


def test_staged_training_killed_in_each_stage_matches_the_uninterrupted_run(tiny_dataset: Path, tmp_path: Path) -> None:
    """Killed once in the vision stage and once in the dynamics stage (after the keypoint cache), resumed each
    time: the same final weights, keypoint cache, losses and evaluation as without the kills."""
    options = ("--vision-steps", "24", "--dynamics-steps", "100")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(train_command(tiny_dataset, reference, *options))

    first = kill_at(train_command(tiny_dataset, resumed, *options), resumed, lambda c: True)
    second = kill_at(train_command(tiny_dataset, resumed, *options, "--resume"), resumed,
                     lambda c: c["stage"] == "dynamics")  # fmt: skip
    assert first["stage"] == "vision" and first["step"] >= 4, "the first kill came too late"
    assert second["stage"] == "dynamics"
    run(train_command(tiny_dataset, resumed, *options, "--resume"))

    final, expected = load_checkpoint(resumed), load_checkpoint(reference)
    assert final["complete"]
    assert_same_tensors(final["model"], expected["model"], "model")
    assert_same_tensors(torch.load(resumed / "keypoints.pt"), torch.load(reference / "keypoints.pt"), "cache")
    assert records(resumed, "train", "eval") == records(reference, "train", "eval")


@pytest.mark.slow  # three torchrun launches of two processes each: ~1-2 min on 2 cores
def test_torchrun_training_killed_and_resumed_matches_the_uninterrupted_run(tiny_dataset: Path, tmp_path: Path) -> None:
    """Two processes (gloo): killing torchrun and both workers after a checkpoint, then resuming, gives the
    uninterrupted run's weights (each rank's generators are saved and restored, see the one-process tests for
    the same code with one rank)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    options = ("--mode", "joint", "--steps", "16")

    def command(out: Path, *extra: str) -> list[str]:
        return [*torchrun, *train_command(tiny_dataset, out, *options, *extra)[1:]]

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(command(reference))
    killed = kill_at(command(resumed), resumed, lambda c: c["step"] >= 4)
    assert len(killed["rng_ranks"]) == 2
    run(command(resumed, "--resume"))
    final, expected = load_checkpoint(resumed), load_checkpoint(reference)
    assert_same_tensors(final["model"], expected["model"], "model")
    assert_same_tensors(final["rng_ranks"], expected["rng_ranks"], "rng_ranks")
    assert records(resumed, "train", "eval") == records(reference, "train", "eval")
    # the batch size is global, so frames/s counts each of the two processes' half once (not twice)
    window = 8 + 8
    for record in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines()):
        if record["kind"] == "train":
            assert record["frames_per_s"] == pytest.approx(record["steps_per_s"] * 4 * window, rel=1e-6)


# ---- the reward experiment ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cartpole_test_episodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cartpole with three test episodes (the folds split by episode), by the real collector."""
    out = tmp_path_factory.mktemp("cartpole") / "dmcs"
    run([sys.executable, "collect/dmcs.py", "--domains", "cartpole", "--out", str(out), "--train-episodes", "1",
         "--test-episodes", "3", "--episode-steps", "30", "--seed", "5"])  # fmt: skip
    return out


def test_reward_experiment_killed_after_a_fit_reports_the_uninterrupted_numbers(
    smoke_run: Path, cartpole_test_episodes: Path, tmp_path: Path
) -> None:
    """Killed once a first fit's result is on disk, rerun: the same report and predictors as one run."""
    numbers: dict[str, Any] = {}
    for name in ("reference", "resumed"):
        shutil.copytree(smoke_run, tmp_path / name / "run")
        out = tmp_path / name / "report"
        command = [sys.executable, "downstream/reward.py", "--run", str(tmp_path / name / "run"),
                   "--data", str(cartpole_test_episodes), "--out", str(out), "--tasks", "cartpole",
                   "--sequences", "30", "--epochs", "12", "--folds", "3", "--device", "cpu", "--workers", "1"]  # fmt: skip
        if name == "resumed":
            process = start(command, REPO_ROOT, ONE_THREAD)
            try:
                reached = wait_for(lambda: any((out / "cache").rglob("*.npy")), process)
            finally:
                kill_tree(process)
            assert reached and not (out / "results.json").exists(), "the kill came too late"
            finished = len(list((out / "cache").rglob("*.npy")))
            assert 1 <= finished < 9
        run(command)
        numbers[name] = json.loads((out / "results.json").read_text())["tasks"]
        assert len(list((out / "cache").rglob("*.npy"))) == 9  # 3 inputs x 3 folds
    assert numbers["resumed"] == numbers["reference"]
    predictors = [torch.load(tmp_path / name / "run" / "reward_predictors" / "cartpole.pt") for name in numbers]
    for name, predictor in zip(numbers, predictors):  # each signed by its own experiment (--out)
        assert predictor.pop("experiment") == str((tmp_path / name / "report").resolve())
    assert_same_tensors(predictors[1], predictors[0], "predictor")


# ---- RL in imagination ------------------------------------------------------------------------------
def snapshot_steps(path: Path) -> int | None:
    """Imagined steps done in the training snapshot at ``path`` (None: none yet)."""
    from envs.sb3_snapshot import read_snapshot

    return read_snapshot(path)["num_timesteps"] if path.is_file() else None


def test_rl_killed_and_rerun_trains_the_uninterrupted_agent(imagination_run: Path, tmp_path: Path) -> None:
    """PPO in imagination (3 updates of 2048 steps), killed after its first saved snapshot and run again: the
    same agent (policy, Adam state), imagined episodes in flight and generators as an uninterrupted run."""
    from envs.sb3_snapshot import read_snapshot
    from stable_baselines3 import PPO

    def command(out: Path) -> list[str]:
        return [sys.executable, "downstream/rl.py", "--task", "cartpole", "--algo", "ppo", "--steps", "6144",
                "--num-envs", "16", "--save-every", "2048", "--eval-episodes", "1", "--checkpoint",
                str(imagination_run), "--out", str(out), "--device", "cpu"]  # fmt: skip

    def train_until_saved(out: Path) -> None:
        """Run until the trained agent is written; the evaluation that follows is not what is tested here."""
        process = start(command(out), REPO_ROOT, ONE_THREAD)
        try:
            assert wait_for(lambda: (out / "cartpole-ppo.zip").is_file(), process), "rl.py failed"
        finally:
            kill_tree(process)

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train_until_saved(reference)
    snapshot = resumed / "cartpole-ppo.resume.pt"
    process = start(command(resumed), REPO_ROOT, ONE_THREAD)
    try:
        assert wait_for(lambda: snapshot.is_file(), process)
    finally:
        kill_tree(process)
    assert snapshot_steps(snapshot) in (2048, 4096), "the kill came too late"
    train_until_saved(resumed)

    agents = [PPO.load(out / "cartpole-ppo.zip", device="cpu") for out in (reference, resumed)]
    assert agents[1].num_timesteps == agents[0].num_timesteps == 6144
    assert_same_tensors(agents[1].policy.state_dict(), agents[0].policy.state_dict(), "policy")
    assert_same_tensors(agents[1].policy.optimizer.state_dict(), agents[0].policy.optimizer.state_dict(), "adam")
    final = [read_snapshot(out / "cartpole-ppo.resume.pt") for out in (reference, resumed)]
    for part in ("env", "rng", "monitor", "action_space", "num_timesteps"):
        assert_same_tensors(final[1][part], final[0][part], part)
