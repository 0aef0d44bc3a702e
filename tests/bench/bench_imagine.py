"""Imagined steps per second against the real task: one env, the vector env, and StructVRNN-Real-<task>.

    python tests/bench/bench_imagine.py                        # runs/world_model if it exists
    python tests/bench/bench_imagine.py --checkpoint runs/cpu --task walker-walk --num-envs 256

Prints, in one run on one machine:
- real: ``StructVRNN-Real-<task>`` steps/s (dm_control physics + 64x64 rendering), random actions;
- one imagined env (``gym.make``) steps/s, and what a reset costs;
- the vector env (``gym.make_vec``, ``--num-envs`` sub-envs as one batch) sub-env steps/s, steady
  state and over whole episodes including the automatic resets, at 1 and 2 torch threads;
- the ratio vector / real (target >= 200x).

Which model: ``--checkpoint`` (default ``runs/world_model``); if there is none, a model of the ``cpu``
profile's sizes with untrained weights (speed depends on the sizes, not on the weights) and an untrained
reward predictor, on ``--data`` or, failing that, a small dataset collected for the task here. The
output says which. Without a staged run's keypoint cache, contexts are detected per window and cached,
so the reset figures are given cold (first use of a window) and warm.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

import envs  # noqa: E402, F401  (registers the ids)
from envs.imagination_models import REWARD_PREDICTOR_DIR, load_imagination_models
from worldmodel.checkpoint import CheckpointError, find_checkpoint, load_world_model, save_checkpoint  # noqa: E402
from worldmodel.config import ModelConfig  # noqa: E402
from worldmodel.fingerprint import model_fingerprint  # noqa: E402
from worldmodel.model import WorldModel  # noqa: E402
from worldmodel.reward import RewardPredictor, save_reward_predictor  # noqa: E402
from worldmodel.storage import dataset_path  # noqa: E402
from worldmodel.tasks import TASKS, get_task  # noqa: E402


@dataclass(frozen=True)
class Args:
    task: str = "cheetah"
    """Task to measure."""
    checkpoint: Path = Path("runs/world_model")
    """World-model run directory or checkpoint; if missing, an untrained model of the cpu profile's sizes."""
    data: Path = Path("data/dmcs")
    """Dataset for the contexts when the checkpoint's own is missing; collected here (small) if absent."""
    num_envs: int = 256
    """Sub-envs of the vector env."""
    seconds: float = 10.0
    """Time spent measuring each of the single and real envs."""
    episodes: int = 2
    """Whole episodes of the vector env measured (with their automatic resets)."""
    device: str = "cpu"
    """Device of the world model."""
    seed: int = 0
    """Seeds the untrained model (when there is no checkpoint), the env resets and the random actions."""


class Setup(NamedTuple):
    """Where the model, the reward predictor and the data come from, and what to tell about it."""

    checkpoint: Path
    reward_predictor: Path | None  # None: the run's own
    data: Path | None  # None: the dataset recorded in the checkpoint
    description: str


def ensure_data(args: Args, scratch: Path) -> Path:
    if dataset_path(args.data, args.task, "test").is_file():
        return args.data
    out = scratch / "dmcs"
    print(f"no {args.task} test data in {args.data}: collecting 2 test episodes of 60 steps into {out}", flush=True)
    command = [sys.executable, str(REPO_ROOT / "collect" / "dmcs.py"), "--domains", args.task, "--out", str(out),
               "--train-episodes", "1", "--test-episodes", "2", "--episode-steps", "60", "--seed", "0"]
    subprocess.run(command, check=True, capture_output=True)
    return out


def setup(args: Args, scratch: Path) -> Setup:
    try:
        checkpoint = find_checkpoint(args.checkpoint)
    except CheckpointError:
        checkpoint = None
    if checkpoint is not None:
        loaded = load_world_model(checkpoint, "cpu")
        predictor = checkpoint.parent / REWARD_PREDICTOR_DIR / f"{args.task}.pt"
        data = None if Path(str(loaded.info.dataset.get("path"))).is_dir() else ensure_data(args, scratch)
        description = (f"trained model {checkpoint} (profile {loaded.info.train_config.get('profile', '?')}, "
                       f"{loaded.config.variant}, K={loaded.config.num_keypoints}, RNN {loaded.config.rnn_size})")
        if not predictor.is_file():  # speed does not depend on the predictor's weights
            predictor = scratch / f"{args.task}.pt"
            save_reward_predictor(predictor, RewardPredictor(loaded.config.rnn_size), args.task,
                                  model_fingerprint(loaded.model))
            description += "; untrained reward predictor (none fit for it)"
        return Setup(checkpoint, predictor, data, description)

    data = ensure_data(args, scratch)
    config = ModelConfig.cpu()
    torch.manual_seed(args.seed)
    model = WorldModel(config)
    run = scratch / "run"
    repeats = {name: spec.action_repeat for name, spec in TASKS.items()}
    save_checkpoint(run / "checkpoint.pt", model_state=model.state_dict(), model_config=dataclasses.asdict(config),
                    train_config={"profile": "cpu (untrained, for timing)"},
                    dataset={"path": str(data), "tasks": list(TASKS), "action_repeats": repeats, "keypoint_cache": None},
                    stage="done", step=0, global_step=0, optimizer_state=None, complete=True)
    save_reward_predictor(run / REWARD_PREDICTOR_DIR / f"{args.task}.pt", RewardPredictor(config.rnn_size), args.task,
                          model_fingerprint(model))
    description = (f"no checkpoint at {args.checkpoint}: untrained model of the cpu profile's sizes "
                   f"(K={config.num_keypoints}, RNN {config.rnn_size}, z {config.latent_size}), untrained reward predictor")
    return Setup(run, None, None, description)


