"""downstream/action_ranking.py: rank correlation by hand, real returns that replay the recorded episode in
dm_control, imagined returns on the reward experiment's alignment, and the script on the smoke world model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from downstream import action_ranking
from envs.simulator import Simulator
from worldmodel import storage
from worldmodel.config import OBSERVED_STEPS
from worldmodel.hidden_states import observe_then_imagine

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = "cartpole"
HORIZON = 12


def test_rank_correlation_known_answers() -> None:
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert action_ranking.rank_correlation(a, a * 10 + 3) == pytest.approx(1.0)  # same order, other scale
    assert action_ranking.rank_correlation(a, -a) == pytest.approx(-1.0)
    # ranks (0, 2, 1, 3) against (0, 1, 2, 3): d^2 = 0 + 1 + 1 + 0 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert action_ranking.rank_correlation(a, np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.8)
    assert np.isnan(action_ranking.rank_correlation(a, np.ones(4)))  # a constant return ranks nothing
    # ties share their mean rank: (0, 1.5, 1.5, 3) against (0, 1, 2, 3) gives Pearson's of those ranks
    assert action_ranking.rank_correlation(np.array([1.0, 2.0, 2.0, 5.0]), a[[0, 2, 1, 3]]) == pytest.approx(
        np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    )


def test_first_sequence_holds_still_the_others_are_uniform() -> None:
    sequences = action_ranking.action_sequences(np.random.default_rng(0), 5, HORIZON, 2)
    assert sequences.shape == (5, HORIZON, 2) and sequences.dtype == np.float32
    assert (sequences[0] == 0).all() and (np.abs(sequences[1:]) <= 1).all() and sequences[1:].std() > 0.4


def recorded_episode(tiny_dataset: Path) -> dict[str, np.ndarray]:
    with h5py.File(storage.dataset_path(tiny_dataset, TASK, "test")) as file:
        return {name: file[name][0] for name in ("frames", "states", "actions", "rewards", "episode_seeds")}


def test_real_returns_replay_the_recorded_episode(tiny_dataset: Path) -> None:
    """The recorded continuation, played after the recorded warm-up, earns the recorded rewards; zeros earn other."""
    episode = recorded_episode(tiny_dataset)
    warmup = episode["actions"][: OBSERVED_STEPS - 1]
    recorded = episode["actions"][OBSERVED_STEPS - 1 : OBSERVED_STEPS - 1 + HORIZON]
    simulator = Simulator(TASK)
    returns = action_ranking.real_returns(simulator, int(episode["episode_seeds"]), warmup,
                                          np.stack([recorded, np.zeros_like(recorded)]))  # fmt: skip
    simulator.close()
    expected = episode["rewards"][OBSERVED_STEPS - 1 : OBSERVED_STEPS - 1 + HORIZON].sum()
    assert returns[0] == pytest.approx(float(expected), abs=1e-4)
    assert returns[1] != pytest.approx(returns[0], abs=1e-3)


def test_imagined_returns_read_rewards_as_the_reward_experiment(imagination_run: Path, tiny_dataset: Path) -> None:
    """Under the recorded actions, the imagined return is the reward predictor's output on the reward
    experiment's window (observe_then_imagine) over its predicted frames: the step into frame t is read from
    the state that predicts frame t."""
    from envs.imagination_models import load_imagination_models

    models = load_imagination_models(TASK, imagination_run, device="cpu")
    model, predictor = models.world_model, models.reward_predictor
    episode = recorded_episode(tiny_dataset)
    frames, states = episode["frames"][:OBSERVED_STEPS], episode["states"][:OBSERVED_STEPS]
    warmup = episode["actions"][: OBSERVED_STEPS - 1]
    recorded = episode["actions"][OBSERVED_STEPS - 1 : OBSERVED_STEPS - 1 + HORIZON]
    torch.manual_seed(3)
    imagined = action_ranking.imagined_returns(model, predictor, frames, states, warmup, recorded[None])

    window = np.zeros((1, OBSERVED_STEPS + HORIZON, 6), np.float32)
    window[0, : OBSERVED_STEPS + HORIZON - 1, : warmup.shape[1]] = episode["actions"][: OBSERVED_STEPS + HORIZON - 1]
    torch.manual_seed(3)
    with torch.no_grad():
        hidden = observe_then_imagine(model, torch.from_numpy(frames)[None], torch.from_numpy(window), OBSERVED_STEPS,
                                      torch.from_numpy(states)[None])  # fmt: skip
        expected = predictor(hidden)[0][:, OBSERVED_STEPS:].sum(1)
    assert imagined.shape == (1,) and imagined[0] == pytest.approx(float(expected[0]), rel=1e-5, abs=1e-5)
    # Other actions, another imagined future.
    assert action_ranking.imagined_returns(model, predictor, frames, states, warmup, -recorded[None])[0] != imagined[0]


def run_script(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO_ROOT / "downstream" / "action_ranking.py"), *options],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_script_writes_its_figures_and_repeats_them_under_a_seed(
    imagination_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    options = ["--run", str(imagination_run), "--task", TASK, "--data", str(tiny_dataset), "--sequences", "4"]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    for out in (first, second):
        result = run_script(*options, "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(first.read_text())
    assert record == json.loads(second.read_text())
    assert record["contexts"] == 1 and record["sequences"] == 4 and len(record["rank_correlations"]) == 1
    assert record["gain_of_best"] >= record["gain_of_models_pick"] and record["gain_of_best"] >= 0
    assert not (imagination_run / action_ranking.RESULTS_DIR).exists()  # --out was given


@pytest.mark.parametrize(
    ("options", "phrase"),
    [(["--sequences", "1"], "--sequences"), (["--task", "pong"], "pong"), (["--horizon", "40"], "--horizon")],
)
def test_bad_options_end_in_one_line(imagination_run: Path, options: list[str], phrase: str) -> None:
    result = run_script("--run", str(imagination_run), *options)
    assert result.returncode != 0 and "Traceback" not in result.stderr and phrase in result.stderr, result.stderr
