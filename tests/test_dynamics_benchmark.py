"""The dynamics benchmark (worldmodel/dynamics_benchmark.py, downstream/dynamics.py): known answers for the
per-horizon table and the linear probe, and the script on a real smoke run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.dynamics_benchmark import (
    benchmark_record,
    jump_free_ratios,
    keypoint_stability,
    OpenLoop,
    choose_window_starts,
    horizon_errors,
    probe_task,
)
from worldmodel.errors import InputError
from worldmodel.keypoint_cache import KeypointSplit


def moving_keypoints(batch: int, length: int, keypoints: int, speed: float) -> torch.Tensor:
    """Keypoints moving along x with constant ``speed`` per frame: (B, L, K, 3)."""
    frames = torch.arange(length, dtype=torch.float32)[None, :, None]
    x = -0.5 + speed * frames + 0.01 * torch.arange(keypoints)[None, None, :]
    points = torch.zeros(batch, length, keypoints, 3)
    points[..., 0] = x
    points[..., 2] = 1.0
    return points


def test_horizon_table_known_answers() -> None:
    observed, horizon, speed = 4, 3, 0.1
    detected = moving_keypoints(2, observed + horizon, 5, speed)
    truth = detected[:, observed:]
    offset = torch.zeros_like(truth)
    offset[..., 1] = 0.2  # 0.2 off in y
    samples = torch.stack([truth, truth + offset, truth - offset])  # (N=3, B, H, K, 3)
    errors = horizon_errors(OpenLoop(detected, samples, torch.arange(2)), observed)
    np.testing.assert_allclose(errors.single, 0.0, atol=1e-6)  # the first sample is the truth
    np.testing.assert_allclose(errors.best_of_n, 0.0, atol=1e-6)
    np.testing.assert_allclose(errors.mean_of_n, 0.0, atol=1e-6)  # +0.2 and -0.2 cancel
    np.testing.assert_allclose(errors.hold_last, speed * np.arange(1, horizon + 1), rtol=1e-5)
    np.testing.assert_allclose(errors.constant_velocity, 0.0, atol=1e-6)  # the motion is constant velocity
    assert errors.ratio_to_hold_last("single") == pytest.approx(0.0, abs=1e-5)
    assert (errors.num_windows, errors.num_samples) == (2, 3)

    shifted = torch.stack([truth + offset, truth, truth - offset])
    worse = horizon_errors(OpenLoop(detected, shifted, torch.arange(2)), observed)
    np.testing.assert_allclose(worse.single, 0.2, rtol=1e-5)  # now the first sample is 0.2 off
    np.testing.assert_allclose(worse.best_of_n, 0.0, atol=1e-6)


def make_split(keypoints: torch.Tensor, lengths: list[int], task_ids: list[int]) -> KeypointSplit:
    starts = torch.tensor([0, *np.cumsum(lengths)[:-1].tolist()])
    return KeypointSplit(keypoints, torch.zeros(len(keypoints), 6), starts, torch.tensor(lengths), torch.tensor(task_ids))


def test_probe_per_task_lines_up_frames_and_predicted_steps() -> None:
    """Task 1's state is a linear function of its keypoints; task 0's rows must not be used for it."""
    generator = torch.Generator().manual_seed(1)
    train_points, test_points = torch.randn(60, 4, 3, generator=generator), torch.randn(40, 4, 3, generator=generator)
    mixing = torch.randn(12, 2, generator=generator)
    train = make_split(train_points, [30, 30], [0, 1])
    test = make_split(test_points, [20, 20], [0, 1])
    train_states = train_points[30:].flatten(1) @ mixing  # task 1's frames only, in order
    test_states = test_points[20:].flatten(1) @ mixing
    starts = choose_window_starts(test, 6, 100, seed=0)
    window_rows = starts[:, None] + torch.arange(6)
    samples = test_points[window_rows][None, :, 3:]  # perfect predictions of the last 3 frames: (1, B, 3, K, 3)
    result = OpenLoop(test_points[window_rows], samples, starts)
    probe = probe_task(train, test, 1, train_states, test_states, result, num_observed=3)
    assert probe.detected_r2 > 0.99 and probe.predicted_r2 > 0.99
    wrong = probe_task(train, test, 1, train_states, test_states.flip(0), result, num_observed=3)
    assert wrong.detected_r2 < 0.5
    with pytest.raises(ValueError, match="line up"):
        probe_task(train, test, 0, train_states[:10], test_states, None)


def test_window_starts_stay_inside_episodes_and_follow_the_seed() -> None:
    split = make_split(torch.zeros(25, 2, 3), [10, 15], [0, 0])
    starts = choose_window_starts(split, 8, 100, seed=0)
    assert sorted(starts.tolist()) == [0, 1, 2, 10, 11, 12, 13, 14, 15, 16, 17]
    assert torch.equal(choose_window_starts(split, 8, 4, seed=3), choose_window_starts(split, 8, 4, seed=3))
    with pytest.raises(ValueError, match="shorter horizon"):
        choose_window_starts(split, 16, 4, seed=0)


def test_script_on_a_smoke_run(smoke_run: Path, tmp_path: Path) -> None:
    from downstream.dynamics import Args, main

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    out = tmp_path / "out"
    records = main(Args(run=(run,), out=out, observed=4, horizon=4, samples=3, windows=16, device="cpu", probe_mlp_steps=20))
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][0]["per_horizon"] == records[0]["per_horizon"]
    assert len(records[0]["per_horizon"]["single"]) == 4 and records[0]["num_samples"] == 3
    assert set(records[0]["probe_r2"]) == {"acrobot", "cartpole", "cheetah", "reacher", "walker-stand", "walker-walk"}
    assert set(records[0]["probe_r2_mlp"]) == set(records[0]["probe_r2"])
    cartpole = records[0]["probe_r2_mlp"]["cartpole"]
    assert len(cartpole["detected_r2_per_dim"]) == 5  # cart position, pole cos and sin, two velocities
    assert cartpole["detected_r2"] == pytest.approx(np.nanmean(cartpole["detected_r2_per_dim"]))
    text = (out / "results.md").read_text()
    assert (out / "horizons.png").stat().st_size > 0 and "hold-last" in text and "MLP probe" in text
    again = main(Args(run=(run,), out=tmp_path / "again", observed=4, horizon=4, samples=3, windows=16, device="cpu",
                      probe_mlp=False))
    assert again[0]["per_horizon"] == records[0]["per_horizon"]  # seeded


def test_probe_of_a_run_on_a_subset_of_the_tasks(tiny_dataset: Path, tmp_path: Path) -> None:
    """The cache's task ids are the global ones: a run on cartpole and walker-walk alone probes each task
    on its own frames (positions 0 and 1 in the run's task list would name acrobot and cartpole)."""
    import os
    import subprocess
    import sys

    from downstream.dynamics import Args, main

    run = tmp_path / "run"
    command = [sys.executable, "train/world_model.py", "--profile", "smoke", "--data", str(tiny_dataset), "--out", str(run),
               "--device", "cpu", "--tasks", "cartpole,walker-walk"]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = main(Args(run=(run,), out=tmp_path / "out", observed=4, horizon=4, samples=2, windows=8, device="cpu", probe_mlp=False))
    assert set(records[0]["probe_r2"]) == {"cartpole", "walker-walk"}
    assert all(np.isfinite(probe["detected_r2"]) for probe in records[0]["probe_r2"].values())


def test_script_on_another_dataset_detects_its_keypoints(
    smoke_run: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--data (a validation set): the keypoints are detected with the run's detector, so --data of the run's own
    dataset gives the run's own numbers; a folder without the run's tasks is refused in one line."""
    from downstream.dynamics import Args, main
    from worldmodel import heap

    options = dict(run=(smoke_run,), observed=4, horizon=4, samples=2, windows=8, device="cpu", probe_mlp=False)
    own = main(Args(out=tmp_path / "own", **options))[0]
    if heap.glibc() is not None:  # the default, said before anything is detected
        assert "heap: freed memory kept in the process (glibc" in capsys.readouterr().err
    detected = main(Args(out=tmp_path / "detected", data=tiny_dataset, **options))[0]
    for name, values in own["per_horizon"].items():
        assert detected["per_horizon"][name] == pytest.approx(values, rel=1e-4), name
    for task, probe in own["probe_r2"].items():
        for name, value in probe.items():
            assert detected["probe_r2"][task][name] == pytest.approx(value, rel=1e-3, nan_ok=True), (task, name)
    assert f"test split of {tiny_dataset}" in (tmp_path / "detected" / "results.md").read_text()
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_dataset / "cheetah_test.h5", partial)
    with pytest.raises(InputError, match="--data .*run's tasks"):
        main(Args(out=tmp_path / "partial_out", data=partial, **options))


def test_script_refuses_a_run_without_a_keypoint_cache(smoke_run: Path, tmp_path: Path) -> None:
    from downstream.dynamics import Args, main

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "keypoints.pt").unlink()
    with pytest.raises(InputError, match="staged run"):
        main(Args(run=(run,), out=tmp_path / "out", device="cpu"))

def test_benchmark_record_reports_stability_only_for_keypoints() -> None:
    """The JSON record of the trainer and downstream/dynamics.py: the horizon table's numbers, and the
    detector's stability and jump-free ratios only when the windows' keypoint split is given (not for the
    cnn-vrnn's features or the state-space bound's states)."""
    observed, horizon = 4, 3
    detected = moving_keypoints(2, observed + horizon, 5, 0.1)
    samples = detected[None, :, observed:].repeat(3, 1, 1, 1, 1)
    result = OpenLoop(detected, samples, torch.tensor([0, 7]))
    split = make_split(detected.flatten(0, 1), [7, 7], [0, 0])
    record = benchmark_record(result, observed, split)
    assert record["per_horizon"]["hold_last"] == pytest.approx([0.1, 0.2, 0.3], rel=1e-5)
    assert record["mean_distance"]["hold_last"] == pytest.approx(0.2, rel=1e-5)
    assert record["ratio_to_hold_last"]["single"] == pytest.approx(0.0, abs=1e-5)
    assert (record["num_windows"], record["num_samples"]) == (2, 3)
    assert record["stability"]["jump_rate"] == 0.0 and record["stability"]["mean_step"] == pytest.approx(0.1)
    assert record["jump_free_ratio_to_hold_last"]["tracks_kept"] == 1.0
    json.dumps(record)  # plain JSON
    features = benchmark_record(result, observed, None)
    assert features["stability"] is None and features["jump_free_ratio_to_hold_last"] is None
    assert features["per_horizon"] == record["per_horizon"]


def test_keypoint_stability_known_answer() -> None:
    """Two episodes of 3 frames, 2 keypoints: keypoint 0 moves 0.1 then jumps 0.5 in episode 0; everything
    else stands still. The jump from episode 0's last frame to episode 1's first is not a move."""
    points = torch.zeros(6, 2, 3)
    points[1, 0, 0] = 0.1  # 0.1 move
    points[2, 0, :2] = torch.tensor([0.1, 0.5])  # 0.5 move (a jump)
    points[3:, :, :2] = 0.9  # episode 1: far away, still
    points[:, :, 2] = torch.arange(6.0)[:, None]  # presence changes: not a move
    stability = keypoint_stability(make_split(points, [3, 3], [0, 0]))
    # 4 one-frame moves per episode pair x 2 keypoints = 8 moves: 0.1, 0.5 and six zeros.
    assert stability.mean_step == pytest.approx(0.6 / 8)
    assert stability.median_step == pytest.approx(0.0)
    assert stability.jump_rate == pytest.approx(1 / 8)
    assert stability.jump_share == pytest.approx(0.5 / 0.6)
    assert stability.still_rate == pytest.approx(6 / 8)


def test_still_rate_counts_moves_below_the_still_threshold() -> None:
    """One keypoint over 4 frames: moves 0.0005 (still), 0.002 (not still), 0 (still)."""
    points = torch.zeros(4, 1, 3)
    points[:, 0, 0] = torch.tensor([0.0, 0.0005, 0.0025, 0.0025])
    assert keypoint_stability(make_split(points, [4], [0])).still_rate == pytest.approx(2 / 3)


def test_jump_free_ratios_leave_out_jumping_tracks() -> None:
    """Keypoint 0 moves 0.1 per frame (no jump); keypoint 1 jumps 0.5 after the last observed frame.
    Sample 0 predicts keypoint 0 exactly, sample 1 holds it still: only keypoint 0's track counts."""
    detected = torch.zeros(1, 4, 2, 3)  # (B, n + H, K, 3) with n = 2 observed, H = 2
    detected[0, :, 0, 0] = torch.tensor([0.0, 0.1, 0.2, 0.3])
    detected[0, 2:, 1, 1] = 0.5
    samples = torch.zeros(2, 1, 2, 2, 3)  # (N, B, H, K, 3)
    samples[0, 0, :, 0, 0] = torch.tensor([0.2, 0.3])  # exact on keypoint 0
    samples[1, 0, :, 0, 0] = 0.1  # holds keypoint 0 still
    samples[:, 0, :, 1, 1] = -3.0  # far off on the jumping keypoint: must not count
    ratios = jump_free_ratios(OpenLoop(detected, samples, torch.zeros(1, dtype=torch.int64)), num_observed=2)
    assert ratios["single"] == pytest.approx(0.0)
    assert ratios["mean_of_n"] == pytest.approx(0.5)  # half way: errors 0.05 and 0.1 against 0.1 and 0.2
    assert ratios["best_of_n"] == pytest.approx(0.0)
    assert ratios["tracks_kept"] == pytest.approx(0.5)
    # hold-last's summed distance: keypoint 0 0.1 + 0.2, keypoint 1 (the jump) 0.5 + 0.5; exact on the steady
    # track and holding the jumping one still leaves 1.0 of 1.3
    assert ratios["jump_floor"] == pytest.approx(1.0 / 1.3)
