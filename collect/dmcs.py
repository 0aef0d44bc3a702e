"""Collect the random-action 64x64 datasets of the six DeepMind Control tasks (docs/CONTRACTS.md), or
episodes acted by a trained agent as a named part of such a dataset.

Usage (from the repository root)::

    python collect/dmcs.py --domains all                   # full datasets into data/dmcs (564,300 frames,
                                                           # ~1.1 GB, 37-52 min on 2 free cores: README)
    python collect/dmcs.py --preset quick --out data/quick  # a few short episodes per task, ~1 min
    python collect/dmcs.py --help                           # every option, documented
    python collect/dmcs.py --domains cheetah --policy runs/rl/cheetah-ppo.zip --checkpoint runs/world_model \
        --noise 0.3 --part agent-r01 --train-episodes 20 --test-episodes 0   # 20 agent episodes, one new part

With ``--policy`` (one task), a stable-baselines3 agent of ``downstream/rl.py`` acts on the real task seen
through the world model of ``--checkpoint`` (7 random warm-up steps, then its deterministic action plus
Gaussian noise of std ``--noise``, clipped to [-1, 1]; ``collect/agent.py`` tells the details and the seeds).
A planner file instead of the agent (``--policy planner.json``, written by ``downstream/plan.py`` or the RL loop)
plans each action in that world model with the cross-entropy method (``worldmodel/planning.py``).
With ``--part NAME`` the episodes go to ``<out>/<task>_<split>.NAME.h5`` beside the random main file they
extend (which must exist and share their action repeat, episode length and render settings); readers take
the main file's episodes, then each part's. Without ``--part`` they make the main files of a new folder. The
agent's path and sha256, the noise and the world model's checkpoint and fingerprint are in the attrs; a
rerun with another agent, noise or model is refused like one with another seed.

Output: one HDF5 file per task and split, ``<out>/<task>_<split>.h5`` (split: train or test), openable
with plain h5py (docs/CONTRACTS.md). E episodes of T agent steps each (T = 1000 / action_repeat, or
``--episode-steps`` if smaller)::

    frames        uint8   (E, T+1, 64, 64, 3)  chunks (1, 16, 64, 64, 3), gzip 4; frames[e, 0] is the reset frame
    actions       float32 (E, T, A)    the task's own action size A; actions[e, t] is applied at frames[e, t]
    rewards       float32 (E, T)       rewards[e, t]: sum of the action_repeat control rewards of that step,
                                       earned by frames[e, t] -> frames[e, t+1]
    states        float32 (E, T+1, D)  dm_control observation of each frame, flattened in the key order
                                       of attrs state_keys (sizes state_sizes)
    episode_seeds int64   (E,)         environment seed each episode was reset with
    attrs: task, domain, dm_task, split, action_repeat, horizon (1000 / action_repeat), episode_steps (T),
           num_episodes, seed (the root --seed), state_keys, state_sizes, action_dim, state_dim,
           render_fast_render, render_image_size, render_camera_id (+ render_shadowsize, render_offsamples
           when fast), package_version, format_version, created_by, and collection_settings (JSON of
           everything that determines the file's contents, used to refuse mixing datasets).

Randomness: everything flows from ``--seed``. Random episode e of task k (its index in the task table, so a
subset of tasks gets the same episodes as ``all``) in split s draws from
``np.random.SeedSequence(seed, spawn_key=(k, s, e))``: one child gives the environment seed (its lowest
bit is the split, so train and test seeds are disjoint), the other the uniform random actions, one draw
per agent step, held for action_repeat control steps by ``envs.simulator.Simulator``
(``collect/random_episodes.py``).

Work and safety: worker processes (``collect/workers.py``: 'spawn', one render thread each) collect one
episode per job and write it, compressed, atomically to ``<out>/.partial/<task>_<split>/episode_NNNNN.h5``;
once all episodes of a task and split exist, a worker assembles the final file under a temporary name (copying
the compressed chunks) and renames it into place, then deletes the partials. So a file under a final name is
always complete, and a killed run (SIGKILL included) resumes where it stopped when the same command is rerun,
giving the same dataset as an uninterrupted run. A worker that dies mid-run is replaced and its jobs redone
(up to ``MAX_WORKER_RESTARTS`` times per run), with the same result. Each partial folder keeps a
settings.json; a rerun with other settings (seed, counts, action repeat, episode steps, render settings) is
refused.

Agent episodes derive theirs from another spawn key, which includes the part's name (collect/agent.py).

Exit codes: 0 done; 2 bad input (one line on stderr); 1 a worker failed; 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import sys
import time
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

if __name__ in ("__main__", "__mp_main__"):  # run as a script: make the repository's packages importable
    _REPO_ROOT = str(Path(__file__).resolve().parents[1])
    if _REPO_ROOT not in sys.path:
        sys.path.insert(0, _REPO_ROOT)

import numpy as np  # noqa: E402

import worldmodel  # noqa: E402
from collect.agent import WARMUP_STEPS, PolicySettings, identify_policy  # noqa: E402  (torch: lazily)
from collect.random_episodes import GroupSettings  # noqa: E402
from collect.workers import (  # noqa: E402
    EXIT_FAILED,
    AssemblyJob,
    EpisodeJob,
    EpisodeResult,
    Settings,
    run_job,
    start_pool,
    stop_pool,
)
from envs.simulator import render_settings  # noqa: E402  (dm_control loads in workers only)
from worldmodel import storage  # noqa: E402
from worldmodel.atomic import TEMP_MARKER, atomic_write_text, stale_temporaries  # noqa: E402
from worldmodel.errors import InputError, closed_output, report  # noqa: E402
from worldmodel.machine import available_cores  # noqa: E402
from worldmodel.tasks import TASK_NAMES, get_task, parse_tasks  # noqa: E402

PROGRAM = "collect/dmcs.py"
# A worker that dies (killed, or crashed: a glibc heap-corruption abort in a worker ended a full collection on
# 2026-12-05) is replaced and its jobs redone, this often per run; a worker that dies every time ends the run.
MAX_WORKER_RESTARTS = 3
EXIT_INTERRUPTED = 130
PARTIAL_FOLDER = ".partial"
SETTINGS_FILE = "settings.json"
# Settings shared by every file of a dataset folder; the rest (task, action repeat, T) is per task.
FOLDER_WIDE_SETTINGS = ("format_version", "seed", "episodes", "episode_steps_cap", "render")


@dataclass
class Args:
    """Collect random-action 64x64 episodes of DeepMind Control tasks into one HDF5 file per task and split."""

    domains: str = "all"
    """Tasks: a comma-separated list of acrobot, cartpole, cheetah, reacher, walker-stand, walker-walk, or 'all'."""
    out: Path = Path("data/dmcs")
    """Output folder; receives <task>_<split>.h5 files (and a .partial folder while unfinished)."""
    train_episodes: int = 200
    """Episodes per task in the train split."""
    test_episodes: int = 100
    """Episodes per task in the test split (100 give >= 10,000 length-20 windows for every task)."""
    action_repeat: str = ""
    """Action repeat override: one integer for all tasks, or task=N pairs such as 'cartpole=4,cheetah=2'.
    Empty: the task defaults (acrobot 4, cartpole 8, cheetah 4, reacher 4, walker-stand 2, walker-walk 2)."""
    episode_steps: int | None = None
    """Cap on the agent steps per episode; None keeps the full 1000 / action_repeat. For quick runs and tests."""
    seed: int = 0
    """Root seed (>= 0): every episode's environment seed and random actions derive from it."""
    workers: int = field(default_factory=available_cores)
    """Worker processes, one episode each at a time; the default is the number of CPU cores available."""
    fast_render: bool = True
    """Render with shadowsize 1024 and offsamples 0: ~2.5x faster, mean pixel difference <= 1/255."""
    preset: Literal["full", "quick"] = "full"
    """'quick': 8 train + 5 test episodes per task of at most 200 steps (~1 min on 2 cores; 5 test
    episodes make the reward experiment's 5 folds). Options given explicitly override the preset."""
    policy: Path | None = None
    """A stable-baselines3 agent (.zip of downstream/rl.py) to act the episodes instead of random actions, in
    the single task of --domains, seen through the world model of --checkpoint (collect/agent.py); or a planner
    file (.json, worldmodel/planning.py) that plans each action in that world model. With it,
    --train-episodes or --test-episodes may be 0."""
    checkpoint: Path | None = None
    """With --policy: the world model (run directory or checkpoint file) the agent was trained in; its reward
    predictor of the task must exist. Default $STRUCTVRNN_CHECKPOINT, else runs/world_model."""
    noise: float = 0.0
    """With --policy: std of the Gaussian noise added to the agent's deterministic action (then clipped to [-1, 1])."""
    part: str = ""
    """With --policy: write <out>/<task>_<split>.<part>.h5, a named part beside the existing main file (letters,
    digits, '-', '_', e.g. agent-r01); empty: write the main files of a new folder."""


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": {"train_episodes": 8, "test_episodes": 5, "episode_steps": 200},
}