def real_steps_per_second(task: str, action_repeat: int, seconds: float, seed: int) -> float:
    env = gym.make(f"StructVRNN-Real-{task}", action_repeat=action_repeat)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps += 1
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - started)
    env.close()
    return rate


def env_kwargs(s: Setup, device: str, threads: int) -> dict[str, object]:
    kwargs: dict[str, object] = {"checkpoint": s.checkpoint, "device": device, "threads": threads}
    if s.reward_predictor is not None:
        kwargs["reward_predictor"] = s.reward_predictor
    if s.data is not None:
        kwargs["data"] = s.data
    return kwargs


def single_env(task: str, s: Setup, device: str, threads: int, seconds: float, seed: int) -> tuple[float, float, float]:
    """(steps/s, resets included as they come; cold reset ms; warm reset ms) of one imagined env."""
    env = gym.make(f"StructVRNN-Imagined-{task}", **env_kwargs(s, device, threads)).unwrapped
    started = time.perf_counter()
    env.reset(seed=seed + 12345)  # a window not seen yet: detection (unless a keypoint cache is used)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    env.reset(seed=seed + 12345)  # the same window again: cached
    warm = time.perf_counter() - started
    action = np.zeros(env.action_space.shape, np.float32)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        _, _, _, truncated, _ = env.step(action)
        steps += 1
        if truncated:
            env.reset()
    return steps / (time.perf_counter() - started), cold * 1e3, warm * 1e3


def vector_env(
    task: str, s: Setup, device: str, threads: int, num_envs: int, episodes: int, seed: int
) -> tuple[float, float, float]:
    """(sub-env steps/s steady, sub-env steps/s over whole episodes with autoresets, first reset s)."""
    vector = gym.make_vec(f"StructVRNN-Imagined-{task}", num_envs=num_envs, **env_kwargs(s, device, threads))
    horizon = vector.unwrapped.horizon
    actions = np.random.default_rng(seed).uniform(-1, 1, (64, *vector.action_space.shape)).astype(np.float32)
    started = time.perf_counter()
    vector.reset(seed=seed)
    first_reset = time.perf_counter() - started
    for t in range(20):  # warm up (noise blocks, allocator)
        vector.step(actions[t % 64])
    steady_steps = min(horizon - 21, 200)
    started = time.perf_counter()
    for t in range(steady_steps):
        vector.step(actions[t % 64])
    steady = steady_steps * num_envs / (time.perf_counter() - started)
    vector.reset(seed=seed + 1)
    started = time.perf_counter()
    total = episodes * (horizon + 1)  # + 1: next-step autoreset spends one step on each reset
    for t in range(total):
        vector.step(actions[t % 64])
    whole = episodes * horizon * num_envs / (time.perf_counter() - started)
    vector.close()
    return steady, whole, first_reset


def main(args: Args) -> None:
    get_task(args.task)
    with tempfile.TemporaryDirectory(prefix="bench_imagine_") as scratch_name:
        s = setup(args, Path(scratch_name))
        models = load_imagination_models(args.task, s.checkpoint, s.reward_predictor, args.device)
        print(f"model: {s.description}")
        print(f"task {args.task}, action repeat {models.action_repeat}, device {args.device}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)

        real = real_steps_per_second(args.task, models.action_repeat, args.seconds, args.seed)
        print(f"real StructVRNN-Real-{args.task}:         {real:10.0f} steps/s", flush=True)
        results = {}
        for threads in (1, 2):  # the envs' `threads` argument (torch CPU threads inside their calls)
            single, cold, warm = single_env(args.task, s, args.device, threads, args.seconds, args.seed)
            steady, whole, first_reset = vector_env(args.task, s, args.device, threads, args.num_envs, args.episodes, args.seed)
            results[threads] = whole
            print(f"--- threads={threads}")
            print(f"imagined, 1 env:                  {single:10.0f} steps/s  ({single / real:.0f}x real); "
                  f"reset {cold:.0f} ms cold, {warm:.1f} ms warm")
            print(f"imagined, vector {args.num_envs} sub-envs:     {steady:10.0f} steps/s steady "
                  f"({steady / real:.0f}x real)")
            print(f"  over {args.episodes} whole episodes:        {whole:10.0f} steps/s with autoresets "
                  f"({whole / real:.0f}x real); first reset {first_reset:.1f} s", flush=True)
        best = max(results, key=results.get)  # type: ignore[arg-type]
        print(f"vector / real (whole episodes, threads={best}): {results[best] / real:.0f}x (target >= 200x); "
              f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
