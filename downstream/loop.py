"""Model-based RL on the real task: rounds of collecting with the agent, refining the world model, refitting the
reward, training the agent in imagination and evaluating it on the real task.

    python downstream/loop.py --task cheetah --rounds 5 --checkpoint runs/world_model --out runs/loop/cheetah

Round 0 starts from a trained world model (``--checkpoint``, copied into ``<out>/round-00/world_model``) and the
random dataset it was trained on (``--data``, default the folder its checkpoint names):

    reward   fit the task's reward predictor on the model's hidden states of ``--reward-windows`` test windows
             (``worldmodel.hidden_states``: 8 frames filtered, 12 predicted open loop, as downstream/reward.py)
             into ``<run>/reward_predictors/<task>.pt``, where every tool looks for it;
    agent    train a new agent in imagination (with ``--keep-agent``, from round n-1's agent's weights) and
             evaluate it on the real task beside random actions (downstream/rl.py into ``round-NN/rl``; the
             last round also writes its GIF, real beside imagined).

Every later round n first runs

    collect  ``--train-episodes`` + ``--test-episodes`` real episodes acted by round n-1's agent (its
             deterministic action plus Gaussian noise ``--noise``; collect/agent.py) as the dataset part
             ``loop-rNN`` of each split;
    refine   fine-tune round n-1's dynamics core on all the task's data so far (train/world_model.py
             ``--init-from``): the random episodes and every round's agent episodes. The detector, appearance
             net and reconstructor stay round 0's: the vision stage is most of a CPU training's time and the
             agent's frames show the same bodies in the same scenes, so a new detector would cost the budget of
             several rounds for little; what the agent changes is which states and actions the data visits,
             which is what the dynamics learn. The KL term is not warmed up again (the core already fits its
             prior), and the learning rate starts at ``--refine-learning-rate``;

then ``reward`` and ``agent`` on the refined model. With ``--algo cem`` no agent is trained: the ``agent`` phase writes
the round's planner file and evaluates planning in the round's model (downstream/plan.py), and the next round
collects with that planner (each action planned in the model it names; collect/agent.py). Train parts feed the
dynamics; test parts feed the reward fit and the imagined episodes' starting windows (the reward experiment's protocol fits on test windows, which
the dynamics never trained on), so both splits get agent episodes. ``--context simulator`` starts the imagined
episodes from the real task's initial states instead.

Data: the loop works in its own folder ``<out>/data``: links to the task's files of ``--data`` plus the parts it
collected, so the random dataset is never written to and other experiments on it are unaffected. A file there
that the loop did not make is refused (it would mix foreign episodes into the refinement).

Output in ``--out``: ``loop.json`` (the settings and which phases of which rounds are done; written atomically
after every phase), ``rounds.jsonl`` (one line per finished round: real return mean and std of the agent and of
random actions over ``--eval-episodes`` real episodes, the agent's imagined return, the data so far, wall time
per phase), ``returns.png`` (real return against the control steps collected, random as a reference) and
``last_round.gif``. The data is counted twice: ``real_env_steps``, the agent steps (one action each) of all the
task's data the models learn from, the random dataset's included; ``collected_control_steps``, the simulator
steps of the loop's own episodes (``action_repeat`` per agent step), the unit of model-based RL budgets such as
"100k environment steps". Evaluation episodes are not counted.

Resume: rerun the same command. Finished rounds and phases are skipped; an interrupted phase continues where it
stopped (the collector's partial episodes, the trainer's checkpoint, rl.py's PPO snapshots; the reward fit is
short and runs again, with the same result). A rerun with other settings is refused in one line; only
``--rounds`` (to extend a finished loop), ``--workers`` and ``--eval-episodes`` may change. Wall time counts each phase's finishing
invocation: time spent in an interrupted attempt is not in it.

Time (measured 2026-12-02 for cheetah with `runs/struct_vrnn`, the ``cpu`` profile's model, these defaults and
``--workers 2``, on 2 free cores of a Xeon with native bf16): rounds 1-5 took 457-549 s each:
collect 16 episodes of 250 steps 35-88 s, refine 211-229 s (detection of the new frames and 2,000 dynamics
steps), reward 38-51 s, agent 140-205 s (100k imagined PPO steps at ~1,000 steps/s, then the real evaluation
episodes: 5 + 5 in rounds 1-4, 10 + 10, the default now, from round 5).
Round 0 is the reward and agent phases only (with ``--first-refine-steps N``, a refine phase before them: the
given model's dynamics fine-tuned on the task's random data for N steps, as train/world_model.py --init-from does). Cartpole's rounds (125-step episodes) took 333-402 s. The
default 5 rounds: about 50 min here for cheetah; without native bf16 the
detection in refine and reward runs in fp32 and takes longer (not measured). Beside other jobs on the same
cores it is far slower (round 0 took 3,883 s while two other jobs ran): torch's threads wait on each other
when the cores are shared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from tqdm.auto import tqdm

from collect.dmcs import collect_with_policy
from downstream import plan, rl
from envs.imagination_models import REWARD_PREDICTOR_DIR, load_imagination_models
from train import world_model as trainer
from worldmodel import storage
from worldmodel.atomic import atomic_write, atomic_write_text
from worldmodel.checkpoint import CHECKPOINT_FILE, CheckpointError, find_checkpoint, load_checkpoint, load_world_model
from worldmodel.config import STATE_VARIANT
from worldmodel.devices import resolve_device
from worldmodel.errors import InputError, check_options, run_cli
from worldmodel.fingerprint import model_fingerprint
from worldmodel.hidden_states import extract_window_features
from worldmodel.machine import available_cores
from worldmodel.options import changed_options, plain_options
from worldmodel.planning import PlannerConfig
from worldmodel.precision import DynamicsPrecision
from worldmodel.reward import RewardTrainConfig, fit_reward_predictor, save_reward_predictor
from worldmodel.tasks import get_task
from worldmodel.train_config import config_from_dict

STATE_FILE = "loop.json"
ROUNDS_FILE = "rounds.jsonl"
PLOT_FILE = "returns.png"
GIF_FILE = "last_round.gif"
DATA_DIR = "data"
RL_DIR = "rl"  # a round's downstream/rl.py --out
FIRST_PHASES = ("reward", "agent")  # round 0: the given world model (refined first with --first-refine-steps)
PHASES = ("collect", "refine", "reward", "agent")
STATE_FORMAT = 1
PART_PREFIX = "loop-r"  # round n's episodes: the dataset part loop-rNN


@dataclass(frozen=True)
class Args:
    task: str = "cheetah"
    """One task: acrobot, cartpole, cheetah, reacher, walker-stand or walker-walk."""
    rounds: int = 5
    """Rounds after round 0, each collecting real episodes with the latest agent. A finished loop rerun with more rounds continues."""
    checkpoint: Path = Path("runs/world_model")
    """The trained world model to start from (run directory or checkpoint file of train/world_model.py)."""
    data: Path | None = None
    """The random dataset of the task; default the folder the world model was trained on. It is only read."""
    out: Path = Path("runs/loop")
    """The loop's folder: its data, one folder per round, loop.json, rounds.jsonl, returns.png, last_round.gif."""
    train_episodes: int = 12
    """Real episodes per round for the dynamics (the train part)."""
    test_episodes: int = 4
    """Real episodes per round for the reward fit and the imagined episodes' starting windows (the test part)."""
    noise: float = 0.3
    """Std of the Gaussian exploration noise added to the agent's actions while collecting."""
    refine_steps: int = 2_000
    """Dynamics fine-tuning steps per round."""
    refine_learning_rate: float = 3e-4
    """Initial learning rate of the fine-tuning (halved on the run's schedule)."""
    first_refine_steps: int = 0
    """Round 0 first fine-tunes the given model's dynamics on the task's random data for this many steps, with the
    run's own training settings (train/world_model.py --init-from CHECKPOINT --tasks TASK --dynamics-steps N); 0: round
    0 uses the given model as it is. A model trained on six tasks may not know what one task's actions do
    (downstream/action_ranking.py; docs/RESULTS.md)."""
    reward_windows: int = 2_000
    """Test windows (length 20) the reward predictor is fit on each round."""
    reward_epochs: int = 30
    """Maximum epochs of the reward fit (early stopping on held-out episodes usually ends sooner)."""
    algo: Literal["ppo", "sac", "cem"] = "ppo"
    """Agent algorithm (downstream/rl.py); PPO training resumes exactly after a kill, SAC's starts over. 'cem': no agent is trained; every real action (collection and evaluation) is planned in the round's model (downstream/plan.py, worldmodel/planning.py) over --horizon steps."""
    plan_candidates: int = 256
    """With --algo cem: action sequences imagined per refit (the best eighth are the elites)."""
    plan_iterations: int = 4
    """With --algo cem: refits per real step."""
    plan_precision: DynamicsPrecision = "auto"
    """With --algo cem: number format of the imagined rollouts ('auto': bf16 where the hardware runs it natively and the core is wide; worldmodel/planning.py)."""
    rl_steps: int = 100_000
    """Imagined steps the agent trains for each round, on that round's model."""
    keep_agent: bool = False
    """Each round's agent starts from the previous round's (its weights and optimizer state) instead of a new one."""
    num_envs: int = 16
    """Imagined episodes stepped together."""
    horizon: int | None = 12
    """Imagined steps per training episode (downstream/rl.py --horizon); with --algo cem, the planning horizon."""
    context: Literal["dataset", "simulator"] = "dataset"
    """Where imagined episodes start: test windows of the loop's data (random and agent episodes), or the real task's initial states."""
    start_share: float = 0.0
    """Share of the imagined episodes (dataset contexts) that start from an episode's first frames, the real task's initial states (downstream/rl.py --start-share)."""
    observe_keypoints: bool = False
    """The agent sees the current frame's keypoints beside the hidden state (downstream/rl.py --observe-keypoints): the hidden state that predicts frame t has seen frames up to t-1 only."""
    eval_episodes: int = 10
    """Real episodes for the agent and for random actions each, per round (may change on a rerun; each round's line records its number)."""
    seed: int = 0
    """Seeds the collection, the reward fit and the agent (the real evaluation starts are the same every round)."""
    device: str = "cpu"
    """Device of the world model's training and imagination: 'cpu', 'cuda' or 'auto'."""
    workers: int = field(default_factory=available_cores)
    """Collector processes."""