class Group(NamedTuple):
    """One output file: a task and split (and part), with where its final and partial files live."""

    settings: Settings
    path: Path  # the final <task>_<split>.h5 (or <task>_<split>.<part>.h5)
    partial_dir: Path  # <out>/.partial/<name>

    @property
    def name(self) -> str:
        return self.settings.name

    def episode_path(self, index: int) -> Path:
        return self.partial_dir / f"episode_{index:05d}.h5"


# ---------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: Sequence[str] | None) -> Args:
    """Parse the command line; a preset supplies defaults that explicit options override."""
    import tyro  # imported here: workers never need it

    args = tyro.cli(Args, args=argv)
    if not PRESETS[args.preset]:
        return args
    preset_defaults = dataclasses.replace(Args(), preset=args.preset, **PRESETS[args.preset])
    return tyro.cli(Args, args=argv, default=preset_defaults)


def parse_action_repeats(text: str, tasks: Sequence[str]) -> dict[str, int]:
    """The action repeat of each task: its default unless overridden by 'N' or 'task=N,...'."""
    repeats = {task: get_task(task).action_repeat for task in tasks}
    text = text.strip()
    if not text:
        return repeats
    if "=" not in text:
        return dict.fromkeys(tasks, _positive_int(text, "--action-repeat"))
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, separator, value = (part.strip() for part in item.partition("="))
        if not separator:
            raise InputError(f"--action-repeat: expected task=N pairs or one integer, got {item!r}")
        get_task(name)  # unknown names are errors even when that task is not collected
        if name in repeats:
            repeats[name] = _positive_int(value, f"--action-repeat {name}")
    return repeats


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{what}: expected a positive integer, got {text!r}") from None
    if value < 1:
        raise InputError(f"{what} must be positive, got {value}")
    return value


