"""How much of the true state the world models' hidden states hold, on observed and on imagined frames.

    python downstream/state_probe.py --reward-out runs/reward

Reads the hidden-state cache of a finished reward experiment (downstream/reward.py, the same ``--out``): for
each task, each world model (and the state-space bound, if the experiment had one) and each chosen frame of
the length-20 windows (by default the last observed one and open-loop horizons 1, 4 and 12), an MLP probe
(worldmodel/probes.py) from the hidden state that predicts that frame to the frame's true low-dimensional
state, fit on the training windows of the experiment's fold 0 and scored on its test windows (split by
episode, as the reward predictors). R^2 per state dimension.

It tells where a reward gap opens: a hidden state that holds the state on the observed frames but loses it
over the imagined ones points at the dynamics; one that never holds it, at perception (docs/DYNAMICS.md,
"Probes"). Writes state_probe.json and state_probe.md to ``--reward-out``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np
import torch
from tqdm.auto import tqdm

from worldmodel.errors import InputError, run_cli
from worldmodel.probes import MLP_STEPS, fit_probe, r_squared_per_dim
from worldmodel.reward import episode_folds
from worldmodel.reward_experiment import cached_inputs, read_meta, write_analysis


@dataclass(frozen=True)
class Args:
    reward_out: Path = Path("runs/reward")
    """The ``--out`` folder of a finished downstream/reward.py run (its results.json and hidden-state cache)."""
    frames: tuple[int, ...] = (7, 8, 11, 19)
    """Frames of the length-20 windows to probe (0-based; with 8 observed frames: 7 is the last observed, 8, 11
    and 19 are open-loop horizons 1, 4 and 12)."""
    tasks: str = "all"
    """Comma-separated tasks of the experiment, or 'all'."""
    steps: int = MLP_STEPS
    """Training minibatches of each MLP probe."""


def probe_frames(cache: Path, frames: tuple[int, ...], folds: int, seed: int, steps: int) -> dict[int, list[float]]:
    """R^2 per state dimension of the MLP probe hidden state -> true state at each frame, on fold 0."""
    with np.load(cache) as cached:
        hidden, states, episodes = cached["hidden"], cached["states"], cached["episodes"]
    if max(frames) >= hidden.shape[1]:
        raise InputError(f"--frames: the windows have {hidden.shape[1]} frames (0-{hidden.shape[1] - 1})")
    train, test = episode_folds(episodes, folds, seed)[0]
    result = {}
    for frame in frames:
        features = torch.from_numpy(hidden[:, frame].astype(np.float32))  # (N, H)
        targets = torch.from_numpy(states[:, frame])  # (N, D)
        probe = fit_probe(features[train], targets[train], "mlp", seed, steps)
        result[frame] = r_squared_per_dim(probe.predict(features[test]), targets[test]).tolist()
    return result


def markdown(report: dict[str, dict[str, dict[int, list[float]]]], frames: tuple[int, ...], observed: int) -> str:
    names = [f"frame {f} ({'observed' if f < observed else f'horizon {f - observed + 1}'})" for f in frames]
    lines = ["MLP probe hidden state -> true state, R^2 on fold 0's test windows (mean over the state's dimensions):", "",
             "| task | model | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(frames)]  # fmt: skip
    for task, per_input in report.items():
        for label, per_frame in per_input.items():
            cells = [f"{np.nanmean(per_frame[f]):.2f}" for f in frames]
            lines.append(f"| {task} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict[str, Any]:
    if args.steps < 1 or not args.frames or min(args.frames) < 0:
        raise InputError("--steps must be >= 1 and --frames non-negative frame numbers")
    meta = read_meta(args.reward_out)
    experiment = meta["args"]
    cached_tasks = sorted({path.stem for path in (args.reward_out / "cache").glob("*/*.npz")})
    tasks = cached_tasks if args.tasks == "all" else [task.strip() for task in args.tasks.split(",")]
    inputs = {task: cached_inputs(args.reward_out, meta, task, hidden_only=True) for task in tasks}  # missing: InputError
    report: dict[str, dict[str, dict[int, list[float]]]] = {}
    progress = tqdm(total=sum(len(task_inputs) for task_inputs in inputs.values()), desc="state probes", unit="model")
    for task, task_inputs in inputs.items():
        for cached in task_inputs:
            report.setdefault(task, {})[cached.label] = probe_frames(
                cached.features, args.frames, experiment["folds"], experiment["seed"], args.steps
            )
            progress.update(1)
    progress.close()
    record = {"frames": list(args.frames), "num_observed": meta["num_observed"], "steps": args.steps, "tasks": report}
    write_analysis(args.reward_out, "state_probe", record, markdown(report, args.frames, meta["num_observed"]))
    return record


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, argv, __doc__)


if __name__ == "__main__":
    sys.exit(cli())