# Change nothing a round computes (the evaluation's episode count changes only how precisely it is measured).
RESUME_FREE_OPTIONS = frozenset({"rounds", "out", "workers", "eval_episodes"})
# Options whose default changed the behaviour when they were added: what a loop started before them did.
OPTIONS_BEFORE_THEY_EXISTED: dict[str, Any] = {"plan_precision": "fp32"}


def check_args(args: Args) -> None:
    """InputError for options that cannot run (models and data are checked where they are read)."""
    get_task(args.task, option="--task")
    check_options(args, 0, "rounds", "train_episodes", "test_episodes", "first_refine_steps")
    check_options(args, 1, "refine_steps", "reward_windows", "reward_epochs", "rl_steps", "num_envs", "eval_episodes", "workers")
    if args.train_episodes < 1 and args.rounds > 0:
        raise InputError("--train-episodes must be positive: each round refines the dynamics on new episodes")
    if not args.refine_learning_rate > 0:
        raise InputError(f"--refine-learning-rate must be positive, got {args.refine_learning_rate}")
    if not 0.0 <= args.start_share <= 1.0:  # also refuses nan
        raise InputError(f"--start-share must be a fraction in [0, 1], got {args.start_share}")
    if not (args.noise >= 0 and math.isfinite(args.noise)):
        raise InputError(f"--noise must be a finite std >= 0, got {args.noise}")
    check_options(args, 0, "seed")
    if args.algo == "cem":
        if args.horizon is None:
            raise InputError("--horizon is the planning horizon with --algo cem: give a number of steps")
        planner_config(args).check()
        if args.keep_agent or args.observe_keypoints:
            raise InputError("--keep-agent and --observe-keypoints go with a trained agent (ppo, sac), not --algo cem")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file, not a folder; choose another --out")