def make_groups(args: Args) -> list[Group]:
    """Validate the arguments and return the output files to produce, longest episodes first (so the
    short ones fill the end of the run when workers would otherwise idle)."""
    try:
        tasks = parse_tasks(args.domains)
    except ValueError as error:
        raise InputError(f"--domains: {error}") from None
    try:
        repeats = parse_action_repeats(args.action_repeat, tasks)
    except ValueError as error:  # an unknown task name in the overrides
        raise InputError(f"--action-repeat: {error}") from None
    for option, value in (("--train-episodes", args.train_episodes), ("--test-episodes", args.test_episodes)):
        if value < (0 if args.policy is not None else 1):  # an agent collection may skip a split
            raise InputError(f"{option} must be {'>= 0' if args.policy is not None else 'positive'}, got {value}")
    for option, value in (("--workers", args.workers), ("--episode-steps", args.episode_steps)):
        if value is not None and value < 1:
            raise InputError(f"{option} must be positive, got {value}")
    if args.policy is None and (args.part or args.noise or args.checkpoint is not None):
        raise InputError("--part, --noise and --checkpoint go with --policy (episodes acted by an agent)")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    for task, repeat in repeats.items():
        if repeat > get_task(task).horizon(1):
            raise InputError(f"--action-repeat {task}={repeat} leaves no agent step in 1000 control steps")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file, not a folder; choose another --out")
    if args.policy is not None:
        return [make_group(args.out, s) for s in policy_group_settings(args, tasks, repeats)]
    settings = [
        group_settings(args, task, split, repeats[task]) for task in tasks for split in storage.SPLITS
    ]
    settings.sort(key=lambda s: -s.episode_steps)  # stable: task order kept among equal lengths
    return [make_group(args.out, s) for s in settings]


