"""What limits a loop's agent: how well the model it was trained in knew the states it then visited.

    python downstream/loop_diagnosis.py --out runs/loop/cheetah

For every round n >= 1 of a loop folder (downstream/loop.py) whose episodes are collected: round n-1's world
model and reward predictor, the ones round n-1's agent was trained in, run on the test episodes that agent
then acted on the real task (part ``loop-rNN``), beside the same on the random test episodes. Windows of 20
frames as in the reward fit: 8 observed through the posterior, 12 predicted open loop through the prior. On
the predicted steps it reports

    reward      the mean true reward per step (how far the agent's states are from the random data's);
    predicted   the mean predicted reward: above the true one, the agent is exploiting the model's errors;
    MSE / var   the squared error over the variance of those rewards (1: no better than their own mean):
                far above the random episodes', the model (dynamics or reward) does not know the agent's states.

Writes ``<out>/diagnosis.jsonl`` (one line per round and source) and prints the table. Runs on a finished
or an interrupted loop (it reads only finished phases); a few minutes on 2 cores for five rounds.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch

from downstream.loop import DATA_DIR, STATE_FILE, part_name, round_run
from envs.imagination_models import REWARD_PREDICTOR_DIR
from worldmodel import storage
from worldmodel.atomic import atomic_write_text
from worldmodel.checkpoint import load_world_model
from worldmodel.config import OBSERVED_STEPS
from worldmodel.devices import resolve_device
from worldmodel.errors import InputError, check_options, run_cli
from worldmodel.fingerprint import model_fingerprint
from worldmodel.hidden_states import extract_window_features
from worldmodel.reward import align_rewards, load_reward_predictor

DIAGNOSIS_FILE = "diagnosis.jsonl"


@dataclass(frozen=True)
class Args:
    out: Path = Path("runs/loop")
    """The loop's folder (downstream/loop.py --out)."""
    windows: int = 500
    """Test windows (20 frames) per round and source; fewer if the episodes have fewer."""
    seed: int = 0
    """Seeds the choice of windows and the prior samples of the predicted steps."""
    device: str = "cpu"
    """Device of the world model: 'cpu', 'cuda' or 'auto'."""


class RewardFit(NamedTuple):
    """Predicted-step rewards of one round's model on one source of test episodes."""

    windows: int
    reward: float  # mean true reward per agent step
    predicted: float  # mean predicted reward per agent step
    mse_over_variance: float


@torch.no_grad()
def predicted_step_fit(model: torch.nn.Module, predictor: torch.nn.Module, data: Path, task: str, args: Args) -> RewardFit:
    features = extract_window_features(model, data, task, num_sequences=args.windows, seed=args.seed,
                                       device=resolve_device(args.device))  # fmt: skip
    targets, _ = align_rewards(features.rewards)  # (N, L): target[t], the reward of the step into frame t
    predictions = predictor(features.hidden)[0]  # (N, L)
    true, guess = targets[:, OBSERVED_STEPS:], predictions[:, OBSERVED_STEPS:]  # the predicted frames
    mse = float(((guess - true) ** 2).mean())
    return RewardFit(len(true), float(true.mean()), float(guess.mean()), mse / max(float(true.var()), 1e-12))


def sources_of_round(data: Path, task: str, round_index: int) -> dict[str, Path]:
    """The random test file and round ``round_index``'s agent test part."""
    return {"random": storage.dataset_path(data, task, "test"),
            "agent": storage.dataset_path(data, task, "test", part_name(round_index))}  # fmt: skip


def as_dataset(file: Path, task: str, folder: Path) -> Path:
    """A folder in which ``file`` (a main file or a part) is the task's only test file, for the window readers."""
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(file.resolve(), storage.dataset_path(folder, task, "test"))
    return folder


def diagnosable_rounds(state: dict[str, Any]) -> list[int]:
    """Rounds n whose episodes are collected and whose predecessor's agent phase finished."""
    done = {int(index): phases for index, phases in state["done"].items()}
    return sorted(n for n in done if n >= 1 and "collect" in done[n] and "agent" in done.get(n - 1, []))


def main(args: Args) -> list[dict[str, Any]]:
    check_options(args, 1, "windows")
    try:
        state = json.loads((args.out / STATE_FILE).read_text())
        task = state["settings"]["task"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{args.out / STATE_FILE} is missing or unreadable: give the --out of a downstream/loop.py run") from None
    rounds = diagnosable_rounds(state)
    if not rounds:
        raise InputError(f"{args.out} has no round with collected episodes yet: run downstream/loop.py --rounds 1 or more")
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in rounds:
            run = round_run(args.out, index - 1)
            model = load_world_model(run, resolve_device(args.device)).model
            predictor = load_reward_predictor(run / REWARD_PREDICTOR_DIR / f"{task}.pt", task, model_fingerprint(model))
            for source, file in sources_of_round(args.out / DATA_DIR, task, index).items():
                folder = as_dataset(file, task, Path(scratch) / f"{source}-{index}")
                fit = predicted_step_fit(model, predictor, folder, task, args)  # features come back on the CPU
                records.append({"round": index, "model_round": index - 1, "source": source, **fit._asdict()})
    atomic_write_text(args.out / DIAGNOSIS_FILE, "".join(json.dumps(record) + "\n" for record in records))
    print(f"{task}: round n-1's model on round n's test episodes, predicted steps (per agent step)")
    print(f"{'round':>5} {'source':>7} {'windows':>7} {'reward':>8} {'predicted':>9} {'MSE/var':>8}")
    for r in records:
        print(f"{r['round']:>5} {r['source']:>7} {r['windows']:>7} {r['reward']:8.3f} {r['predicted']:9.3f} "
              f"{r['mse_over_variance']:8.2f}")  # fmt: skip
    print(f"wrote {args.out / DIAGNOSIS_FILE}")
    return records


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
