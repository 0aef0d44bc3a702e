"""Does a world model know what the actions do? It ranks action sequences, and the real task checks the ranking.

    python downstream/action_ranking.py --run runs/loop/cartpole/round-00/world_model --task cartpole

An agent trained in imagination can only learn what the model's rewards say about its actions. From each of
``--contexts`` real test episodes, the model observes the first 8 frames (where the real evaluation hands over to
the agent after its random warm-up: the recorded actions fill it), then ``--sequences`` action sequences of
``--horizon`` agent steps (uniform random, the first one all zeros) are scored twice:

    imagined   the reward predictor's rewards summed over the prior's hidden states under those actions
               (as the imagination envs give them: the reward of step t is read from the state that predicts t+1);
    real       the same actions replayed in the simulator from the episode's seed after its recorded warm-up.

Printed and written to ``<run>/action_ranking/<task>.json`` (or ``--out``):

    rank correlation   per context, Spearman's between imagined and real returns over the sequences, mean and
                       median (1: the model orders the futures as the task does; 0: it cannot tell them apart);
    pooled             Pearson's over every (context, sequence) pair, which is mostly where each context stands;
    real spread        the real returns' std within a context: how much the actions can change in the horizon;
    gain of the model's pick   the real return of the sequence the model ranks first, minus the context's
                       mean real return, beside the gain of the truly best sequence (what a perfect ranking gets).

A low rank correlation with a real spread well above zero says that the agent's training signal in
imagination is mostly noise, whatever the reward predictor's error on random windows.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np
import torch
from tqdm.auto import tqdm

from envs.imagination_models import load_imagination_models
from envs.simulator import Simulator
from worldmodel import storage
from worldmodel.atomic import atomic_write_text
from worldmodel.config import OBSERVED_STEPS
from worldmodel.errors import InputError, check_options, run_cli
from worldmodel.model import WorldModel
from worldmodel.reward import RewardPredictor
from worldmodel.tasks import MAX_ACTION_DIM, get_task

RESULTS_DIR = "action_ranking"


@dataclass(frozen=True)
class Args:
    run: Path = Path("runs/world_model")
    """World-model run directory (with reward_predictors/<task>.pt, e.g. a round of downstream/loop.py)."""
    task: str = "cartpole"
    """One task: acrobot, cartpole, cheetah, reacher, walker-stand or walker-walk."""
    data: Path | None = None
    """Dataset directory whose test episodes give the contexts; default the one recorded in the checkpoint."""
    contexts: int = 32
    """Test episodes, each giving one context (its first 8 frames)."""
    sequences: int = 16
    """Action sequences scored per context (the first all zeros, the others uniform random)."""
    horizon: int = 12
    """Agent steps per sequence (12: the imagined episodes of downstream/rl.py)."""
    seed: int = 0
    """Seeds the choice of episodes, the action sequences and the prior samples."""
    device: str = "cpu"
    """Device of the world model: 'cpu', 'cuda' or 'auto'."""
    out: Path | None = None
    """The JSON file to write; default <run>/action_ranking/<task>.json."""


class ContextScores(NamedTuple):
    imagined: np.ndarray  # (K,) imagined returns of the sequences
    real: np.ndarray  # (K,) real returns of the same sequences


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``values`` (n,), tied values sharing the mean of their ranks."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    _, groups = np.unique(values, return_inverse=True)
    return (np.bincount(groups, weights=ranks) / np.bincount(groups))[groups]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two (n,) arrays; NaN where either is constant."""
    ranks_a, ranks_b = average_ranks(a), average_ranks(b)
    if ranks_a.std() == 0 or ranks_b.std() == 0:
        return float("nan")
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def action_sequences(rng: np.random.Generator, count: int, horizon: int, action_dim: int) -> np.ndarray:
    """(count, horizon, action_dim) float32: all zeros first, then uniform random in [-1, 1]."""
    sequences = rng.uniform(-1.0, 1.0, (count, horizon, action_dim)).astype(np.float32)
    sequences[0] = 0.0
    return sequences


def real_returns(simulator: Simulator, seed: int, warmup: np.ndarray, sequences: np.ndarray) -> np.ndarray:
    """(K,) the real return of each sequence, played after the recorded warm-up actions (n, A) from ``seed``."""
    returns = []
    for sequence in sequences:
        simulator.reset(seed)
        for action in warmup:
            simulator.step_reward(action)
        returns.append(sum(simulator.step_reward(action) for action in sequence))
    return np.asarray(returns)


