"""Soak check of the imagination vector env: many sub-env steps under hostile actions stay finite in constant memory.

    python tests/bench/soak_imagine.py --checkpoint runs/world_model                 # 1e6 sub-env steps
    python tests/bench/soak_imagine.py --checkpoint /tmp/run --task cartpole --steps 12800

``--num-envs`` sub-envs of ``ImaginedVectorEnv`` (one batch, automatic resets over the task's horizon) are
stepped until ``--steps`` sub-env steps are done. Every batch of actions mixes rows of uniform random actions
in [-1, 1] with extreme finite rows (+-1e6, +-3e38, tiny denormals), which the env clips to [-1, 1]. Every
``--hostile-every``-th step also offers a batch with NaN, +inf and -inf rows: the env must refuse it with
ValueError (as the real task does) and leave every sub-env as it was.

Prints the resident memory (RSS) at the start, after the warm-up (the first ``--warmup`` of the steps: torch's
allocator and the context caches fill there) and at the end, sub-env steps per second and the number of
non-finite values seen in observations and rewards. Exits 1 if any value was non-finite, a hostile batch was
accepted or changed the state, or RSS grew by more than ``--max-rss-growth-mb`` after the warm-up; 2 on bad
input (one line); 0 otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import tyro  # noqa: E402

from envs.imagined_vector import ImaginedVectorEnv  # noqa: E402
from worldmodel.checkpoint import CheckpointError  # noqa: E402
from worldmodel.reward import RewardPredictorMismatch  # noqa: E402

EXTREME_VALUES = np.array([1e6, -1e6, 3e38, -3e38, 1e-45, -1e-45], dtype=np.float32)
HOSTILE_VALUES = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)


@dataclass(frozen=True)
class Args:
    checkpoint: Path = Path("runs/world_model")
    """World-model run directory (or checkpoint file) with a reward predictor for --task (downstream/reward.py)."""
    task: str = "cheetah"
    """Task of the imagined episodes."""
    num_envs: int = 256
    """Sub-envs stepped as one batch."""
    steps: int = 1_000_000
    """Sub-env steps in total (batch steps x --num-envs)."""
    horizon: int | None = None
    """Imagined steps per episode; None: the task's own horizon (1000 control steps / action repeat)."""
    extreme_fraction: float = 0.25
    """Share of the rows of every action batch filled with extreme finite values; the rest is uniform in [-1, 1]."""
    hostile_every: int = 10
    """Offer a batch with NaN and +-inf rows every this many steps (0: never)."""
    warmup: float = 0.1
    """Share of the steps after which RSS is taken as the reference of constant memory."""
    max_rss_growth_mb: float = 64.0
    """Fail if RSS grows by more than this after the warm-up."""
    seed: int = 0
    """Seeds the sub-envs and the actions."""
    device: str = "cpu"
    """Device of the world model."""


class SoakResult(NamedTuple):
    sub_env_steps: int
    seconds: float
    rss_start_mb: float
    rss_warm_mb: float
    rss_end_mb: float
    non_finite: int  # non-finite values in observations and rewards
    hostile_offered: int
    hostile_failures: int  # hostile batches accepted, or that changed the sub-envs


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux)."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def action_batch(rng: np.random.Generator, shape: tuple[int, int], extreme_fraction: float) -> np.ndarray:
    """Uniform random rows, and extreme finite values in a random ``extreme_fraction`` of the rows."""
    actions = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    extreme = rng.random(shape[0]) < extreme_fraction
    actions[extreme] = rng.choice(EXTREME_VALUES, (int(extreme.sum()), shape[1]))
    return actions


def soak(args: Args) -> SoakResult:
    env = ImaginedVectorEnv(args.task, args.num_envs, checkpoint=args.checkpoint, horizon=args.horizon,
                            device=args.device)  # fmt: skip
    rng = np.random.default_rng(args.seed)
    observations, _ = env.reset(seed=args.seed)
    shape = env.action_space.shape
    assert shape is not None and len(shape) == 2
    batch_steps = -(-args.steps // args.num_envs)
    warm_at = max(1, int(batch_steps * args.warmup))
    rss_start = rss_warm = rss_mb()
    non_finite = int(np.count_nonzero(~np.isfinite(observations)))
    hostile_offered = hostile_failures = 0
    started = time.perf_counter()
    for step in range(batch_steps):
        if step == warm_at:
            rss_warm = rss_mb()
        if args.hostile_every and step % args.hostile_every == args.hostile_every - 1:
            hostile = action_batch(rng, shape, args.extreme_fraction)
            rows = rng.random(shape[0]) < 0.5
            rows[rng.integers(shape[0])] = True
            hostile[rows, rng.integers(shape[1])] = rng.choice(HOSTILE_VALUES, int(rows.sum()))
            before = env.batch.observations()
            hostile_offered += 1
            try:
                env.step(hostile)
                hostile_failures += 1  # accepted: it should have been refused
            except ValueError:
                pass
            if not np.array_equal(env.batch.observations(), before):
                hostile_failures += 1
        observations, rewards, _, _, _ = env.step(action_batch(rng, shape, args.extreme_fraction))
        non_finite += int(np.count_nonzero(~np.isfinite(observations)) + np.count_nonzero(~np.isfinite(rewards)))
    seconds = time.perf_counter() - started
    env.close()
    return SoakResult(batch_steps * args.num_envs, seconds, rss_start, rss_warm, rss_mb(), non_finite,
                      hostile_offered, hostile_failures)  # fmt: skip


def main(args: Args) -> int:
    for name in ("num_envs", "steps"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        result = soak(args)
    except (CheckpointError, FileNotFoundError, RewardPredictorMismatch, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    growth = result.rss_end_mb - result.rss_warm_mb
    print(f"{args.task}: {result.sub_env_steps} sub-env steps ({args.num_envs} sub-envs) in {result.seconds:.1f} s, "
          f"{result.sub_env_steps / result.seconds:.0f} sub-env steps/s")
    print(f"RSS start {result.rss_start_mb:.1f} MiB, after warm-up {result.rss_warm_mb:.1f} MiB, "
          f"end {result.rss_end_mb:.1f} MiB (growth after warm-up {growth:+.1f} MiB, limit {args.max_rss_growth_mb})")
    print(f"non-finite values: {result.non_finite}")
    print(f"hostile (NaN/inf) batches offered: {result.hostile_offered}, accepted or changing the state: "
          f"{result.hostile_failures}")
    failed = result.non_finite > 0 or result.hostile_failures > 0 or growth > args.max_rss_growth_mb
    print("FAILED" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args, description=(__doc__ or "").split("\n\n")[0])))
