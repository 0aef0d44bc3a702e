"""Act on the real task by planning in the world model (the cross-entropy method), beside a random policy.

    python downstream/plan.py --run runs/world_model --task cartpole --episodes 10

No agent is trained: at every real step the planner (``worldmodel.planning.CEMPlanner``) imagines
``--planner.candidates`` action sequences of ``--planner.horizon`` steps from the filter's state after the current
real frame, scores them with the task's reward predictor, refits its sampling distribution to the best
``--planner.elites`` ``--planner.iterations`` times and takes the first action of the result. The real task is
seen through the model as the agents of ``downstream/rl.py`` see it (``envs.through_model.RealTaskThroughModel``: real
frames -> detect -> the last 8 frames filtered afresh, after a 7-step warm-up of zero actions by default:
``--planner.warmup``, ``--no-refilter``), and the same episode seeds give the random policy's returns (random
throughout, warm-up included). Printed, and written to ``<run>/planning/<task>-cem.json`` (or into ``--out``):
the real returns (mean ± std), the imagined return of the plans (the elites' mean over the horizon, per planned step)
and the seconds per planned step; beside it ``<task>-cem.planner.json``, the planner's settings, with which
``collect/dmcs.py --policy`` collects episodes (and ``--gif``: one real episode beside the model's imagination).

The world model and its reward predictor are loaded as by the imagination envs: ``--run`` a run directory
(or checkpoint file) with ``reward_predictors/<task>.pt`` (``python downstream/reward.py``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np
import torch

from downstream import rl
from envs.imagination_models import ImaginationModels, load_imagination_models
from envs.through_model import RealTaskThroughModel
from worldmodel.atomic import atomic_write_text
from worldmodel.devices import cpu_threads
from worldmodel.errors import check_options, run_cli
from worldmodel.planning import CEMPlanner, PlannerConfig, save_planner
from worldmodel.tasks import get_task

RESULTS_DIR = "planning"  # the default --out: <run>/planning


@dataclass(frozen=True)
class Args:
    run: Path = Path("runs/world_model")
    """World-model run directory or checkpoint file (with reward_predictors/<task>.pt)."""
    task: str = "cartpole"
    """One task: acrobot, cartpole, cheetah, reacher, walker-stand or walker-walk."""
    episodes: int = 10
    """Real episodes for the planner and for the random policy each."""
    planner: PlannerConfig = PlannerConfig()
    """The planner's settings (worldmodel.planning.PlannerConfig): --planner.horizon, --planner.candidates, ..."""
    refilter: bool = True
    """Plan from the last 8 real frames filtered afresh, as an imagined episode's context is (--no-refilter: from one filter over the whole episode, as before 2026-12-04)."""
    threads: int | None = None
    """torch CPU threads while planning; default torch's."""
    gif: bool = False
    """Write a GIF of one real episode under the planner beside the model's open-loop imagination of it."""
    seed: int = 0
    """Seeds the real episodes (as downstream/rl.py's evaluation), the planner's draws and the random policy."""
    device: str = "cpu"
    """Device of the world model: 'cpu', 'cuda' or 'auto'."""
    out: Path | None = None
    """Folder of the results: <task>-cem.json (returns), <task>-cem.planner.json (the planner's settings, which
    collect/dmcs.py --policy acts with) and the GIF; default <run>/planning."""


class PlanningPolicy:
    """A ``downstream.rl.RealPolicy`` that plans each action, and records its plans' imagined returns."""

    def __init__(self, planner: CEMPlanner, threads: int | None) -> None:
        self.planner, self.threads = planner, threads
        self.imagined: list[float] = []  # the elites' mean imagined return, per planned step
        self.seconds = 0.0

    def __call__(self, env: RealTaskThroughModel, observation: np.ndarray, started: bool) -> np.ndarray:
        if started:
            self.planner.reset()
        start = time.perf_counter()
        with cpu_threads(self.threads, env.models.device):
            plan = self.planner.plan(env.carry, env.context_hidden)
        self.seconds += time.perf_counter() - start
        self.imagined.append(plan.imagined_return)
        return plan.action


class PlanResults(NamedTuple):
    report: rl.Report  # its "agent" is the planner file, its imagined return the plans' (per step)
    seconds_per_step: float  # planning time per real step


def plan_and_evaluate(
    models: ImaginationModels, config: PlannerConfig, out: Path, episodes: int, seed: int,
    gif: bool = False, threads: int | None = None, refilter: bool = True,
) -> PlanResults:
    """Write the planner file, plan ``episodes`` real episodes (and as many random ones, from the same starts),
    write the results."""
    task = models.task
    out.mkdir(parents=True, exist_ok=True)
    planner_path, results_path = out / f"{task}-cem.planner.json", out / f"{task}-cem.json"
    save_planner(planner_path, config)
    torch.manual_seed(seed)
    planner = CEMPlanner(models.world_model, models.reward_predictor, get_task(task).action_dim, config, seed)
    precision = planner.precision(models.device)
    print(f"planning: {precision.reason}", file=sys.stderr)
    policy = PlanningPolicy(planner, threads)
    planned = rl.real_episode_returns(models, task, seed, episodes, policy, label="planner",
                                      warmup_actions=config.warmup, refilter=refilter)  # fmt: skip
    random = rl.real_episode_returns(models, task, seed, episodes, None)
    imagined = rl.summarize(policy.imagined)
    gif_path = out / f"{task}-cem.gif" if gif else None
    if gif_path is not None:
        rl.write_gif(gif_path, models, PlanningPolicy(planner, threads), task, seed, warmup_actions=config.warmup,
                     refilter=refilter)  # fmt: skip
    record = {
        "task": task, "planner": asdict(config), "episodes": episodes, "seed": seed, "refilter": refilter,
        "world_model": {"checkpoint": str(models.checkpoint), "fingerprint": models.fingerprint},
        "action_repeat": models.action_repeat,
        "real_planner": planned._asdict(), "real_random": random._asdict(),
        "imagined_plan_return_mean": imagined.mean, "imagined_plan_return_std": imagined.std,
        "seconds_per_step": policy.seconds / max(len(policy.imagined), 1),
        "precision": precision.dtype, "precision_reason": precision.reason,
    }  # fmt: skip
    atomic_write_text(results_path, json.dumps(record, indent=1) + "\n")
    report = rl.Report(planner_path, results_path, gif_path, planned, random, imagined._replace(values=[]))
    return PlanResults(report, record["seconds_per_step"])


def main(args: Args) -> rl.Report:
    get_task(args.task, option="--task")
    check_options(args, 1, "episodes")
    config = args.planner
    config.check()
    models = load_imagination_models(args.task, args.run, device=args.device)
    out = args.out or models.checkpoint.parent / RESULTS_DIR
    report, seconds = plan_and_evaluate(models, config, out, args.episodes, args.seed, args.gif, args.threads,
                                        args.refilter)  # fmt: skip
    planned, random = report.real_agent, report.real_random
    print(f"\n{args.task}: real returns over {args.episodes} episodes (mean ± std)")
    print(f"  planner ({config.candidates} x {config.horizon} steps, {config.iterations} refits)  "
          f"{planned.mean:9.2f} ± {planned.std:.2f}")
    print(f"  random policy                               {random.mean:9.2f} ± {random.std:.2f}")
    print(f"  imagined return of the plans ({config.horizon} steps)     {report.imagined_agent.mean:9.2f}")
    print(f"  {seconds:.3f} s per planned step")
    print(f"wrote {report.results_path}, {report.agent_path}" + (f", {report.gif_path}" if report.gif_path else ""))
    return report


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
