"""downstream/loop.py for real, on the tiny dataset and the smoke world model: a loop of round 0 and one round
(collect with the agent on real cartpole, refine the dynamics, refit the reward, train in imagination, evaluate),
its outputs, a rerun that does nothing, refusals, and a SIGKILL after the collection that resumes without
collecting again and ends with the numbers of the uninterrupted loop. Measured on 2 busy cores: the module's
loop ~50 s, the kill test ~55 s (one more loop), the rest seconds."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from downstream import loop, loop_diagnosis
from tests.process_tree import kill_tree, start, wait_for
from worldmodel import storage
from worldmodel.checkpoint import load_checkpoint
from worldmodel.errors import InputError
from worldmodel.fingerprint import model_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOP = REPO_ROOT / "downstream" / "loop.py"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TASK = "cartpole"  # the shortest real episodes (125 steps)
STEPS = 30  # the tiny dataset's episode length, which the collected episodes take
TRAIN_EPISODES, TEST_EPISODES = 2, 1
# Not the outcome of a round: wall time, and where its files are.
VARYING_FIELDS = {"wall_seconds", "phase_seconds", "total_wall_seconds", "world_model", "agent"}
FIELDS = {"round", "real_return_mean", "real_return_std", "random_return_mean", "random_return_std",
          "imagined_return_mean", "imagined_return_std", "real_env_steps", "agent_episodes", "collected_control_steps",
          "eval_episodes"} | VARYING_FIELDS  # fmt: skip
ACTION_REPEAT = 8  # cartpole's: the simulator steps of one agent step


def loop_options(run: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", TASK, "--rounds", "1", "--checkpoint", str(run), "--data", str(data), "--out", str(out),
            "--train-episodes", str(TRAIN_EPISODES), "--test-episodes", str(TEST_EPISODES), "--refine-steps", "4",
            "--reward-windows", "16", "--reward-epochs", "2", "--rl-steps", "64", "--num-envs", "4",
            "--eval-episodes", "1", "--workers", "1", *extra]  # fmt: skip


def run_loop(options: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(LOOP), *options], cwd=REPO_ROOT, env=ONE_THREAD, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def outcomes(out: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (out / loop.ROUNDS_FILE).read_text().splitlines()]
    return [{key: value for key, value in record.items() if key not in VARYING_FIELDS} for record in records]


def part_path(out: Path, split: str) -> Path:
    return storage.dataset_path(out / loop.DATA_DIR, TASK, split, loop.part_name(1))


def snapshot(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def finished_loop(smoke_run: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted loop of round 0 and round 1 (one subprocess, one thread)."""
    out = tmp_path_factory.mktemp("loop") / "loop"
    result = run_loop(loop_options(smoke_run, tiny_dataset, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_one_round_writes_its_line_plot_state_gif_and_models(
    finished_loop: Path, smoke_run: Path, tiny_dataset: Path
) -> None:
    records = [json.loads(line) for line in (finished_loop / loop.ROUNDS_FILE).read_text().splitlines()]
    assert [record["round"] for record in records] == [0, 1] and all(set(r) == FIELDS for r in records)
    random_steps = 3 * STEPS  # the tiny dataset's cartpole: 2 train + 1 test episodes
    assert [r["real_env_steps"] for r in records] == [random_steps, random_steps + (TRAIN_EPISODES + TEST_EPISODES) * STEPS]
    assert [r["agent_episodes"] for r in records] == [0, TRAIN_EPISODES + TEST_EPISODES]
    assert [r["collected_control_steps"] for r in records] == [0, (TRAIN_EPISODES + TEST_EPISODES) * STEPS * ACTION_REPEAT]
    assert [r["eval_episodes"] for r in records] == [1, 1]
    assert records[0]["random_return_mean"] == records[1]["random_return_mean"]  # the same real starts every round
    assert set(records[1]["phase_seconds"]) == set(loop.PHASES) and set(records[0]["phase_seconds"]) == set(loop.FIRST_PHASES)
    assert (finished_loop / loop.PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    assert (finished_loop / loop.GIF_FILE).read_bytes().startswith(b"GIF8")
    state = json.loads((finished_loop / loop.STATE_FILE).read_text())
    assert state["done"] == {"0": list(loop.FIRST_PHASES), "1": list(loop.PHASES)}

    # Round 1's episodes: acted by round 0's agent in round 0's model, one part per split, in the loop's folder only.
    for split, episodes in (("train", TRAIN_EPISODES), ("test", TEST_EPISODES)):
        info = storage.read_info(part_path(finished_loop, split))
        assert (info.num_episodes, info.episode_steps) == (episodes, STEPS)
        assert info.attrs["policy"] == str((finished_loop / "round-00" / "rl" / f"{TASK}-ppo.zip").resolve())
        assert Path(info.attrs["world_model_checkpoint"]).parent == (finished_loop / "round-00" / "world_model").resolve()
    assert not list(tiny_dataset.glob("*.loop-*")), "the random dataset was written to"

    # Refined: round 0's detector and normalisation, a fine-tuned core, trained on the task's data only.
    start_model, refined = load_checkpoint(smoke_run)["model"], load_checkpoint(finished_loop / "round-01" / "world_model")
    changed = {key for key in start_model if not torch.equal(start_model[key], refined["model"][key])}
    assert changed and all(key.startswith("dynamics.") for key in changed)
    assert refined["complete"] and refined["dataset"]["tasks"] == [TASK]
    assert refined["train_config"]["init_from"] == str(finished_loop / "round-00" / "world_model")
    predictor = torch.load(finished_loop / "round-01" / "world_model" / "reward_predictors" / f"{TASK}.pt",
                           weights_only=True)  # fmt: skip
    from worldmodel.checkpoint import load_world_model

    assert predictor["world_model_fingerprint"] == model_fingerprint(load_world_model(finished_loop / "round-01" / "world_model").model)


def test_a_rerun_of_a_finished_loop_changes_nothing(finished_loop: Path, smoke_run: Path, tiny_dataset: Path) -> None:
    before = snapshot(finished_loop)
    args = loop.Args(task=TASK, rounds=1, checkpoint=smoke_run, data=tiny_dataset, out=finished_loop,
                     train_episodes=TRAIN_EPISODES, test_episodes=TEST_EPISODES, refine_steps=4, reward_windows=16,
                     reward_epochs=2, rl_steps=64, num_envs=4, eval_episodes=3, workers=2)  # fmt: skip
    assert [record["round"] for record in loop.main(args)] == [0, 1]  # --workers and --eval-episodes may change
    assert snapshot(finished_loop) == before


def test_keep_agent_starts_each_round_from_the_previous_rounds_agent(tmp_path: Path) -> None:
    args = loop.Args(task=TASK, rounds=2, out=tmp_path / "loop", keep_agent=True)
    assert loop.rl_args(args, 0).init_agent is None  # round 0 has no previous agent
    assert loop.rl_args(args, 2).init_agent == tmp_path / "loop" / "round-01" / "rl" / f"{TASK}-ppo.zip"
    assert loop.rl_args(dataclasses.replace(args, keep_agent=False), 2).init_agent is None


def test_observe_keypoints_reaches_every_rounds_agent(tmp_path: Path) -> None:
    args = loop.Args(task=TASK, rounds=2, out=tmp_path / "loop", observe_keypoints=True)
    assert all(loop.rl_args(args, index).observe_keypoints for index in range(3))
    assert not loop.rl_args(dataclasses.replace(args, observe_keypoints=False), 1).observe_keypoints


def test_first_refine_steps_fine_tune_round_zeros_dynamics_on_the_task(
    smoke_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """--first-refine-steps: round 0's model is the given one with its dynamics fine-tuned on the task's random data
    (the detector kept), with the run's own learning rate; its reward predictor and agent are fit on that model."""
    out = tmp_path / "loop"
    options = loop_options(smoke_run, tiny_dataset, out, "--first-refine-steps", "3")
    options[options.index("--rounds") + 1] = "0"
    result = run_loop(options)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / loop.STATE_FILE).read_text())
    assert state["done"] == {"0": ["refine", *loop.FIRST_PHASES]}
    [record] = [json.loads(line) for line in (out / loop.ROUNDS_FILE).read_text().splitlines()]
    assert set(record["phase_seconds"]) == {"refine", *loop.FIRST_PHASES} and record["collected_control_steps"] == 0
    start_model, refined = load_checkpoint(smoke_run), load_checkpoint(out / "round-00" / "world_model")
    changed = {key for key in start_model["model"] if not torch.equal(start_model["model"][key], refined["model"][key])}
    assert changed and all(key.startswith("dynamics.") for key in changed)
    assert refined["dataset"]["tasks"] == [TASK] and refined["train_config"]["dynamics_steps"] == 3
    assert refined["train_config"]["learning_rate"] == start_model["train_config"]["learning_rate"]
    predictor = torch.load(out / "round-00" / "world_model" / "reward_predictors" / f"{TASK}.pt", weights_only=True)
    from worldmodel.checkpoint import load_world_model

    assert predictor["world_model_fingerprint"] == model_fingerprint(load_world_model(out / "round-00" / "world_model").model)


def test_a_planning_loop_collects_with_its_planner_and_evaluates_it(
    smoke_run: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--algo cem: no agent is trained; each round writes its planner file, round 1's episodes are collected by
    round 0's planner (recorded in the part), and each round's line holds the planner's real returns."""
    out = tmp_path / "loop"
    options = loop_options(smoke_run, tiny_dataset, out, "--algo", "cem", "--plan-candidates", "8",
                           "--plan-iterations", "1", "--horizon", "3")  # fmt: skip
    result = run_loop(options)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / loop.ROUNDS_FILE).read_text().splitlines()]
    assert [record["round"] for record in records] == [0, 1]
    planner = out / "round-00" / loop.RL_DIR / f"{TASK}-cem.planner.json"
    assert records[0]["agent"] == str(planner) and planner.is_file()
    assert json.loads(planner.read_text())["candidates"] == 8 and not list(out.rglob("*.zip"))
    attrs = storage.read_info(part_path(out, "train")).attrs
    assert attrs["policy_algorithm"] == "cem" and attrs["policy"] == str(planner.resolve())
    assert attrs["world_model_checkpoint"] == str((out / "round-00" / "world_model" / "checkpoint.pt").resolve())
    results = json.loads((out / "round-01" / loop.RL_DIR / f"{TASK}-cem.json").read_text())
    assert results["real_planner"]["mean"] == records[1]["real_return_mean"] and results["seconds_per_step"] > 0
    assert (out / loop.GIF_FILE).is_file() and (out / loop.PLOT_FILE).is_file()

    # A planning loop started before --plan-precision existed planned in float32: resumed with the new default
    # ('auto') it is refused in one line naming that value, and continues with it.
    state = json.loads((out / loop.STATE_FILE).read_text())
    assert state["settings"].pop("plan_precision") == "auto"
    (out / loop.STATE_FILE).write_text(json.dumps(state))
    assert loop.cli(options) == 2 and "plan_precision='fp32'" in capsys.readouterr().err
    assert loop.cli([*options, "--plan-precision", "fp32"]) == 0


def test_a_loop_started_before_an_option_existed_continues_with_its_default(
    finished_loop: Path, smoke_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    older = tmp_path / "loop"
    shutil.copytree(finished_loop, older, symlinks=True)
    state = json.loads((older / loop.STATE_FILE).read_text())
    del state["settings"]["start_share"]  # as written before --start-share existed
    (older / loop.STATE_FILE).write_text(json.dumps(state))
    args = loop.Args(task=TASK, rounds=1, checkpoint=smoke_run, data=tiny_dataset, out=older,
                     train_episodes=TRAIN_EPISODES, test_episodes=TEST_EPISODES, refine_steps=4, reward_windows=16,
                     reward_epochs=2, rl_steps=64, num_envs=4, eval_episodes=1, workers=1)  # fmt: skip
    assert [record["round"] for record in loop.main(args)] == [0, 1]
    with pytest.raises(InputError, match="start_share=0.0"):  # the default stands in: another value differs
        loop.main(dataclasses.replace(args, start_share=0.5))


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--task", "pendulum"], "--task"), (["--rounds", "-1"], "--rounds must be >= 0"),
     (["--noise", "nan"], "--noise"), (["--start-share", "nan"], "--start-share"), (["--rl-steps", "0"], "--rl-steps must be positive"),
     (["--checkpoint", "/nonexistent/run"], "--checkpoint"),
     (["--algo", "cem", "--plan-iterations", "0"], "iterations must be >= 1"),
     (["--algo", "cem", "--keep-agent"], "--keep-agent")],
)  # fmt: skip
def test_bad_options_end_in_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loop.cli([*argv, "--out", str(tmp_path / "loop")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "loop").exists()


def test_other_settings_and_foreign_data_are_refused_in_one_line(
    finished_loop: Path, smoke_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    before = snapshot(finished_loop)
    result = run_loop(loop_options(smoke_run, tiny_dataset, finished_loop, "--noise", "0.5"))
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "noise=0.3" in lines[0] and "Traceback" not in result.stderr
    assert snapshot(finished_loop) == before

    # A part the loop did not collect would mix episodes of unknown settings into the next refinement.
    copy = tmp_path / "loop"
    shutil.copytree(finished_loop, copy, symlinks=True)
    shutil.copy(part_path(copy, "train"), copy / loop.DATA_DIR / f"{TASK}_train.mine.h5")
    args = loop.Args(task=TASK, rounds=2, checkpoint=smoke_run, data=tiny_dataset, out=copy,
                     train_episodes=TRAIN_EPISODES, test_episodes=TEST_EPISODES, refine_steps=4, reward_windows=16,
                     reward_epochs=2, rl_steps=64, num_envs=4, eval_episodes=1, workers=1)  # fmt: skip
    with pytest.raises(InputError, match="not collected by this loop"):
        loop.main(args)
    assert not part_path(copy, "train").with_name(f"{TASK}_train.{loop.part_name(2)}.h5").exists()


def test_a_loop_killed_after_collecting_resumes_without_collecting_again(
    finished_loop: Path, smoke_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "loop"
    options = loop_options(smoke_run, tiny_dataset, out)
    state_path = out / loop.STATE_FILE

    def collected() -> bool:
        try:
            return "collect" in json.loads(state_path.read_text())["done"].get("1", [])
        except (OSError, ValueError):  # not written yet
            return False

    process = start([sys.executable, str(LOOP), *options], REPO_ROOT, ONE_THREAD)
    try:
        reached = wait_for(collected, process)
    finally:
        kill_tree(process)
    assert reached, f"the loop ended before collecting (exit {process.returncode})"
    assert "agent" not in json.loads(state_path.read_text())["done"]["1"], "the kill came too late to test a resume"
    parts = {split: part_path(out, split) for split in storage.SPLITS}
    written = {split: (path.stat().st_ino, path.stat().st_mtime_ns) for split, path in parts.items()}

    result = run_loop(options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {split: (path.stat().st_ino, path.stat().st_mtime_ns) for split, path in parts.items()} == written
    for split, episodes in (("train", TRAIN_EPISODES), ("test", TEST_EPISODES)):
        with h5py.File(parts[split]) as file:
            assert file["actions"].shape[0] == episodes  # collected once, not again
    assert outcomes(out) == outcomes(finished_loop)  # every phase is deterministic and resumes exactly


def test_diagnosis_runs_the_previous_rounds_model_on_the_agents_episodes(finished_loop: Path) -> None:
    records = loop_diagnosis.main(loop_diagnosis.Args(out=finished_loop, windows=500))
    assert [(r["round"], r["model_round"], r["source"]) for r in records] == [(1, 0, "random"), (1, 0, "agent")]
    written = [json.loads(line) for line in (finished_loop / loop_diagnosis.DIAGNOSIS_FILE).read_text().splitlines()]
    assert written == records
    # By hand: every window of the one agent test episode (30 steps: starts 0..10 of 20 frames); the predicted
    # frames 8..19 are reached by the rewards of steps start+7 .. start+18.
    with h5py.File(part_path(finished_loop, "test"), "r") as file:
        rewards = file["rewards"][0]
    expected = np.mean([rewards[start + 7 : start + 19] for start in range(11)])
    agent = records[1]
    assert agent["windows"] == 11 and agent["reward"] == pytest.approx(float(expected), rel=1e-5)
    assert np.isfinite(agent["predicted"]) and agent["mse_over_variance"] >= 0


def test_diagnosis_of_a_folder_without_collected_rounds_ends_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loop_diagnosis.cli(["--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "downstream/loop.py" in error and len(error.splitlines()) == 1
