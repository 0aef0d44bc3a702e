"""Benchmark of the training step on CPU (a script that prints figures, not a test).

    python tests/bench/bench_train.py [--data data/quick] [--profile cpu] [--steps 5] [--threads N]

Measured in one run on the same batch of real windows (random frames if --data has none). The
variants are timed in turns and the minimum over the repeats is reported (the median is printed too):
on a machine shared with other jobs the minimum is the stable estimate of the uncontended speed.

0. The CPU: model name, the vector ISA torch uses, native bf16 or not, and what ``--precision auto``
   chooses on it (``worldmodel.precision.choose_compute``).
1. Training steps/s and frames/s of a joint step (detector + reconstructor + VRNN with best of many +
   all losses + Adam), side by side: fp32 NCHW (plain eager), fp32 channels_last, bf16 autocast +
   channels_last, and the automatic choice. Target: the automatic choice within 10% of the fastest.
2. Where an automatic-path step goes: the same step with only the vision losses (detector + appearance +
   reconstructor), and the dynamics side (VRNN, best of many, dynamics losses, their Adam step) timed on
   its own on the batch's detected keypoints (the joint step's dynamics read them detached; the difference
   of the two joint timings is below a shared machine's noise); the convolutions' share of the profiler's
   CPU time; and the time the training loop waits for the DataLoader (workers read and decompress
   windows in parallel). Target: dynamics side and data <= 25% of a step.
3. For staged training, on the automatic path: vision-stage steps/s at the profile's vision batch,
   dynamics-stage steps/s on cached keypoints, and keypoint extraction frames/s; and the vision stage
   in fp32 (what an AVX2-only CPU runs), so it can be measured on a CPU that has native bf16 too, beside
   the same stage reconstructing half and a quarter of each sequence's frames (``--net.reconstructed-frames``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from worldmodel.model import WorldModel  # noqa: E402
from worldmodel.precision import choose_compute, cpu_info  # noqa: E402
from worldmodel import train_config, training  # noqa: E402

CPU = torch.device("cpu")


def real_or_random_batch(data: Path, config: train_config.TrainConfig, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from worldmodel.data import WindowDataset

        dataset = WindowDataset(data, config.tasks, "train", length=length)
        stride = max(1, len(dataset) // batch)
        windows = [dataset[i * stride % len(dataset)] for i in range(batch)]
        dataset.close()
        return torch.stack([w.frames for w in windows]), torch.stack([w.actions for w in windows]), f"real windows from {data}"
    except (FileNotFoundError, ValueError) as error:
        generator = torch.Generator().manual_seed(0)
        frames = torch.randint(0, 256, (batch, length, 64, 64, 3), dtype=torch.uint8, generator=generator)
        return frames, torch.rand(batch, length, 6, generator=generator) * 2 - 1, f"random frames ({error})"


def build(config: train_config.TrainConfig, stage: train_config.Stage, precision: str, channels_last: bool, dynamics: str = "fp32",
          distributed: bool = False, fused_adam: bool | None = None):  # noqa: ANN201
    """The model and one optimizer step of ``stage``, the trainer's (its objective in DistributedDataParallel when
    ``distributed``, inside a process group; ``fused_adam``: ``training.make_optimizer``'s ``fused``)."""
    torch.manual_seed(0)  # the same initial weights in every process, as the trainer's
    compute = choose_compute(CPU, precision, channels_last, dynamics, config.model_config.dynamics_width)  # type: ignore[arg-type]
    model = compute.prepare(WorldModel(config.model_config))
    optimizer = training.StageOptimizer.for_stage(model, stage, config, compute, fused_adam)
    objective: torch.nn.Module = training.Objective(model, stage, config.observed_steps(stage))
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective)
    schedule = training.schedule_at(config.steps // 2, config.steps, config, stage)

    def step(inputs: torch.Tensor, actions: torch.Tensor | None = None) -> None:
        if actions is None:  # the vision stage reads none
            actions = torch.zeros(*inputs.shape[:2], 6)
        training.train_step(objective, optimizer, training.Batch(inputs, actions), schedule, compute)

    return model, step


def interleaved_seconds(functions: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Seconds per call of each function, timed in turns (A, B, C, then B, C, A, ...) so that all see the same
    machine; the minimum over the repeats, the best estimate of the uncontended time on a shared machine
    (the median is printed too)."""
    for function in functions.values():
        for _ in range(warmup):  # oneDNN builds its kernels on the first calls
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for repeat in range(repeats):
        # The order rotates every repeat: a step that follows a slow, memory-hungry one (the emulated bf16
        # step) ran 1.03-1.21x slower than its twin (the same setting) in three runs in a fixed order.
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - started)
    for name, values in times.items():
        print(f"  {name}: min {min(values):.3f} s, median {statistics.median(values):.3f} s over {repeats}")
    return {name: min(values) for name, values in times.items()}


def conv_share(step: Callable[[], None]) -> float:
    """Share of the profiler's self CPU time spent in convolution kernels (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    conv = sum(event.self_cpu_time_total for event in events if "conv" in event.key.lower())
    return conv / total


def data_wait(data: Path, config: train_config.TrainConfig, length: int, step_seconds: float, steps: int) -> float | None:
    """Mean seconds the loop waits for a batch when each step takes ``step_seconds`` of compute."""
    try:
        from worldmodel.data import WindowDataset

        dataset = WindowDataset(data, config.tasks, "train", length=length)
    except (FileNotFoundError, ValueError):
        return None
    sampler = training.ResumableBatchSampler(len(dataset), config.batch_size, seed=0)
    loader = iter(training.seeded_loader(dataset, sampler, max(1, config.num_workers), 0, pin_memory=False))
    next(loader)  # worker start-up is a one-off
    waits = []
    for _ in range(steps):
        time.sleep(step_seconds)  # stands in for the training step (workers prefetch meanwhile)
        started = time.perf_counter()
        next(loader)
        waits.append(time.perf_counter() - started)
    return statistics.mean(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/quick"))
    parser.add_argument("--profile", default="cpu", choices=("paper", "cpu", "smoke"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (minimum reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = train_config.profile_config(args.profile)
    window = config.window
    frames, actions, source = real_or_random_batch(args.data, config, config.batch_size, window)
    print(f"profile {args.profile}: {config.model_config}")
    print(f"batch: {config.batch_size} x {window} frames, {source}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    frames_per_step = config.batch_size * window

    # 0. the CPU and the automatic choice
    info = cpu_info()
    auto = choose_compute(CPU, dynamics_precision="auto", dynamics_width=config.model_config.dynamics_width)
    print(f"CPU: {info.name}; torch capability {info.capability}; native bf16: {'yes' if info.native_bf16 else 'no'}")
    print(f"--precision auto: {auto.reason}")
    auto_name = f"auto = {auto.precision} {'channels_last' if auto.channels_last else 'NCHW'}"

    # 1. the candidates side by side, joint step; 2. the automatic path with the vision losses only
    # (convs, layout, dynamics): the bf16 candidate runs its dynamics in bf16 too, as auto does where it picks bf16
    candidates = {"fp32 NCHW": ("fp32", False, "fp32"), "fp32 channels_last": ("fp32", True, "fp32"),
                  "bf16 channels_last": ("bf16", True, "bf16"),
                  auto_name: (auto.precision, auto.channels_last, auto.dynamics)}  # fmt: skip
    steps = {name: build(config, train_config.Stage.JOINT, *choice)[1] for name, choice in candidates.items()}
    _, vision_step = build(config, train_config.Stage.VISION, auto.precision, auto.channels_last)
    timed: dict[str, Callable[[], None]] = {
        f"joint, {name}": lambda step=step: step(frames, actions) for name, step in steps.items()
    }
    timed["vision losses only, auto"] = lambda: vision_step(frames, actions)
    seconds = interleaved_seconds(timed, args.steps)
    joint = {name: seconds[f"joint, {name}"] for name in candidates}
    fastest = min(joint.values())
    for name, value in joint.items():
        print(f"joint step, {name:28s}: {value:6.2f} s/step = {1 / value:5.2f} steps/s, "
              f"{frames_per_step / value:6.0f} frames/s, {value / fastest:4.2f}x the fastest, "
              f"{joint['fp32 NCHW'] / value:4.2f}x over fp32 NCHW")  # fmt: skip
    default = joint[auto_name]
    print(f"automatic choice: {default / fastest:.2f}x the fastest's time (target <= 1.10)")
    twins = [name for name, choice in candidates.items() if name != auto_name and choice == candidates[auto_name]]
    if twins:  # the same setting timed twice: their difference is what this machine's noise is in this run
        twin = joint[twins[0]]
        print(f"  (auto is the setting of '{twins[0]}', a second copy of the same model: "
              f"{max(default, twin) / min(default, twin):.2f}x between the two is this run's noise)")

    share = conv_share(lambda: steps[auto_name](frames, actions))
    wait = data_wait(args.data, config, window, default, 2 * args.steps)
    vision_only = seconds["vision losses only, auto"]
    # The dynamics side timed on its own (the joint step's dynamics read detached keypoints, so this is the
    # same work): the difference joint - vision-only is smaller than a shared machine's noise.
    model, dynamics_step = build(config, train_config.Stage.DYNAMICS, auto.precision, auto.channels_last, auto.dynamics)
    keypoints = model.detect(frames)
    dynamics = interleaved_seconds({"dynamics side alone": lambda: dynamics_step(keypoints, actions)}, 3 * args.steps)[
        "dynamics side alone"
    ]
    exposed = wait or 0.0
    print(f"vision-only step (detector + appearance + reconstructor + vision losses): {vision_only:.2f} s "
          f"(joint - vision-only: {default - vision_only:+.3f} s)")  # fmt: skip
    print(f"dynamics side (VRNN + best of {config.model_config.best_of} + dynamics losses + its Adam step, timed alone): "
          f"{dynamics:.3f} s = {dynamics / default:.1%} of a joint step")  # fmt: skip
    print(f"convolutions (fwd + bwd kernels) in the profiler: {share:.1%} of CPU time; everything else {1 - share:.1%}")
    if wait is not None:
        print(f"data: the loop waits {exposed * 1000:.1f} ms per batch with {max(1, config.num_workers)} worker(s)")
    outside = (dynamics + exposed) / (default + exposed)
    print(f"outside detector + reconstructor (dynamics, best of many, their losses, data): {outside:.1%} (target <= 25%)")

    # 3. staged training figures
    if config.mode == "staged":
        vision_frames, _, _ = real_or_random_batch(args.data, config, config.vision_batch_size, config.vision_window)
        vision_choices = {"auto": (config, auto.precision, auto.channels_last),
                          "fp32 channels_last": (config, "fp32", True)}  # fmt: skip
        for n in sorted({config.vision_window // 2, config.vision_window // 4} - {0}, reverse=True):
            # --net.reconstructed-frames: L_image on n frames of each sequence (docs/PERFORMANCE.md)
            net = dataclasses.replace(config.net, reconstructed_frames=n)
            vision_choices[f"fp32 channels_last, {n} reconstructed"] = (dataclasses.replace(config, net=net), "fp32", True)
        vision_steps = {
            name: build(chosen, train_config.Stage.VISION, *choice)[1] for name, (chosen, *choice) in vision_choices.items()
        }
        seconds = interleaved_seconds(
            {name: lambda step=step: step(vision_frames) for name, step in vision_steps.items()}, args.steps
        )
        count = config.vision_batch_size * config.vision_window
        for name, value in seconds.items():
            print(f"staged vision step ({config.vision_batch_size} x {config.vision_window}), {name}: "
                  f"{1 / value:.2f} steps/s, {count / value:.0f} frames/s, "
                  f"{seconds['fp32 channels_last'] / value:.2f}x fp32 channels_last")  # fmt: skip
        print(f"staged dynamics step ({config.batch_size} x {window}, cached keypoints): {1 / dynamics:.1f} steps/s")
        model.eval()

        def detect() -> None:
            with torch.no_grad(), auto.autocast():
                model.detect(frames)

        seconds = interleaved_seconds({"detect": detect}, args.steps)["detect"]
        print(f"keypoint extraction ({auto.precision}): {frames_per_step / seconds:.0f} frames/s")


if __name__ == "__main__":
    main()