@torch.no_grad()
def imagined_returns(
    model: WorldModel,
    predictor: RewardPredictor,
    frames: np.ndarray,
    states: np.ndarray,
    warmup: np.ndarray,
    sequences: np.ndarray,
) -> np.ndarray:
    """(K,) imagined returns: frames (n, 64, 64, 3) uint8 (or, for the state-space bound, their true states (n, D))
    observed through the posterior with the warm-up actions (n-1, A) between them, then each sequence (K, H, A)
    through the prior."""
    count, horizon, action_dim = sequences.shape
    observed = frames.shape[0]
    device = next(model.parameters()).device
    actions = np.zeros((count, observed - 1 + horizon, MAX_ACTION_DIM), np.float32)  # actions[:, t] applied at t
    actions[:, : observed - 1, :action_dim] = warmup
    actions[:, observed - 1 :, :action_dim] = sequences
    actions_t = torch.from_numpy(actions).to(device)
    batch_frames = torch.from_numpy(frames).to(device)[None].expand(count, *frames.shape)
    batch_states = torch.from_numpy(states).to(device)[None].expand(count, *states.shape)
    keypoints = model.perceive(batch_frames, batch_states)  # (K, n, K', 3)
    filtered = model.observe(keypoints, actions_t[:, :observed])  # the last observed action is unused there
    imagined = model.imagine(filtered.final, actions_t[:, observed - 1 :])  # hidden predicts frames n .. n+H-1
    hidden = torch.cat([filtered.hidden, imagined.hidden], 1)  # (K, n+H, H'): index t predicts frame t
    rewards, _ = predictor(hidden)  # rewards[:, t]: the step into frame t
    return rewards[:, observed:].sum(1).float().cpu().numpy()


def summarize(scores: list[ContextScores]) -> dict[str, Any]:
    correlations = np.array([rank_correlation(s.imagined, s.real) for s in scores])
    imagined = np.concatenate([s.imagined for s in scores])
    real = np.concatenate([s.real for s in scores])
    return {
        "contexts": len(scores),
        "rank_correlation_mean": float(np.nanmean(correlations)),
        "rank_correlation_median": float(np.nanmedian(correlations)),
        "pooled_correlation": float(np.corrcoef(imagined, real)[0, 1]),
        "real_return_mean": float(real.mean()),
        "imagined_return_mean": float(imagined.mean()),
        "real_spread": float(np.mean([s.real.std() for s in scores])),
        "gain_of_models_pick": float(np.mean([s.real[s.imagined.argmax()] - s.real.mean() for s in scores])),
        "gain_of_best": float(np.mean([s.real.max() - s.real.mean() for s in scores])),
        "rank_correlations": [None if np.isnan(c) else float(c) for c in correlations],  # None: a constant return
    }


def main(args: Args) -> dict[str, Any]:
    spec = get_task(args.task, option="--task")
    check_options(args, 1, "contexts", "horizon")
    check_options(args, 2, "sequences")
    models = load_imagination_models(args.task, args.run, device=args.device, allow_state_bound=True)
    data = args.data or models.dataset
    if data is None:
        raise InputError(f"the checkpoint {models.checkpoint} records no dataset; pass --data <dataset dir>")
    info = storage.checked_dataset(data, args.task, "test")  # the main file: random actions (parts are separate)
    if info.episode_steps < OBSERVED_STEPS - 1 + args.horizon:
        raise InputError(f"--horizon {args.horizon} needs episodes of {OBSERVED_STEPS - 1 + args.horizon} steps, "
                         f"{info.path} has {info.episode_steps}: give a shorter --horizon")  # fmt: skip
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)  # the prior samples
    episodes = np.sort(rng.choice(info.num_episodes, min(args.contexts, info.num_episodes), replace=False))
    warmup_length = OBSERVED_STEPS - 1
    simulator = Simulator(args.task, action_repeat=models.action_repeat)
    scores = []
    with storage.open_dataset(info.path) as file:
        for episode in tqdm(episodes, desc=f"action ranking {args.task}", unit="context"):
            sequences = action_sequences(rng, args.sequences, args.horizon, spec.action_dim)
            frames = file["frames"][episode, :OBSERVED_STEPS]
            states = file["states"][episode, :OBSERVED_STEPS]
            warmup = file["actions"][episode, :warmup_length]
            seed = int(file["episode_seeds"][episode])
            model, predictor = models.world_model, models.reward_predictor
            imagined = imagined_returns(model, predictor, frames, states, warmup, sequences)
            scores.append(ContextScores(imagined, real_returns(simulator, seed, warmup, sequences)))
    simulator.close()
    result = {"task": args.task, "run": str(args.run), "data": str(data), "sequences": args.sequences,
              "horizon": args.horizon, "seed": args.seed, **summarize(scores)}  # fmt: skip
    out = args.out or models.checkpoint.parent / RESULTS_DIR / f"{args.task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"{args.task}: {len(scores)} contexts x {args.sequences} sequences of {args.horizon} steps")
    print(f"  rank correlation imagined vs real, per context: mean {result['rank_correlation_mean']:.2f}, "
          f"median {result['rank_correlation_median']:.2f} (pooled over contexts {result['pooled_correlation']:.2f})")
    print(f"  real return {result['real_return_mean']:.2f} (spread within a context {result['real_spread']:.2f}), "
          f"imagined {result['imagined_return_mean']:.2f}")
    print(f"  gain over the context's mean: the model's pick {result['gain_of_models_pick']:.2f}, "
          f"the best sequence {result['gain_of_best']:.2f}")
    print(f"wrote {out}")
    return result


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
