"""Compare dynamics cores on the test split: open-loop keypoint error per horizon, and keypoints -> true state.

    python downstream/dynamics.py --run runs/struct_vrnn --run runs/struct_srvp --out runs/dynamics

For each run (a staged run of train/world_model.py, whose run directory caches the detected keypoints of
both splits): observe ``--observed`` frames, imagine ``--horizon`` frames ``--samples`` times with the true
actions, and report the mean keypoint distance per horizon of a single prior sample, the mean of the
samples and the best of them, beside hold-last and constant-velocity extrapolation; and, per task, the
R^2 of a probe from keypoints to the true low-dimensional state (detected keypoints, and the open-loop
predicted ones), linear and (unless ``--no-probe-mlp``) a small MLP (a linear readout understates what keypoints
hold: worldmodel/probes.py). Writes results.json, results.md and horizons.png to ``--out``. See
worldmodel/dynamics_benchmark.py for the definitions.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import h5py
import torch
import tyro

from worldmodel.atomic import atomic_write, atomic_write_text
from worldmodel.checkpoint import load_world_model
from worldmodel.config import OBSERVED_STEPS
from worldmodel.devices import resolve_device
from worldmodel.dynamics_benchmark import (
    JUMP,
    PREDICTIONS,
    REFERENCES,
    benchmark_record,
    choose_window_starts,
    open_loop,
    probe_task,
)
from worldmodel.errors import InputError, check_options, one_line, run_cli
from worldmodel.heap import keep_freed_memory
from worldmodel.keypoint_cache import KEYPOINT_CACHE_FILE, KeypointSplit, load_keypoint_cache, vision_fingerprint
from worldmodel.precision import inference_compute
from worldmodel.probes import MLP_STEPS, READOUTS
from worldmodel.storage import checked_dataset_files
from worldmodel.tasks import task_id
from worldmodel.training import detect_split

DEFAULT_RUNS = (Path("runs/world_model"),)


@dataclass(frozen=True)
class Args:
    run: tyro.conf.UseAppendAction[tuple[Path, ...]] = ()
    """Staged run directory of train/world_model.py; repeat the flag to compare several (--run A --run B). None given: runs/world_model."""
    out: Path = Path("runs/dynamics")
    """Where results.json, results.md and horizons.png go."""
    observed: int = OBSERVED_STEPS
    """Frames observed through the posterior before the open-loop part."""
    horizon: int = 8
    """Open-loop frames imagined from the prior."""
    samples: int = 10
    """Prior samples per window (single = the first; mean and best of all)."""
    windows: int = 2_000
    """Test windows, drawn over all tasks (fixed by --seed)."""
    split: Literal["test", "train"] = "test"
    """Split of the open-loop windows: 'test' for results; 'train' shows how well a core fits its own data (diagnosis: a core that beats hold-last on train but not on test overfits)."""
    data: Path | None = None
    """Benchmark on this dataset's --split instead of the run's own data: a validation set collected with another
    --seed (collect/dmcs.py --seed 1 --out data/dmcs_val), so that ablations are chosen without the test split.
    Its keypoints are detected with each run's detector; the probe is fitted on the run's train split as always."""
    probe: bool = True
    """Also fit the keypoints -> true state probe per task (reads the dataset's states)."""
    probe_mlp: bool = True
    """With --probe, also fit the MLP probe (worldmodel/probes.py; ~5-10 s per task on one core)."""
    probe_mlp_steps: int = MLP_STEPS
    """Training minibatches of each MLP probe."""
    seed: int = 0
    """Seeds the window choice and the prior samples."""
    device: str = "auto"
    """'cpu', 'cuda', or 'auto' (cuda if available)."""
    keep_freed_memory: bool = True
    """Keep freed memory in this process (glibc malloc: no mmap per large tensor, no trimming), so that detecting the keypoints of --data stops page-faulting each batch's activations in anew (docs/PERFORMANCE.md, "Freed memory kept in the process")."""


def task_states(root: Path, task: str, split: str, steps: KeypointSplit, task_id: int) -> torch.Tensor:
    """True states of every cached frame of the task, in cache order (episodes of the main file, then of each
    part, then frames)."""
    lengths = steps.episode_lengths[steps.task_ids == task_id]
    files = checked_dataset_files(root, task, split)  # the cache's episode order (training.detect_split)
    if sum(info.num_episodes for info in files) != len(lengths):
        episodes = sum(info.num_episodes for info in files)
        raise ValueError(f"{task} {split}: {episodes} episodes in the data, {len(lengths)} in the keypoint cache")
    per_episode = []
    for info in files:
        with h5py.File(info.path, "r") as file:
            per_episode += list(file["states"][...])
    return torch.cat([torch.from_numpy(states[: int(size)]) for states, size in zip(per_episode, lengths)])


def evaluate_run(args: Args, run: Path, device: torch.device) -> dict[str, Any]:
    loaded = load_world_model(run, device)  # absent, damaged or foreign: CheckpointError
    model, info = loaded.model, loaded.info
    if loaded.config.reads_states:
        raise InputError(f"{run} is a state-space bound (state-vrnn); this benchmark compares keypoint models, and "
             "its open-loop error on the test states is in its summary.json (dynamics_benchmark)")  # fmt: skip
    if not info.complete:
        raise InputError(f"the run in {run} has not finished training; finish it with train/world_model.py --resume")
    cache = load_keypoint_cache(Path(info.path).parent / KEYPOINT_CACHE_FILE, vision_fingerprint(model))
    if cache is None or "test" not in cache:
        raise InputError(f"{run} holds no keypoint cache of its detector; this benchmark needs a staged run (--mode staged)")
    train, test = cache["train"], cache["test"]
    root, tasks = Path(info.dataset["path"]), list(info.dataset["tasks"])
    windows = cache[args.split]
    scored_root, scored_split = root, "test"  # where the probe is scored: the test split, or the frames of --data
    if args.data is not None:  # another dataset (e.g. validation): detect its keypoints with this run's detector
        try:
            windows = detect_split(model, args.data, tasks, args.split, device, inference_compute(device).precision, progress=True)
        except (OSError, KeyError, ValueError) as error:
            raise InputError(f"--data {args.data}: {one_line(str(error))}; it needs the run's tasks ({', '.join(tasks)}) in "
                             f"its {args.split} split, as collect/dmcs.py writes them") from None  # fmt: skip
        test, scored_root, scored_split = windows, args.data, args.split
    length = args.observed + args.horizon
    starts = choose_window_starts(windows, length, args.windows, args.seed)
    result = open_loop(model, windows, starts, args.observed, args.horizon, args.samples, args.seed)
    record: dict[str, Any] = {
        "run": str(run),
        "label": f"{run.name}: {loaded.config.variant} / {loaded.config.dynamics}",
        **benchmark_record(result, args.observed, windows if loaded.config.structured else None),  # cnn: no positions
    }
    if args.probe:
        probes: dict[str, dict[str, Any]] = {readout: {} for readout in (READOUTS if args.probe_mlp else ("linear",))}
        for task in tasks:
            number = task_id(task)  # the cache's task ids are the global ones (worldmodel.tasks), not positions in the run
            try:
                train_states = task_states(root, task, "train", train, number)
                test_states = task_states(scored_root, task, scored_split, test, number)
            except (OSError, KeyError, ValueError) as error:
                raise InputError(f"true states for the probe ({task}): {one_line(str(error))}; pass --no-probe to skip it") from None
            predicted = result if windows is test else None  # the open-loop windows are the probe's frames
            for readout, per_task in probes.items():
                probe = probe_task(train, test, number, train_states, test_states, predicted, args.observed, readout, args.seed,
                                   args.probe_mlp_steps)
                per_task[task] = probe._asdict()
        record["probe_r2"] = probes["linear"]
        if "mlp" in probes:
            record["probe_r2_mlp"] = probes["mlp"]
    return record


def markdown(records: list[dict[str, Any]], args: Args) -> str:
    where = f"{args.split} split" if args.data is None else f"{args.split} split of {args.data}"
    lines = [f"Open-loop keypoint distance ({where}) after {args.observed} observed frames, mean over horizons 1..{args.horizon} "
             f"(ratio to hold-last; < 1 beats holding still):", "",
             "| run | single | mean of N | best of N | hold-last | constant velocity |", "|---|---|---|---|---|---|"]  # fmt: skip
    for record in records:
        cells = [f"{record['mean_distance'][name]:.4f} ({record['ratio_to_hold_last'][name]:.2f}x)"
                 for name in PREDICTIONS + REFERENCES]  # fmt: skip
        lines.append(f"| {record['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"Detector stability ({where}): one-frame keypoint moves; jumps are moves > {JUMP} "
              "(a tenth of the image), which no dynamics can predict:", "",
              "| run | mean move | median move | jump rate | share of motion in jumps | still rate |", "|---|---|---|---|---|---|"]  # fmt: skip
    for record in (record for record in records if record["stability"] is not None):  # keypoint models only
        st = record["stability"]
        lines.append(f"| {record['label']} | {st['mean_step']:.4f} | {st['median_step']:.4f} | {st['jump_rate']:.3f} | {st['jump_share']:.2f} | {st['still_rate']:.3f} |")
    lines += ["", "The open-loop ratios to hold-last on keypoint tracks without a jump (what physics explains); the floor is "
              "the ratio over all tracks of a prediction exact on those and holding the jumping ones still:", "",
              "| run | single | mean of N | best of N | tracks kept | floor over all tracks |", "|---|---|---|---|---|---|"]  # fmt: skip
    for record in (record for record in records if record["jump_free_ratio_to_hold_last"] is not None):
        jf = record["jump_free_ratio_to_hold_last"]
        lines.append(f"| {record['label']} | {jf['single']:.2f}x | {jf['mean_of_n']:.2f}x | {jf['best_of_n']:.2f}x | {jf['tracks_kept']:.2f} | {jf['jump_floor']:.2f}x |")
    for key, name in (("probe_r2", "Linear"), ("probe_r2_mlp", "MLP")):
        if not any(key in record for record in records):
            continue
        tasks = list(next(record for record in records if key in record)[key])
        lines += ["", f"{name} probe keypoints -> true state, R^2 on the {'test split' if args.data is None else where} (detected / predicted; "
                  "mean over the state's dimensions, velocities included, which one frame does not show):", "",
                  "| run | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]  # fmt: skip
        for record in records:
            probes = record.get(key, {})
            cells = [f"{probes[t]['detected_r2']:.2f} / {probes[t]['predicted_r2']:.2f}" if t in probes else "-" for t in tasks]
            lines.append(f"| {record['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(records), figsize=(4.2 * len(records), 3.4), squeeze=False, sharey=True)
    for axis, record in zip(axes[0], records):
        for name in PREDICTIONS + REFERENCES:
            values = record["per_horizon"][name]
            style = "--" if name in REFERENCES else "-"
            axis.plot(range(1, len(values) + 1), values, style, label=name.replace("_", " "))
        axis.set_title(record["label"], fontsize=9)
        axis.set_xlabel("open-loop horizon (frames)")
    axes[0][0].set_ylabel("mean keypoint distance")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)


def main(args: Args) -> list[dict[str, Any]]:
    """The comparison; bad input raises InputError before anything is written."""
    check_options(args, 1, "observed", "horizon", "samples", "windows", "probe_mlp_steps")
    check_options(args, 0, "seed")
    device = resolve_device(args.device)
    print(keep_freed_memory(args.keep_freed_memory).reason, file=sys.stderr)  # before the models take their memory
    records = [evaluate_run(args, run, device) for run in args.run or DEFAULT_RUNS]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps({"args": asdict(args) | {"run": [str(r) for r in args.run], "out": str(args.out), "data": None if args.data is None else str(args.data)}, "runs": records}, indent=2))
    table = markdown(records, args)
    atomic_write_text(args.out / "results.md", table)
    plot(records, args.out / "horizons.png")
    print(table)
    return records


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, argv, __doc__)


if __name__ == "__main__":
    sys.exit(cli())