def policy_group_settings(args: Args, tasks: Sequence[str], repeats: dict[str, int]) -> list[PolicySettings]:
    """The files of an agent collection (splits with episodes); loads the agent and the world model to check
    and identify them."""
    assert args.policy is not None
    if len(tasks) != 1:
        raise InputError(f"--policy acts in one task; pass --domains with one of {', '.join(TASK_NAMES)}")
    if args.part:
        storage.check_part_name(args.part)
    if not (args.noise >= 0 and np.isfinite(args.noise)):
        raise InputError(f"--noise must be a finite std >= 0, got {args.noise}")
    if args.train_episodes + args.test_episodes < 1:
        raise InputError("--train-episodes and --test-episodes are both 0: nothing to collect")
    task = tasks[0]
    random_settings = group_settings(args, task, "train", repeats[task])
    if random_settings.episode_steps <= WARMUP_STEPS:
        raise InputError(f"--episode-steps must exceed the {WARMUP_STEPS} warm-up steps of the world model's filter")
    identity = identify_policy(args.policy, args.checkpoint, task, repeats[task])  # else InputError
    settings = []
    for split in storage.SPLITS:
        episodes = args.train_episodes if split == "train" else args.test_episodes
        if episodes > 0:
            base = group_settings(args, task, split, repeats[task])._asdict()
            settings.append(PolicySettings(**{**base, "episodes": episodes}, part=args.part, noise=float(args.noise),
                                           warmup_steps=WARMUP_STEPS, refilter=True, **identity._asdict()))  # fmt: skip
    return settings


def group_settings(args: Args, task: str, split: str, action_repeat: int) -> GroupSettings:
    horizon = get_task(task).horizon(action_repeat)
    return GroupSettings(
        format_version=storage.FORMAT_VERSION,
        task=task,
        split=split,
        seed=args.seed,
        episodes=args.train_episodes if split == "train" else args.test_episodes,
        episode_steps=min(horizon, args.episode_steps or horizon),
        episode_steps_cap=args.episode_steps,
        action_repeat=action_repeat,
        render=render_settings(args.fast_render),
    )


def make_group(out: Path, settings: Settings) -> Group:
    part = settings.part if isinstance(settings, PolicySettings) else ""
    path = storage.dataset_path(out, settings.task, settings.split, part)
    return Group(settings, path, out / PARTIAL_FOLDER / settings.name)


# ---------------------------------------------------------------------------------------------------
# Existing data: skip what is done, refuse what was collected otherwise


class GroupState(NamedTuple):
    group: Group
    complete: bool  # the final file exists with the requested settings
    done_episodes: frozenset[int]  # partial episode files present


