"""Dynamics-stage training speed of every core, side by side: forward + backward + Adam step of
``WorldModel.dynamics_losses`` on cached-keypoint-sized batches (default 32 windows of 8 + 8 frames, the
``cpu`` profile's sizes), in steps per second.

    OMP_NUM_THREADS=2 python tests/bench/bench_dynamics.py [--threads 2] [--steps 60] [--profile cpu]

The trainer's automatic dynamics precision (``--dynamics-precision
auto``: bf16 where the CPU runs it natively and the core is wide enough) picks one of the two: each core is
timed in float32 and in bf16, in turns of ``--steps // 3`` steps, best of 3 turns each, and the pick is named.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from worldmodel.config import DYNAMICS, ModelConfig
from worldmodel.model import Schedule, WorldModel
from worldmodel.precision import BF16_DYNAMICS_MIN_WIDTH, Compute, choose_compute, cpu_info


def steps_per_second(
    config: ModelConfig, batch: int, observed: int, predicted: int, steps: int, computes: dict[str, Compute]
) -> dict[str, float]:
    """Training steps per second of the core for each dynamics precision, timed in turns (best of 3)."""
    torch.manual_seed(0)
    model = WorldModel(config)
    parameters = list(model.dynamics.parameters())
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    length = observed + predicted
    keypoints = torch.rand(batch, length, config.num_keypoints, 3) * 2 - 1
    actions = torch.rand(batch, length, config.action_dim) * 2 - 1
    schedule = Schedule(kl_scale=1.0, teacher_forcing_observed=0.5, teacher_forcing_predicted=0.75)

    def step(compute: Compute) -> None:
        optimizer.zero_grad(set_to_none=True)
        with compute.dynamics_training():
            loss = model.dynamics_losses(keypoints, actions, observed, schedule).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    for compute in computes.values():
        for _ in range(3):  # warm-up: allocator, autograd graph caches, oneDNN kernels
            step(compute)
    best = {name: float("inf") for name in computes}
    turn = max(1, steps // 3)
    for _ in range(3):
        for name, compute in computes.items():
            start = time.perf_counter()
            for _ in range(turn):
                step(compute)
            best[name] = min(best[name], (time.perf_counter() - start) / turn)
    return {name: 1.0 / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--observed", type=int, default=8)
    parser.add_argument("--predicted", type=int, default=8)
    parser.add_argument("--profile", choices=("cpu", "paper", "smoke"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    factory = {"cpu": ModelConfig.cpu, "paper": ModelConfig.paper, "smoke": ModelConfig.smoke}[args.profile]
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.profile} sizes, batch {args.batch} x ({args.observed} + {args.predicted})")
    native = "yes" if cpu_info().native_bf16 else "no"
    print(f"--dynamics-precision auto: bf16 where the CPU runs it natively ({native} here) and the core's width is "
          f">= {BF16_DYNAMICS_MIN_WIDTH}, else fp32")
    computes = {precision: choose_compute("cpu", dynamics_precision=precision) for precision in ("fp32", "bf16")}
    for name in DYNAMICS:
        config = factory(dynamics=name)
        auto = choose_compute("cpu", dynamics_precision="auto", dynamics_width=config.dynamics_width)
        rates = steps_per_second(config, args.batch, args.observed, args.predicted, args.steps, computes)
        core = WorldModel(config).dynamics
        size = sum(p.numel() for p in core.parameters())
        figures = ", ".join(f"{label} {rate:5.1f}" for label, rate in rates.items())
        print(f"  {name:6s} steps/s: {figures} (bf16/fp32 {rates['bf16'] / rates['fp32']:.2f}x; auto: {auto.dynamics}, "
              f"{rates[auto.dynamics]:.1f})   (width {config.dynamics_width}, hidden {core.hidden_size}, "
              f"noise {core.noise_size}, best of {core.best_of}, {size / 1e3:.0f}k parameters)")


if __name__ == "__main__":
    main()
