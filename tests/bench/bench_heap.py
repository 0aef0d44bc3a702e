"""Training steps with glibc's default heap against freed memory kept in the process (``--keep-freed-memory``).

    python tests/bench/bench_heap.py [--data data/quick] [--profile cpu] [--steps 8] [--repeats 2]

The setting is the process's and cannot be undone (worldmodel/heap.py), so every measurement runs in a fresh
child process, the two settings in turns, ``--repeats`` times each. A child builds the trainer's step, takes 3
steps to warm up, then times ``--steps`` steps on one fixed batch of real windows and reports the best step,
the minor page faults per step and its peak resident memory. Printed per stage: both settings' best, and their
ratio. Stages: the vision stage in fp32 (what a CPU without native bf16 runs) and at ``--precision auto``, the
dynamics stage on the batch's detected keypoints (uncompiled), and the reward experiment's hidden-state extraction
of one task (a step: ``worldmodel.hidden_states.extract_window_features`` over cheetah's test windows of --data, up
to 10,000, in batches of 256; inference precision as the machine decides, so fp32 where ``ONEDNN_MAX_CPU_ISA=AVX2``
caps the CPU; skipped where --data has no cheetah test split).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

STAGES = ("vision fp32", "vision auto", "dynamics", "hidden states")


def child(args: argparse.Namespace) -> None:
    """One measurement: print {"rate", "faults", "rss_gb"} as JSON."""
    from worldmodel.heap import keep_freed_memory

    keep_freed_memory(args.child == "kept")  # before torch allocates anything large
    import torch

    from bench_train import build, real_or_random_batch  # type: ignore[import-not-found]
    from worldmodel import train_config
    from worldmodel.model import WorldModel

    config = train_config.profile_config(args.profile)
    if args.stage == "hidden states":
        step, per_step = hidden_state_step(args, config)
        inputs = actions = None
    elif args.stage.startswith("vision"):
        inputs, _, _ = real_or_random_batch(args.data, config, config.vision_batch_size, config.vision_window)
        actions, per_step = None, inputs.shape[0] * inputs.shape[1]
        _, step = build(config, train_config.Stage.VISION, args.stage.split()[1], True)
    else:
        frames, actions, _ = real_or_random_batch(args.data, config, config.batch_size, config.window)
        with torch.no_grad():  # untrained: the step's cost does not depend on the values
            inputs = WorldModel(config.model_config).eval().detect(frames)
        per_step = 1
        _, step = build(config, train_config.Stage.DYNAMICS, "fp32", True)
    for _ in range(3):
        step(inputs, actions)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    best = float("inf")
    for _ in range(args.steps):
        started = time.perf_counter()
        step(inputs, actions)
        best = min(best, time.perf_counter() - started)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(json.dumps({"rate": per_step / best, "faults": faults, "rss_gb": rss_gb}))


def hidden_state_step(args: argparse.Namespace, config: object):  # noqa: ANN201
    """One task's extraction as the reward experiment makes it (``extract_window_features``: reading, batches of 256
    windows of 20 frames), of an untrained model: the cost does not depend on the weights."""
    import torch

    from worldmodel.data import WindowDataset
    from worldmodel.hidden_states import extract_window_features
    from worldmodel.model import WorldModel
    from worldmodel.precision import inference_compute

    task = "cheetah"  # main() skips this stage where --data has no such test split
    dataset = WindowDataset(args.data, [task], "test", length=20)
    windows = len(dataset)
    dataset.close()
    torch.manual_seed(0)
    model = inference_compute(torch.device("cpu")).prepare(WorldModel(config.model_config)).eval()  # type: ignore[attr-defined]

    def step(*_: object) -> None:
        extract_window_features(model, args.data, task, 10_000)

    return step, min(windows, 10_000)


def measure(args: argparse.Namespace, stage: str, heap: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", heap, "--stage", stage, "--data", str(args.data),
               "--profile", args.profile, "--steps", str(args.steps)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        sys.exit(f"bench_heap.py: a child failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/quick"), help="dataset folder of collect/dmcs.py")
    parser.add_argument("--profile", default="cpu", choices=("paper", "cpu", "quick", "smoke"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per child")
    parser.add_argument("--repeats", type=int, default=2, help="children of each setting, in turns")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--child", choices=("default", "kept"), help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from worldmodel.precision import cpu_info

    info = cpu_info()
    print(f"CPU: {info.name}; torch capability {info.capability}; native bf16: {'yes' if info.native_bf16 else 'no'}; "
          f"load average {os.getloadavg()[0]:.1f}; {args.profile} profile, {args.steps} steps a child, best step")
    for stage in args.stages:
        if stage == "hidden states" and not (args.data / "cheetah_test.h5").is_file():
            print(f"{stage}: skipped, it reads cheetah's test split and {args.data} has none (--data)")
            continue
        unit = {"dynamics": "steps/s", "hidden states": "windows/s"}.get(stage, "frames/s")
        results: dict[str, list[dict[str, float]]] = {"default": [], "kept": []}
        for repeat in range(args.repeats):
            for heap in ("default", "kept") if repeat % 2 == 0 else ("kept", "default"):
                results[heap].append(measure(args, stage, heap))
                last = results[heap][-1]
                print(f"  {stage}, {heap} heap: {last['rate']:.1f} {unit}, {last['faults']:,.0f} page faults a step, "
                      f"peak {last['rss_gb']:.2f} GiB")
        best = {heap: max(r["rate"] for r in runs) for heap, runs in results.items()}
        print(f"{stage}: default heap {best['default']:.1f}, kept {best['kept']:.1f} {unit}: "
              f"{best['kept'] / best['default']:.2f}x")


if __name__ == "__main__":
    main()
