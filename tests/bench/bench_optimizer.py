"""The trainer's fused Adam against Adam one parameter at a time, side by side (a script that prints figures).

    OMP_NUM_THREADS=2 python tests/bench/bench_optimizer.py [--data data/dmcs] [--steps 6] [--threads 2]

``worldmodel.training.make_optimizer`` updates all of a stage's parameters in one fused kernel on CPU and GPU.
This times whole training steps of the ``cpu`` profile (forward, backward, clipping, Adam) with that optimizer
and with PyTorch's default CPU Adam (a handful of operations per parameter tensor), in turns on the same batch,
best of ``--steps`` each: the vision stage in the precision the trainer picks here and in fp32 (what a CPU without
native bf16 runs), and the dynamics stage of every core. Prints the CPU it ran on and the ratio per line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train (which puts the repository first)

import torch  # noqa: E402

from bench_train import build, interleaved_seconds, real_or_random_batch  # noqa: E402
from worldmodel import train_config  # noqa: E402
from worldmodel.config import DYNAMICS  # noqa: E402
from worldmodel.precision import choose_compute, cpu_info  # noqa: E402

Step = Callable[[], None]


def fused_against_per_tensor(name: str, build_step: Callable[[bool | None], Step],
                             repeats: int) -> tuple[float, float]:
    """Seconds per step (best of ``repeats``, timed in turns) of the trainer's optimizer and of the per-tensor Adam;
    ``build_step(fused)`` makes the step with ``make_optimizer``'s ``fused``."""
    steps = {f"{name}, fused": build_step(None), f"{name}, per tensor": build_step(False)}
    fused, per_tensor = interleaved_seconds(steps, repeats).values()
    return fused, per_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/dmcs"), help="real frames if it has them, else random")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (the best is reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = cpu_info()
    print(f"CPU: {info.name} ({info.capability}, native bf16: {'yes' if info.native_bf16 else 'no'}); "
          f"torch {torch.__version__}, {args.threads} threads")
    config = train_config.profile_config("cpu")
    auto = choose_compute("cpu", dynamics_precision="auto", dynamics_width=config.model_config.dynamics_width)
    vision = train_config.Stage.VISION
    frames, _, source = real_or_random_batch(args.data, config, config.vision_batch_size, config.vision_window)
    print(f"vision batch: {config.vision_batch_size} x {config.vision_window} frames, {source}")
    rows: list[tuple[str, float]] = []
    for precision, channels_last in dict.fromkeys([(auto.precision, auto.channels_last), ("fp32", True)]):
        def vision_step(fused: bool | None, precision: str = precision, layout: bool = channels_last) -> Step:
            step = build(config, vision, precision, layout, fused_adam=fused)[1]
            return lambda: step(frames)

        fused_s, plain_s = fused_against_per_tensor(f"vision {precision}", vision_step, args.steps)
        count = frames.shape[0] * frames.shape[1]
        label = f"vision stage, {precision}: {count / plain_s:.0f} -> {count / fused_s:.0f} frames/s"
        rows.append((label, plain_s / fused_s))
    keypoints = torch.rand(config.batch_size, config.window, config.model_config.num_keypoints, 3) * 2 - 1
    moves = torch.rand(config.batch_size, config.window, config.model_config.action_dim) * 2 - 1
    for core in DYNAMICS:
        chosen = dataclasses.replace(config, dynamics=core)

        def dynamics_step(fused: bool | None, chosen: train_config.TrainConfig = chosen) -> Step:
            step = build(chosen, train_config.Stage.DYNAMICS, auto.precision, auto.channels_last, auto.dynamics,
                         fused_adam=fused)[1]
            return lambda: step(keypoints, moves)

        fused_s, plain_s = fused_against_per_tensor(core, dynamics_step, 5 * args.steps)
        rows.append((f"dynamics stage, {core} ({auto.dynamics}): {1 / plain_s:.1f} -> {1 / fused_s:.1f} steps/s",
                     plain_s / fused_s))
    print("Adam one parameter tensor at a time -> fused (the trainer's), best of the turns:")
    for label, ratio in rows:
        print(f"  {label:60s} {ratio:.2f}x")


if __name__ == "__main__":
    main()