def existing_settings(out: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The settings record of every final file (main files and parts) and partial folder under ``out`` (read-only)."""
    if not out.is_dir():
        return
    known = {f"{task}_{split}" for task in TASK_NAMES for split in storage.SPLITS}
    for path in sorted(out.glob("*.h5")):
        main, _, part = path.stem.partition(".")
        if main not in known or (part and not storage.PART_NAME.fullmatch(part)):
            continue
        redo = "delete it (a rerun collects it again), or use another --out"
        try:
            record = json.loads(storage.validate_dataset(path).attrs.get("collection_settings", "null"))
        except storage.InvalidDatasetError as error:  # truncated, not HDF5, another layout
            raise InputError(f"{error}; {redo}") from None
        except (TypeError, json.JSONDecodeError):
            raise InputError(f"{path} has unreadable collection settings; {redo}") from None
        if record is None:
            raise InputError(f"{path} was not written by {PROGRAM}; use another --out")
        yield path, record
    for path in sorted((out / PARTIAL_FOLDER).glob(f"*/{SETTINGS_FILE}")):
        try:
            yield path.parent, json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"unreadable {path} ({error}); delete {path.parent}") from None


def check_existing(out: Path, groups: Sequence[Group], args: Args) -> None:
    """Refuse to mix: every existing file must match this run's settings (all of them for the files written
    now, the folder-wide ones for the other tasks' main files; a part is checked against its main file
    instead, by check_parts)."""
    requested = {group.name: group.settings.record() for group in groups}
    writes_parts = any(isinstance(group.settings, PolicySettings) and group.settings.part for group in groups)
    for path, record in existing_settings(out):
        name = f"{record.get('task')}_{record.get('split')}" + (f".{record['part']}" if record.get("part") else "")
        if name in requested:
            expected, keys = requested[name], list(requested[name])
        elif record.get("part") or writes_parts:
            continue  # another part, or a main file this part joins: parts are made to differ from it
        else:
            if record.get("task") not in TASK_NAMES or record.get("split") not in storage.SPLITS:
                raise InputError(f"{path} has unknown settings {record}; delete it, or use another --out")
            expected = group_settings(args, record["task"], record["split"], record.get("action_repeat", 1)).record()
            keys = list(FOLDER_WIDE_SETTINGS)
        differences = [key for key in keys if record.get(key) != expected[key]]
        if differences:
            found = ", ".join(f"{key}={record.get(key)}" for key in differences)
            asked = ", ".join(f"{key}={expected[key]}" for key in differences)
            raise InputError(
                f"{path} was collected with {found}, this run asks {asked}: refusing to mix datasets; "
                f"rerun with the original settings, use another --out, or delete {out} to recollect"
            )


def check_parts(out: Path, groups: Sequence[Group]) -> None:
    """A part joins an existing main file and must agree with it (``storage.part_differences``), else its
    episodes could not be read with the main file's: refuse before collecting anything."""
    for group in groups:
        settings = group.settings
        if not (isinstance(settings, PolicySettings) and settings.part):
            continue
        main = storage.dataset_path(out, settings.task, settings.split)
        if not main.is_file():
            raise InputError(
                f"--part {settings.part} extends {main}, which does not exist: collect the main files first "
                f"(collect/dmcs.py --domains {settings.task} --out {out}), or leave out --part to start a new folder"
            )
        differences = storage.part_differences(storage.checked_dataset(out, settings.task, settings.split).attrs,
                                               dataset_attrs(settings))  # fmt: skip
        if differences:
            raise InputError(
                f"part {group.path.name} would differ from {main.name} in {'; '.join(differences)}: refusing to mix "
                "them; collect with the main file's settings"
            )


def scan(groups: Sequence[Group]) -> list[GroupState]:
    """What is already done for each group (call after check_existing)."""
    states = []
    for group in groups:
        complete = group.path.exists()
        done = frozenset(
            index for index in range(group.settings.episodes) if group.episode_path(index).exists()
        )
        states.append(GroupState(group, complete, frozenset() if complete else done))
    return states


