"""The planner's cost per real step (worldmodel/planning.py), fp32 against bf16 and 256 against 128 candidates,
timed in turns in one run, and how closely bf16 rollouts score the same candidates as fp32 ones.

    python tests/bench/bench_plan.py                                   # cpu-profile sizes, untrained
    python tests/bench/bench_plan.py --run runs/struct_cheetah --task cheetah --threads 1

Prints the CPU (model name, vector ISA, native bf16 or not), what ``precision='auto'`` chooses on it, the
seconds per planned step (``CEMPlanner.plan``: ``iterations`` batches of ``candidates`` x ``horizon`` imagined
steps) for each setting, and, for one batch of candidates from a state the model reached, the agreement of
bf16's imagined returns with fp32's: rank correlation and how many of fp32's elites bf16 also picks. Speed
depends on the sizes, not on the weights, so without ``--run`` the model is the ``cpu`` profile's, untrained,
with a random reward head (its agreement figures then say little: use a trained run for those).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from envs.imagination_models import load_imagination_models
from worldmodel.config import ModelConfig  # noqa: E402
from worldmodel.model import WorldModel  # noqa: E402
from worldmodel.planning import CEMPlanner, PlannerConfig, imagined_returns, repeat_carry  # noqa: E402
from worldmodel.precision import cpu_info  # noqa: E402
from worldmodel.reward import RewardPredictor  # noqa: E402
from worldmodel.tasks import get_task  # noqa: E402


def models(run: Path | None, task: str) -> tuple[WorldModel, RewardPredictor, str]:
    if run is not None:
        loaded = load_imagination_models(task, run, device="cpu")
        return loaded.world_model, loaded.reward_predictor, f"{loaded.checkpoint} ({task})"
    torch.manual_seed(0)
    model = WorldModel(ModelConfig.cpu()).eval()
    predictor = RewardPredictor(model.dynamics.hidden_size).eval()
    torch.nn.init.normal_(predictor.dense_out.weight)  # an untrained head is zero: every candidate would tie
    return model, predictor, "the cpu profile's sizes, untrained"


@torch.inference_mode()
def a_reached_state(model: WorldModel, action_dim: int, steps: int = 8) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A carry (batch 1) after ``steps`` imagined steps of random actions, and the hidden states that led there."""
    generator = torch.Generator().manual_seed(1)
    core = model.dynamics
    carry = core.initial_carry(1, torch.device("cpu"))
    hidden = []
    for _ in range(steps):
        action = torch.zeros(1, 6)
        action[:, :action_dim] = torch.rand(1, action_dim, generator=generator) * 2 - 1
        hidden.append(core.hidden_state(carry)[0])
        carry = core.imagine_step(carry, action, noise=torch.randn(1, 1, core.noise_size, generator=generator)).carry
    return carry, torch.stack(hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="a trained run with the task's reward predictor")
    parser.add_argument("--task", default="cheetah", help="the task whose action size (and reward predictor) to use")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a collection worker uses one)")
    parser.add_argument("--plans", type=int, default=5, help="planned steps timed per setting and turn")
    parser.add_argument("--turns", type=int, default=3, help="turns over the settings (the best turn counts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, predictor, description = models(args.run, args.task)
    action_dim = get_task(args.task).action_dim
    carry, context = a_reached_state(model, action_dim)
    info = cpu_info()
    print(f"{info.name} ({info.capability}), native bf16: {'yes' if info.native_bf16 else 'no'}; torch "
          f"{torch.__version__}, {args.threads} thread(s); model: {description}")
    auto = CEMPlanner(model, predictor, action_dim, PlannerConfig()).precision(torch.device("cpu"))
    print(f"precision 'auto': {auto.reason}")

    settings = [(candidates, precision) for candidates in (256, 128) for precision in ("fp32", "bf16")]
    best = {setting: float("inf") for setting in settings}
    for _ in range(args.turns):
        for candidates, precision in settings:
            config = PlannerConfig(candidates=candidates, elites=candidates // 8, precision=precision)  # type: ignore[arg-type]
            planner = CEMPlanner(model, predictor, action_dim, config, seed=0)
            planner.plan(carry, context)  # warm-up
            start = time.perf_counter()
            for _ in range(args.plans):
                planner.plan(carry, context)
            best[(candidates, precision)] = min(best[(candidates, precision)], (time.perf_counter() - start) / args.plans)
    baseline = best[(256, "fp32")]
    print("seconds per planned step (horizon 12, 4 refits), best of the turns:")
    for (candidates, precision), seconds in best.items():
        marker = "  <- auto" if precision == auto.dtype and candidates == 256 else ""
        print(f"  {candidates:4d} candidates, {precision}: {seconds:.3f} s ({baseline / seconds:.2f}x 256 fp32){marker}")

    generator = torch.Generator().manual_seed(2)
    sequences = (torch.randn(256, 12, action_dim, generator=generator) * 0.6).clamp(-1, 1)
    noise = torch.randn(1, 12, model.dynamics.noise_size, generator=generator)
    returns = {bf16: imagined_returns(model, predictor, repeat_carry(carry, 1), context, sequences, noise, bf16)
               for bf16 in (False, True)}  # fmt: skip
    ranks = {key: value.argsort().argsort().float() for key, value in returns.items()}
    correlation = torch.corrcoef(torch.stack([ranks[False], ranks[True]]))[0, 1].item()
    elites = {key: set(value.topk(32).indices.tolist()) for key, value in returns.items()}
    error = (returns[True] - returns[False]).abs().max().item()
    print(f"bf16 against fp32 on 256 candidates: rank correlation {correlation:.4f}, {len(elites[False] & elites[True])} "
          f"of fp32's 32 elites also bf16's, largest return difference {error:.4f} (returns span "
          f"{returns[False].min().item():.3f} to {returns[False].max().item():.3f})")


if __name__ == "__main__":
    main()
