"""downstream/state_probe.py on a reward experiment's folder: known answers from a hand-made hidden-state cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from downstream.state_probe import Args, main
from worldmodel.errors import InputError
from worldmodel.reward_report import STATE_BOUND

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_experiment(out: Path, windows: int = 400, length: int = 20) -> None:
    """A reward experiment's results.json and cache: 'holds' sees the state on frames < 8 and noise after;
    the state-space bound sees it on every frame."""
    rng = np.random.default_rng(0)
    states = rng.normal(size=(windows, length, 3)).astype(np.float32)
    holds = np.concatenate([states[:, :8], rng.normal(size=(windows, length - 8, 3)).astype(np.float32)], 1)
    episodes = np.repeat(np.arange(windows // 20), 20)
    meta = {"args": {"seed": 0, "sequences": windows, "folds": 5, "epochs": 60}, "num_observed": 8,
            "runs": {"struct-vrnn": {"fingerprint": "a" * 64}}, "state_bound": {"fingerprint": "b" * 64}}
    (out / "cache" / f"{'a' * 16}-s0-n{windows}").mkdir(parents=True)
    (out / "cache" / f"{'b' * 16}-s0-n{windows}").mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "tasks": {}}))
    for key, hidden in (("a", holds), ("b", states)):
        np.savez(out / "cache" / f"{key * 16}-s0-n{windows}" / "cartpole.npz", hidden=hidden.astype(np.float16),
                 states=states, episodes=episodes, rewards=np.zeros((windows, length), np.float32))


def test_observed_frames_hold_the_state_and_noise_does_not(tmp_path: Path) -> None:
    write_experiment(tmp_path)
    record = main(Args(reward_out=tmp_path, frames=(7, 8, 19), steps=300))
    struct, bound = record["tasks"]["cartpole"]["struct-vrnn"], record["tasks"]["cartpole"][STATE_BOUND]
    assert len(struct[7]) == 3  # one R^2 per state dimension
    assert min(struct[7]) > 0.9 and max(struct[8]) < 0.1 and max(struct[19]) < 0.1
    assert min(bound[19]) > 0.9
    saved = json.loads((tmp_path / "state_probe.json").read_text())
    assert saved["tasks"]["cartpole"]["struct-vrnn"]["7"] == pytest.approx(struct[7])
    text = (tmp_path / "state_probe.md").read_text()
    assert "frame 7 (observed)" in text and "frame 19 (horizon 12)" in text
    again = main(Args(reward_out=tmp_path, frames=(7,), steps=300))["tasks"]["cartpole"]["struct-vrnn"]
    assert again[7] == struct[7]  # seeded


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="run the reward experiment first"):
        main(Args(reward_out=tmp_path))
    write_experiment(tmp_path)
    with pytest.raises(InputError, match="--frames"):
        main(Args(reward_out=tmp_path, frames=(20,), steps=2))
    with pytest.raises(InputError, match="no cached hidden states"):
        main(Args(reward_out=tmp_path, tasks="cheetah", steps=2))
    result = subprocess.run([sys.executable, "downstream/state_probe.py", "--reward-out", str(tmp_path / "none")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