# ---------------------------------------------------------------------------------------------------
# The loop's state: settings and the phases done, in <out>/loop.json


@dataclass
class LoopState:
    settings: dict[str, Any]
    done: dict[int, list[str]] = field(default_factory=dict)  # round -> finished phases, in order
    seconds: dict[int, dict[str, float]] = field(default_factory=dict)  # round -> phase -> wall seconds
    results: list[dict[str, Any]] = field(default_factory=list)  # one record per finished round

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "settings": self.settings,
                "done": {str(key): value for key, value in self.done.items()},
                "seconds": {str(key): value for key, value in self.seconds.items()}, "results": self.results}  # fmt: skip

    @staticmethod
    def from_dict(values: dict[str, Any]) -> LoopState:
        return LoopState(values["settings"], {int(key): list(value) for key, value in values["done"].items()},
                         {int(key): dict(value) for key, value in values["seconds"].items()}, list(values["results"]))  # fmt: skip

    def save(self, out: Path) -> None:
        atomic_write_text(out / STATE_FILE, json.dumps(self.to_dict(), indent=2) + "\n")


def loop_settings(args: Args, source: Path, data: Path, files: list[storage.DatasetInfo]) -> dict[str, Any]:
    """What decides the loop's results: the options (less RESUME_FREE_OPTIONS), the resolved inputs and the
    random dataset's files of the task (a file added there later would enter the refinement unasked)."""
    options = plain_options(args)
    kept = {key: options[key] for key in sorted(options) if key not in RESUME_FREE_OPTIONS}
    if args.algo != "cem":  # an agent's loop never plans: its precision must not refuse a loop started before it
        del kept["plan_precision"]
    layout = [[info.path.name, info.num_episodes, info.episode_steps] for info in files]
    return {**kept, "checkpoint": str(source), "data": str(data), "random_files": layout}


