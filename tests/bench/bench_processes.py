"""One training process with every thread against one process per core (torchrun's layout), side by side.

    python tests/bench/bench_processes.py [--data data/dmcs] [--precision fp32] [--steps 8] [--repeats 3]

On a CPU, ``torchrun --standalone --nproc-per-node N train/world_model.py`` runs N processes of
cores / N threads, each on its share of the global batch, their gradients averaged by gloo
(DistributedDataParallel). This times, on one fixed batch of real windows, the staged training's steps both
ways, in turns: one process with N threads takes ``--steps`` steps, then N spawned processes of one thread
take the same steps on their shares; ``--repeats`` times. Printed per stage: frames/s (vision) or steps/s
(dynamics, on the batch's detected keypoints) of each block, the best of each layout, and their ratio.
Start-up (spawning, building the model, oneDNN's first calls) is outside the timed steps.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from worldmodel import train_config  # noqa: E402
from worldmodel.machine import available_cores  # noqa: E402
from worldmodel.model import WorldModel  # noqa: E402
from worldmodel.precision import cpu_info  # noqa: E402
from bench_train import build, real_or_random_batch  # noqa: E402  (this script's folder is on sys.path)

WARMUP_STEPS = 2  # oneDNN builds its kernels on the first calls


def timed(step: Callable[[], None], steps: int) -> float:
    for _ in range(WARMUP_STEPS):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def worker(rank: int, world_size: int, port: int, job: dict[str, Any], results: Any) -> None:
    """One of the N processes: its share of the batch, one thread, gloo; rank 0 reports seconds per step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    step = None
    try:
        share = job["inputs"].shape[0] // world_size
        rows = slice(rank * share, (rank + 1) * share)
        _, step = build(job["config"], job["stage"], job["precision"], True, "auto", distributed=True)
        inputs, actions = job["inputs"][rows], job["actions"][rows]
        dist.barrier()
        seconds = timed(lambda: step(inputs, actions), job["steps"])
        if rank == 0:
            results.put(seconds)
        dist.barrier()
    finally:
        step = None  # its DDP reducer holds the group: free it first (tests/test_train.py, the DDP layout test)
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_seconds(job: dict[str, Any], world_size: int) -> float:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(worker, args=(world_size, free_port(), job, results), nprocs=world_size, start_method="spawn")
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/dmcs"), help="dataset folder of collect/dmcs.py")
    parser.add_argument("--profile", default="cpu", choices=("paper", "cpu", "quick", "smoke"))
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"),
                        help="of the convolutions (fp32: what a CPU without native bf16 runs)")  # fmt: skip
    parser.add_argument("--processes", type=int, default=None, help="default: the cores this process may use")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=3, help="blocks of each layout, in turns")
    parser.add_argument("--stages", nargs="+", default=["vision", "dynamics"], choices=("vision", "dynamics"))
    args = parser.parse_args()
    config = train_config.profile_config(args.profile)
    processes = args.processes or available_cores()
    if processes < 2:
        sys.exit("bench_processes.py: one core here; the comparison needs at least 2 (--processes)")
    for name, size in (("vision batch", config.vision_batch_size), ("batch", config.batch_size)):
        if size % processes:
            sys.exit(f"bench_processes.py: the profile's {name} {size} does not split into {processes} processes")
    info = cpu_info()
    print(f"CPU: {info.name}; torch capability {info.capability}; native bf16: {'yes' if info.native_bf16 else 'no'}; "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"1 process x {processes} threads against {processes} processes x 1 thread; convolutions: --precision "
          f"{args.precision}; {args.steps} steps a block, {args.repeats} blocks each, in turns")  # fmt: skip

    frames, _, _ = real_or_random_batch(args.data, config, config.vision_batch_size, config.vision_window)
    jobs: dict[str, tuple[dict[str, Any], int, str]] = {}
    if "vision" in args.stages:
        job = dict(config=config, stage=train_config.Stage.VISION, precision=args.precision, inputs=frames,
                   actions=torch.zeros(*frames.shape[:2], 6), steps=args.steps)  # fmt: skip
        jobs["vision"] = (job, frames.shape[0] * frames.shape[1], "frames/s")
    if "dynamics" in args.stages:
        window_frames, window_actions, _ = real_or_random_batch(args.data, config, config.batch_size, config.window)
        detector = WorldModel(config.model_config).eval()  # untrained: the step's cost does not depend on the values
        with torch.no_grad():
            keypoints = detector.detect(window_frames)
        job = dict(config=config, stage=train_config.Stage.DYNAMICS, precision=args.precision, inputs=keypoints,
                   actions=window_actions, steps=args.steps)  # fmt: skip
        jobs["dynamics"] = (job, 1, "steps/s")

    for stage, (job, per_step, unit) in jobs.items():
        torch.set_num_threads(processes)
        _, step = build(config, job["stage"], args.precision, True, "auto")
        single = lambda step=step, job=job: step(job["inputs"], job["actions"])  # noqa: E731
        rates: dict[str, list[float]] = {"one process": [], "processes": []}
        for repeat in range(args.repeats):
            rates["one process"].append(per_step / timed(single, args.steps))
            rates["processes"].append(per_step / processes_seconds(job, processes))
            print(f"  {stage} block {repeat + 1}: one process {rates['one process'][-1]:.1f}, "
                  f"{processes} processes {rates['processes'][-1]:.1f} {unit}")  # fmt: skip
        best_one, best_many = max(rates["one process"]), max(rates["processes"])
        print(f"{stage}: 1 x {processes} threads {best_one:.1f} {unit}, {processes} x 1 thread {best_many:.1f} {unit} "
              f"(best blocks): {best_many / best_one:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