@contextmanager
def collection_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for this run: two collectors must not share partial files.
    The kernel drops the lock when the process dies, however it dies."""
    lock_path = out / PARTIAL_FOLDER / "lock"
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another {PROGRAM} is writing into {out}; wait for it or use another --out") from None
        yield


def remove_temporaries(groups: Sequence[Group]) -> None:
    """Delete the half-written files (episodes, final files) that killed workers left behind."""
    for group in groups:
        temporary_episodes = group.partial_dir.glob(f".*{TEMP_MARKER}*")
        for temp in [*stale_temporaries(group.path), *temporary_episodes]:
            temp.unlink(missing_ok=True)


def prepare_partials(states: Sequence[GroupState]) -> None:
    """Create the partial folders of unfinished groups, record their settings, remove leftovers of
    killed runs (temporary files, and partials of groups whose final file was already written)."""
    remove_temporaries([state.group for state in states])
    for state in states:
        group = state.group
        if state.complete:
            shutil.rmtree(group.partial_dir, ignore_errors=True)
            continue
        group.partial_dir.mkdir(parents=True, exist_ok=True)
        settings_path = group.partial_dir / SETTINGS_FILE
        if not settings_path.exists():
            atomic_write_text(settings_path, json.dumps(group.settings.record(), indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------
# Main side


def dataset_attrs(settings: Settings) -> dict[str, Any]:
    """Attrs of a final file (the assembler adds the state layout, known from the episodes)."""
    spec = get_task(settings.task)
    return {
        "task": settings.task,
        "domain": spec.domain,
        "dm_task": spec.task,
        "split": settings.split,
        "action_repeat": settings.action_repeat,
        "horizon": spec.horizon(settings.action_repeat),
        "episode_steps": settings.episode_steps,
        "num_episodes": settings.episodes,
        "seed": settings.seed,
        "action_dim": spec.action_dim,
        **{f"{storage.RENDER_ATTR_PREFIX}{key}": value for key, value in settings.render.items()},
        "package_version": worldmodel.__version__,
        "format_version": settings.format_version,
        "created_by": PROGRAM,
        "collection_settings": json.dumps(settings.record(), sort_keys=True),
        **settings.extra_attrs(),  # an agent's provenance
    }


def assembly_job(group: Group) -> AssemblyJob:
    paths = tuple(str(group.episode_path(index)) for index in range(group.settings.episodes))
    return AssemblyJob(group.settings, paths, str(group.path), str(group.partial_dir), dataset_attrs(group.settings))


def run_jobs(states: Sequence[GroupState], workers: int) -> None:
    """Run the missing episodes and the assemblies in a pool of workers, with a progress bar.

    Assemblies jump the queue so finished files appear early; at most two jobs per worker are in
    flight so that an assembly never waits behind the whole backlog.
    """
    from tqdm import tqdm

    episodes: deque[EpisodeJob] = deque()
    assemblies: deque[AssemblyJob] = deque()
    missing: dict[str, int] = {}
    groups = {state.group.name: state.group for state in states}
    for state in states:
        if state.complete:
            continue
        group = state.group
        todo = [i for i in range(group.settings.episodes) if i not in state.done_episodes]
        missing[group.name] = len(todo)
        episodes.extend(EpisodeJob(group.settings, i, str(group.episode_path(i))) for i in todo)
        if not todo:
            assemblies.append(assembly_job(group))
    if not episodes and not assemblies:
        return
    frames_total = sum(job.settings.episode_steps + 1 for job in episodes)
    workers = min(workers, len(episodes) + len(assemblies))
    print(
        f"{PROGRAM}: {len(episodes)} episodes ({frames_total:,} frames) and {len(missing)} files to write "
        f"with {workers} workers",
        file=sys.stderr,
    )
    pool = start_pool(workers)
    in_flight: dict[Future[Any], EpisodeJob | AssemblyJob] = {}
    bar = tqdm(total=frames_total, unit="frame", desc="collecting", dynamic_ncols=True, smoothing=0.05)
    episodes_left = len(episodes)
    restarts = 0
    try:
        while episodes or assemblies or in_flight:
            lost: list[EpisodeJob | AssemblyJob] = []  # when a worker dies: every job the pool held
            while len(in_flight) < 2 * workers and (assemblies or episodes):
                job = assemblies.popleft() if assemblies else episodes.popleft()
                try:
                    in_flight[pool.submit(run_job, job)] = job
                except BrokenProcessPool:  # a worker died while it had nothing to do
                    lost.append(job)
                    break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED) if in_flight else (set(), set())
            for future in done:
                job = in_flight.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:  # a worker died: every job still in the pool is lost with it
                    lost.append(job)
                    continue
                if isinstance(result, EpisodeResult):
                    episodes_left -= 1
                    bar.update(result.frames)
                    bar.set_postfix_str(f"{episodes_left} episodes left", refresh=False)
                    missing[result.group] -= 1
                    if missing[result.group] == 0:
                        assemblies.append(assembly_job(groups[result.group]))
            if lost:
                restarts += 1
                if restarts > MAX_WORKER_RESTARTS:
                    raise BrokenProcessPool(f"workers died {restarts} times")
                for job in [*lost, *in_flight.values()]:
                    (assemblies if isinstance(job, AssemblyJob) else episodes).appendleft(job)
                in_flight.clear()
                stop_pool(pool)
                remove_temporaries(list(groups.values()))  # the dead workers' half-written files
                tqdm.write(f"{PROGRAM}: a worker process died (killed, or crashed); restarting "
                           f"the workers and redoing their jobs ({restarts} of {MAX_WORKER_RESTARTS} restarts)",
                           file=sys.stderr)
                pool = start_pool(workers)
    except BaseException:
        stop_pool(pool)
        raise
    finally:
        bar.close()
    pool.shutdown()


class Summary(NamedTuple):
    file: str
    episodes: int
    frames: int
    mean_reward: float
    megabytes: float


def summarize(groups: Sequence[Group]) -> list[Summary]:
    rows = []
    for group in groups:
        import h5py

        with h5py.File(group.path, "r") as file:
            rewards = file["rewards"][...]
            episodes, frames = file["frames"].shape[:2]
        rows.append(Summary(group.path.name, episodes, episodes * frames, float(rewards.mean()),
                            group.path.stat().st_size / 1e6))
    return rows


def print_summary(rows: Sequence[Summary], seconds: float) -> None:
    print(f"{'file':<22} {'episodes':>8} {'frames':>10} {'mean reward':>12} {'MB':>9}")
    for row in sorted(rows):
        print(f"{row.file:<22} {row.episodes:>8} {row.frames:>10,} {row.mean_reward:>12.4f} {row.megabytes:>9.1f}")
    print(f"{'total':<22} {sum(r.episodes for r in rows):>8} {sum(r.frames for r in rows):>10,} {'':>12} "
          f"{sum(r.megabytes for r in rows):>9.1f}   ({seconds:.0f} s)")


def remove_empty_partial_folder(out: Path) -> None:
    partial = out / PARTIAL_FOLDER
    if partial.is_dir() and all(path.name == "lock" for path in partial.iterdir()):
        (partial / "lock").unlink(missing_ok=True)
        partial.rmdir()


def collect(args: Args) -> list[Summary]:
    """Validate, then produce every requested file that does not exist yet; returns the summary rows.
    Raises InputError on bad input before writing anything."""
    groups = make_groups(args)
    check_parts(args.out, groups)
    check_existing(args.out, groups, args)
    leftovers = (args.out / PARTIAL_FOLDER).exists()  # of a killed run, even if all files are done now
    if leftovers or not all(state.complete for state in scan(groups)):
        try:
            (args.out / PARTIAL_FOLDER).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"cannot create {args.out}: {error.strerror}") from None
        with collection_lock(args.out):
            check_existing(args.out, groups, args)  # again under the lock: another run may have written
            states = scan(groups)
            prepare_partials(states)
            run_jobs(states, args.workers)
            remove_empty_partial_folder(args.out)
    return summarize(groups)


def collect_with_policy(
    policy: Path,
    checkpoint: Path | None,
    task: str,
    out: Path,
    part: str = "",
    noise: float = 0.0,
    train_episodes: int = 0,
    test_episodes: int = 0,
    episode_steps: int | None = None,
    seed: int = 0,
    workers: int = 1,
    fast_render: bool = True,
) -> list[Summary]:
    """The Python form of ``collect/dmcs.py --policy``: collect episodes acted by ``policy`` in the world model
    of ``checkpoint`` into ``out`` (as part ``part`` of its dataset, or as the main files of a new folder);
    resumes an interrupted call with the same arguments. Raises InputError on bad input, before writing."""
    args = Args(domains=task, out=out, train_episodes=train_episodes, test_episodes=test_episodes,
                episode_steps=episode_steps, seed=seed, workers=workers, fast_render=fast_render, policy=policy,
                checkpoint=checkpoint, noise=noise, part=part)  # fmt: skip
    return collect(args)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        args = parse_args(argv)
        rows = collect(args)
        print_summary(rows, time.perf_counter() - started)  # inside: its reader may be gone too
    except InputError as error:  # also a foreign or damaged episode file found while assembling
        return report(error)
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted: rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenProcessPool:
        print(f"{PROGRAM}: error: a worker process died; rerun the same command to resume", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # the reader of our output went away (`--help | head`, `... | head -3`)
        return closed_output()
    except Exception:  # a worker's bug or a disk error: show the traceback, what is written is kept
        traceback.print_exc()
        print(f"{PROGRAM}: error: collection failed; finished episodes are kept, rerun to resume", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