def load_state(args: Args, settings: dict[str, Any]) -> LoopState:
    """The loop's state in --out (new if none); InputError where it holds a loop of other settings."""
    path = args.out / STATE_FILE
    if not path.is_file():
        return LoopState(settings)
    try:
        values = json.loads(path.read_text())
        if values.get("format") != STATE_FORMAT:
            raise ValueError(f"format {values.get('format')}")
        state = LoopState.from_dict(values)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{path} is unreadable ({error}); restore it, or choose another --out") from None
    # An option added after the loop was started is not in its file: the behaviour before it stands in.
    defaults = {key: value for key, value in {**plain_options(Args()), **OPTIONS_BEFORE_THEY_EXISTED}.items()
                if key in settings}  # fmt: skip
    differences = changed_options(state.settings, settings, defaults, RESUME_FREE_OPTIONS)
    if differences:
        found = ", ".join(f"{key}={state.settings.get(key, defaults.get(key))!r}" for key in differences)
        raise InputError(f"{args.out} holds a loop with other settings ({found}): rerun with those, or choose "
                         "another --out (only --rounds, --workers and --eval-episodes may change)")  # fmt: skip
    return state


# ---------------------------------------------------------------------------------------------------
# Where things live


def round_dir(out: Path, index: int) -> Path:
    return out / f"round-{index:02d}"


def round_run(out: Path, index: int) -> Path:
    """The world model of a round (round 0: a copy of the given checkpoint)."""
    return round_dir(out, index) / "world_model"


def part_name(index: int) -> str:
    return f"{PART_PREFIX}{index:02d}"


def rl_args(args: Args, index: int) -> rl.Args:
    return rl.Args(task=args.task, algo=args.algo, steps=args.rl_steps, num_envs=args.num_envs,
                   checkpoint=round_run(args.out, index), data=args.out / DATA_DIR, context=args.context,
                   horizon=args.horizon, start_share=args.start_share, observe_keypoints=args.observe_keypoints,
                   eval_episodes=args.eval_episodes, gif=index == args.rounds,
                   out=round_dir(args.out, index) / RL_DIR, seed=args.seed, device=args.device,
                   init_agent=agent_path(args, index - 1) if args.keep_agent and index > 0 else None)  # fmt: skip


def agent_path(args: Args, index: int) -> Path:
    """The agent round ``index`` trains (downstream/rl.py's file in its --out), or its planner file (--algo cem)."""
    name = f"{args.task}-cem.planner.json" if args.algo == "cem" else f"{args.task}-{args.algo}.zip"
    return round_dir(args.out, index) / RL_DIR / name


