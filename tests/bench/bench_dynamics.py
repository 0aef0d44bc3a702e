"""Dynamics-stage training speed of every core, side by side: forward + backward + Adam step of
``WorldModel.dynamics_losses`` on cached-keypoint-sized batches (default 32 windows of 8 + 8 frames, the
``cpu`` profile's sizes), in steps per second.

    OMP_NUM_THREADS=2 python tests/bench/bench_dynamics.py [--threads 2] [--steps 60] [--profile cpu]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from worldmodel.config import DYNAMICS, ModelConfig
from worldmodel.model import Schedule, WorldModel


def steps_per_second(config: ModelConfig, batch: int, observed: int, predicted: int, steps: int) -> float:
    torch.manual_seed(0)
    model = WorldModel(config)
    parameters = list(model.dynamics.parameters())
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    length = observed + predicted
    keypoints = torch.rand(batch, length, config.num_keypoints, 3) * 2 - 1
    actions = torch.rand(batch, length, config.action_dim) * 2 - 1
    schedule = Schedule(kl_scale=1.0, teacher_forcing_observed=0.5, teacher_forcing_predicted=0.75)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.dynamics_losses(keypoints, actions, observed, schedule).total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    for _ in range(3):  # warm-up: allocator, autograd graph caches
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


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
    for name in DYNAMICS:
        config = factory(dynamics=name)
        rate = steps_per_second(config, args.batch, args.observed, args.predicted, args.steps)
        core = WorldModel(config).dynamics
        size = sum(p.numel() for p in core.parameters())
        print(f"  {name:6s} {rate:6.1f} steps/s   (hidden {core.hidden_size}, noise {core.noise_size}, "
              f"best of {core.best_of}, {size / 1e3:.0f}k parameters)")


if __name__ == "__main__":
    main()
