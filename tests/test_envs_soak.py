"""The imagination vector env under hostile actions (tests/bench/soak_imagine.py, short): 256 sub-envs, random
and extreme actions, NaN/inf batches refused, episodes ending and restarting: every observation and reward
finite. The long run (1e6 sub-env steps, memory) is the script's default; see its docstring."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SOAK = REPO_ROOT / "tests" / "bench" / "soak_imagine.py"


def test_256_sub_envs_stay_finite_under_extreme_and_nan_actions(imagination_run: Path) -> None:
    command = [sys.executable, str(SOAK), "--checkpoint", str(imagination_run), "--task", "cheetah",
               "--num-envs", "256", "--steps", str(256 * 50), "--horizon", "20", "--hostile-every", "5"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "12800 sub-env steps" in result.stdout
    assert "non-finite values: 0" in result.stdout
    assert "offered: 10, accepted or changing the state: 0" in result.stdout


def test_soak_script_refuses_a_missing_checkpoint_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SOAK), "--checkpoint", str(tmp_path / "none")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and "no world-model checkpoint" in error[0]