def planner_config(args: Args) -> PlannerConfig:
    assert args.horizon is not None  # check_args
    return PlannerConfig(horizon=args.horizon, candidates=args.plan_candidates, elites=max(1, args.plan_candidates // 8),
                         iterations=args.plan_iterations, precision=args.plan_precision)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The loop's data folder: links to the random files, and the parts the loop collects


def source_files(source_data: Path, task: str) -> list[storage.DatasetInfo]:
    """The task's files of the random dataset (main files and any parts), validated."""
    return [info for split in storage.SPLITS for info in storage.checked_dataset_files(source_data, task, split)]


def link_source_data(data: Path, files: list[storage.DatasetInfo]) -> None:
    """Link the random dataset's files into the loop's folder (once; a link already there must point to its file)."""
    data.mkdir(parents=True, exist_ok=True)
    for file in (info.path for info in files):
        link = data / file.name
        if link.is_symlink() and link.resolve() == file.resolve():
            continue
        if link.exists() or link.is_symlink():
            raise InputError(f"{link} is not the link to {file} the loop made; move it out of {data}")
        os.symlink(file.resolve(), link)


def check_loop_data(data: Path, task: str, files: list[storage.DatasetInfo], rounds: int) -> None:
    """Every dataset file of the loop's folder must be a link to the random data or a part of a round up to
    ``rounds``: anything else would mix episodes of unknown settings into the refinement."""
    expected = {info.path.name for info in files} | {
        storage.dataset_path(data, task, split, part_name(index)).name
        for index in range(1, rounds + 1) for split in storage.SPLITS
    }  # fmt: skip
    for split in storage.SPLITS:
        for path in storage.dataset_files(data, task, split):
            if path.name not in expected:
                raise InputError(f"{path} was not collected by this loop: refusing to mix it into the loop's data; "
                                 f"move it out of {data}")  # fmt: skip


def real_env_steps(data: Path, task: str) -> int:
    """Agent steps of the task's episodes in the loop's data (both splits, random and collected)."""
    return sum(info.num_episodes * info.episode_steps
               for split in storage.SPLITS for info in storage.checked_dataset_files(data, task, split))  # fmt: skip


def loop_parts(data: Path, task: str) -> list[storage.DatasetInfo]:
    """The dataset parts the loop collected so far (both splits)."""
    return [info for split in storage.SPLITS for info in storage.checked_dataset_files(data, task, split)
            if info.attrs.get("part", "").startswith(PART_PREFIX)]  # fmt: skip


def agent_episodes(data: Path, task: str) -> int:
    """Episodes the loop collected so far."""
    return sum(info.num_episodes for info in loop_parts(data, task))


def collected_control_steps(data: Path, task: str) -> int:
    """Simulator (control) steps the loop collected so far: each agent step holds its action for action_repeat
    of them. The budgets of model-based RL papers (e.g. 100k environment steps) count these."""
    return sum(info.num_episodes * info.episode_steps * info.action_repeat for info in loop_parts(data, task))


# ---------------------------------------------------------------------------------------------------
# The phases


def copy_start_model(source: Path, out: Path) -> None:
    """Round 0's world model: a copy of the given checkpoint file (its reward predictor is the loop's own)."""
    target = round_run(out, 0) / CHECKPOINT_FILE
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda temp: shutil.copyfile(source, temp))


def collect(args: Args, index: int) -> None:
    """Real episodes acted by the previous round's agent, as part loop-rNN of the loop's data."""
    data = args.out / DATA_DIR
    steps = storage.checked_dataset(data, args.task, "train").episode_steps  # a part has its main file's length
    collect_with_policy(agent_path(args, index - 1), round_run(args.out, index - 1), args.task, data,
                        part=part_name(index), noise=args.noise, train_episodes=args.train_episodes,
                        test_episodes=args.test_episodes, episode_steps=steps, seed=args.seed,
                        workers=args.workers)  # fmt: skip


