"""Per-episode breakdown of the reward experiment's error: hand-computed answers, and the script on a hand-made
experiment folder whose fit it must reproduce."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from downstream.reward_episodes import Args, main
from worldmodel.errors import InputError
from worldmodel.hidden_states import WindowFeatures, save_features
from worldmodel.reward import RewardTrainConfig, episode_folds
from worldmodel.reward_experiment import features_path, fits_directory, result_path
from worldmodel.reward_jobs import FitJob, run_fit_job
from worldmodel.reward_report import episode_errors, summarize

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_episode_shares_and_the_fold_without_each_episode_by_hand() -> None:
    # 3 windows of 3 frames, 1 observed: the predicted frames are 1 and 2. Null model predicts 0.
    predicted = np.array([[9.0, 1.0, 0.0], [9.0, 0.0, 2.0], [9.0, 0.0, 0.0]])
    targets = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    episodes = np.array([7, 7, 5])
    figure, rows = episode_errors(predicted, targets, 0.0, episodes, num_observed=1)
    # squared errors per window: 1 + 1 = 2, 0 + 4 = 4, 1 + 1 = 2 (total 8); null: 1, 0, 2 (total 3)
    assert figure == pytest.approx(8 / 3)
    assert [row.episode for row in rows] == [7, 5]  # largest share first
    assert rows[0].windows == 2 and rows[0].share == pytest.approx(6 / 8)
    assert rows[0].fold_without == pytest.approx(2 / 2)  # episode 5 alone: 2 / 2
    assert rows[1].fold_without == pytest.approx(6 / 1)  # episode 7 alone: 6 / 1
    assert rows[0].max_reward == 1.0 and rows[0].max_predicted == 2.0  # frame 0 (9.0) is not a predicted frame
    assert sum(row.share for row in rows) == pytest.approx(1.0)


def write_experiment(out: Path, windows: int = 3000, length: int = 20) -> tuple[np.ndarray, RewardTrainConfig, int]:
    """A reward experiment's results.json and cache: rewards follow the inputs, except in one test episode of
    fold 1, whose predicted frames show the opposite of what happens (as a false imagined swing-up). -> the
    windows' episodes, the experiment's fit settings and that episode."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(windows, length, 8, generator=generator)
    rewards = torch.sigmoid(torch.roll(hidden, shifts=-1, dims=1)[..., 0])  # rewards[t] read from hidden[t + 1]
    episodes = np.arange(windows) // 30
    misled = int(episodes[episode_folds(episodes, 5, 0)[1][1][0]])
    hidden[torch.from_numpy(episodes == misled), 8:, 0] *= -1
    features = WindowFeatures(hidden.half().float(), rewards, torch.zeros(windows, length, 6),
                              torch.zeros(windows, length, 2), episodes)  # fmt: skip
    save_features(features_path(out, "a" * 64, 0, windows, "cartpole"), features)
    meta = {"args": {"seed": 0, "sequences": windows, "folds": 5, "folds_run": 2, "epochs": 10, "controls": False},
            "runs": {"struct-vrnn": {"fingerprint": "a" * 64}}, "state_bound": None, "num_observed": 8}  # fmt: skip
    (out / "results.json").write_text(json.dumps({"meta": meta, "tasks": {}}))
    return episodes, RewardTrainConfig(epochs=10, seed=0), misled


def test_refits_reproduce_the_experiments_fit_and_find_the_episode_that_carries_the_error(tmp_path: Path) -> None:
    episodes, config, misled = write_experiment(tmp_path)
    # The experiment's own fit of fold 0, as downstream/reward.py runs it; fold 1 has none on disk.
    train, test = episode_folds(episodes, 5, 0)[0]
    result = result_path(fits_directory(tmp_path, 0, len(episodes), 5, config), "cartpole", "a" * 16, 0)
    cache = features_path(tmp_path, "a" * 64, 0, len(episodes), "cartpole")
    errors = run_fit_job(FitJob("cartpole", "struct-vrnn", cache, "hidden", 0, train, test, result), config)

    record = main(Args(task="cartpole", reward_out=tmp_path, top=3))
    folds = record["inputs"]["struct-vrnn"]
    assert sorted(folds) == [0, 1]  # every fold the experiment ran
    assert folds[0]["reproduced"] and folds[0]["figure"] == pytest.approx(folds[0]["experiment"], rel=1e-4)
    assert folds[0]["figure"] == pytest.approx(summarize(errors[None], 8).predicted_mean, rel=1e-4)
    assert folds[1]["experiment"] is None and not folds[1]["reproduced"]
    assert folds[0]["figure"] < 0.1  # the predictor learned the rewards
    worst = folds[1]["episodes"][0]
    assert worst["episode"] == misled and worst["share"] > 0.6
    assert worst["fold_without"] < folds[1]["figure"] / 2
    assert 0 < worst["max_reward"] < 1 and 0 < worst["max_predicted"] < 1  # sigmoid rewards
    assert len(folds[1]["episodes"]) == 3  # --top
    shares = [row["share"] for row in folds[1]["episodes"]]
    assert shares == sorted(shares, reverse=True)
    saved = json.loads((tmp_path / "episodes-cartpole.json").read_text())
    assert saved["inputs"]["struct-vrnn"]["0"]["figure"] == pytest.approx(folds[0]["figure"])
    assert "| struct-vrnn | 0 |" in (tmp_path / "episodes-cartpole.md").read_text()


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="run the reward experiment first"):
        main(Args(task="cartpole", reward_out=tmp_path))
    write_experiment(tmp_path, windows=300)
    with pytest.raises(InputError, match="no cached hidden states of struct-vrnn for cheetah"):
        main(Args(task="cheetah", reward_out=tmp_path))
    assert list(main(Args(task="cartpole", reward_out=tmp_path, folds="1"))["inputs"]["struct-vrnn"]) == [1]
    with pytest.raises(InputError, match="--folds: 4 not in the experiment"):
        main(Args(task="cartpole", reward_out=tmp_path, folds="4"))
    with pytest.raises(InputError, match="--folds: 'one'"):
        main(Args(task="cartpole", reward_out=tmp_path, folds="one"))
    with pytest.raises(InputError, match="--inputs: cnn-vrnn not in the experiment"):
        main(Args(task="cartpole", reward_out=tmp_path, inputs="cnn-vrnn"))
    missing = str(tmp_path / "none")  # no experiment there
    command = [sys.executable, "downstream/reward_episodes.py", "--task", "cartpole", "--reward-out", missing]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "run the reward experiment first" in result.stderr