def refine(args: Args, index: int) -> None:
    """Fine-tune the previous round's dynamics on all the loop's data (train/world_model.py --init-from); in round 0
    (``--first-refine-steps``), the given model's on the task's random data, with that run's own settings."""
    previous = round_run(args.out, index - 1) if index > 0 else find_checkpoint(args.checkpoint).resolve()
    run = round_run(args.out, index)
    their_config = config_from_dict(load_checkpoint(previous)["train_config"])
    if index == 0:  # as train/world_model.py --init-from: the run's learning rate and KL warm-up
        schedule = {"dynamics_steps": args.first_refine_steps}
    else:  # the core already fits its prior: no KL warm-up again, a lower learning rate
        schedule = {"dynamics_steps": args.refine_steps, "learning_rate": args.refine_learning_rate, "kl_warmup_fraction": 0.0}
    config = dataclasses.replace(
        their_config, mode="staged", tasks=args.task, data=args.out / DATA_DIR, out=run, init_from=previous,
        vision_from=None, device=args.device, resume=(run / CHECKPOINT_FILE).is_file(), halt_after=None,
        progress=True, **schedule,
    )  # fmt: skip
    try:
        config, tasks = trainer.prepare(config)
    except ValueError as error:  # an InputError already says what; a ModelConfig check does not
        raise error if isinstance(error, InputError) else InputError(f"refining {previous}: {error}") from None
    trainer.run(config, tasks)


def refit_reward(args: Args, index: int) -> None:
    """Fit the task's reward predictor on the round's model, into its run directory."""
    run, device = round_run(args.out, index), resolve_device(args.device)
    loaded = load_world_model(run, device)
    features = extract_window_features(loaded.model, args.out / DATA_DIR, args.task, num_sequences=args.reward_windows,
                                       batch_size=64, seed=args.seed, device=device)  # fmt: skip
    fit = fit_reward_predictor(features.hidden, features.rewards, features.episodes,
                               RewardTrainConfig(epochs=args.reward_epochs, seed=args.seed))  # fmt: skip
    path = run / REWARD_PREDICTOR_DIR / f"{args.task}.pt"
    save_reward_predictor(path, fit.predictor, args.task, model_fingerprint(loaded.model))


def train_agent(args: Args, index: int) -> rl.Report:
    """Train and evaluate the round's agent (downstream/rl.py), or evaluate its planner (--algo cem)."""
    if args.algo != "cem":
        return rl.main(rl_args(args, index))
    models = load_imagination_models(args.task, round_run(args.out, index), device=args.device)
    return plan.plan_and_evaluate(models, planner_config(args), round_dir(args.out, index) / RL_DIR,
                                  args.eval_episodes, args.seed, gif=index == args.rounds).report  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Reports


def round_record(args: Args, index: int, report: rl.Report, seconds: dict[str, float], total: float) -> dict[str, Any]:
    data = args.out / DATA_DIR
    return {
        "round": index,
        "real_return_mean": report.real_agent.mean,
        "real_return_std": report.real_agent.std,
        "random_return_mean": report.real_random.mean,
        "random_return_std": report.real_random.std,
        "imagined_return_mean": report.imagined_agent.mean,
        "imagined_return_std": report.imagined_agent.std,
        "real_env_steps": real_env_steps(data, args.task),
        "agent_episodes": agent_episodes(data, args.task),
        "collected_control_steps": collected_control_steps(data, args.task),
        "eval_episodes": args.eval_episodes,
        "wall_seconds": round(sum(seconds.values()), 1),
        "phase_seconds": {phase: round(value, 1) for phase, value in seconds.items()},
        "total_wall_seconds": round(total, 1),
        "world_model": str(round_run(args.out, index)),
        "agent": str(report.agent_path),
    }


def write_reports(args: Args, state: LoopState) -> None:
    """rounds.jsonl and returns.png from the finished rounds (rewritten whole, atomically)."""
    lines = "".join(json.dumps(record) + "\n" for record in state.results)
    atomic_write_text(args.out / ROUNDS_FILE, lines)
    plot_returns(args.out / PLOT_FILE, state.results, args.task)


def plot_returns(path: Path, results: list[dict[str, Any]], task: str) -> None:
    """Real return (mean ± std) of each round's agent against the control steps the loop collected, random
    actions' as a reference. (The imagined return is left out: its episodes are --horizon steps long, the real
    ones the task's.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [record["collected_control_steps"] for record in results]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.errorbar(steps, [r["real_return_mean"] for r in results], yerr=[r["real_return_std"] for r in results],
                  marker="o", capsize=3, label="agent, real")  # fmt: skip
    random_mean, random_std = results[0]["random_return_mean"], results[0]["random_return_std"]
    axes.axhline(random_mean, color="gray", linestyle=":", label="random actions, real")
    axes.axhspan(random_mean - random_std, random_mean + random_std, color="gray", alpha=0.15)
    for record, x in zip(results, steps):
        axes.annotate(f"r{record['round']}", (x, record["real_return_mean"]), textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel("real control steps collected by the loop (beyond the random dataset)")
    axes.set_ylabel("episode return")
    axes.set_title(f"{task}: model-based RL rounds")
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------
# The loop


def phases_of(args: Args, index: int) -> tuple[str, ...]:
    if index > 0:
        return PHASES
    return ("refine", *FIRST_PHASES) if args.first_refine_steps > 0 else FIRST_PHASES


def main(args: Args) -> list[dict[str, Any]]:
    """Run (or continue) the loop; returns the records of every finished round. Bad input raises InputError
    before anything is written."""
    check_args(args)
    try:
        source = find_checkpoint(args.checkpoint).resolve()
        checkpoint = load_checkpoint(source)
    except CheckpointError as error:
        raise InputError(f"--checkpoint: {error}") from None
    recorded = checkpoint["dataset"]
    if checkpoint["model_config"].get("variant") == STATE_VARIANT or not checkpoint["complete"]:
        raise InputError(f"--checkpoint {source}: give a finished run of a model that sees frames (the agent acts on pixels)")
    if args.task not in (recorded.get("action_repeats") or {}):
        raise InputError(f"the world model {source} was not trained on {args.task} (its tasks: "
                         f"{', '.join(recorded.get('tasks', []))}); give a run trained on it")  # fmt: skip
    source_data = (args.data or Path(recorded.get("path", ""))).resolve()
    files = source_files(source_data, args.task)  # absent or damaged: InputError
    state = load_state(args, loop_settings(args, source, source_data, files))
    data = args.out / DATA_DIR
    link_source_data(data, files)
    if args.first_refine_steps == 0:  # otherwise round 0's refine writes its model
        copy_start_model(source, args.out)
    if not (args.out / STATE_FILE).is_file():
        state.save(args.out)  # the settings, before any phase: a rerun with others is refused from now on

    todo = [(index, phase) for index in range(args.rounds + 1) for phase in phases_of(args, index)
            if phase not in state.done.get(index, [])]  # fmt: skip
    if not todo:
        print(f"{args.out / STATE_FILE}: all {args.rounds + 1} rounds are done: nothing to do")
    total = sum(len(phases_of(args, index)) for index in range(args.rounds + 1))
    progress = tqdm(total=total, initial=total - len(todo), desc="loop phases", unit="phase", dynamic_ncols=True)
    try:
        for index, phase in todo:
            progress.set_postfix_str(f"round {index} {phase}")
            check_loop_data(data, args.task, files, index)  # the parts of rounds up to this one
            started = time.perf_counter()
            report = run_phase(args, index, phase)
            seconds = state.seconds.setdefault(index, {})
            seconds[phase] = time.perf_counter() - started
            state.done.setdefault(index, []).append(phase)
            if phase == "agent":
                assert report is not None
                elapsed = sum(sum(values.values()) for values in state.seconds.values())
                state.results = [r for r in state.results if r["round"] != index]
                state.results.append(round_record(args, index, report, seconds, elapsed))
                if report.gif_path is not None:
                    gif = report.gif_path
                    atomic_write(args.out / GIF_FILE, lambda temp: shutil.copyfile(gif, temp))
                write_reports(args, state)
                print(json.dumps(state.results[-1]))
            state.save(args.out)
            progress.update(1)
    finally:
        progress.close()
    return state.results


def run_phase(args: Args, index: int, phase: str) -> rl.Report | None:
    if phase == "collect":
        collect(args, index)
    elif phase == "refine":
        refine(args, index)
    elif phase == "reward":
        refit_reward(args, index)
    else:
        return train_agent(args, index)
    return None


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
