"""What the collector's worker processes run (``collect/dmcs.py`` schedules it): one episode per job,
written compressed to its partial file, and the assembly of a task and split's episodes into the final file;
and the pool of 'spawn' workers, each with one render thread, that die with the main process.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from collect.agent import PolicySettings, policy_episode  # (torch: lazily, in a worker that runs an agent)
from collect.random_episodes import GroupSettings, random_episode
from worldmodel import storage
from worldmodel.errors import detail

EXIT_FAILED = 1  # also a worker's exit code when the main process died before it started

Settings = GroupSettings | PolicySettings


class EpisodeJob(NamedTuple):
    settings: Settings
    index: int
    path: str  # the episode file to write


class AssemblyJob(NamedTuple):
    settings: Settings
    episode_paths: tuple[str, ...]
    path: str  # the final dataset file
    partial_dir: str
    attrs: dict[str, Any]


class EpisodeResult(NamedTuple):
    group: str  # <task>_<split>[.<part>]
    index: int
    frames: int


class AssemblyResult(NamedTuple):
    group: str
    path: str  # the final file written


def init_worker(parent_pid: int) -> None:
    """Runs first in each worker: one render thread (workers give the parallelism), Ctrl-C handled by
    the main process only, and death with the main process (so a killed run leaves no orphan writers)."""
    for variable in ("LP_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = "1"
    os.environ.setdefault("MUJOCO_GL", "egl")
    import absl.logging  # dm_control's deprecation warnings would garble the progress bar

    absl.logging.set_verbosity(absl.logging.ERROR)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the main process died before prctl took effect
        os._exit(EXIT_FAILED)


def run_job(job: EpisodeJob | AssemblyJob) -> EpisodeResult | AssemblyResult:
    return collect_episode(job) if isinstance(job, EpisodeJob) else assemble_group(job)


def collect_episode(job: EpisodeJob) -> EpisodeResult:
    """Run one episode (random actions, or an agent's) and write it, compressed, to its partial file."""
    settings = job.settings
    if isinstance(settings, GroupSettings):
        episode, state_layout = random_episode(settings, job.index)
    else:
        episode, state_layout = policy_episode(settings, job.index)  # loads torch and the models in this worker
    keys, sizes = zip(*state_layout)
    attrs = {
        "episode_index": job.index,
        "state_keys": list(keys),
        "state_sizes": list(sizes),
        "collection_settings": json.dumps(settings.record(), sort_keys=True),
    }
    storage.write_episode(job.path, episode, attrs)
    return EpisodeResult(settings.name, job.index, len(episode.frames))


def assemble_group(job: AssemblyJob) -> AssemblyResult:
    """Join a group's episode files into its final file, then delete the partials."""
    if Path(job.path).exists():  # written (atomically) by a worker that died before it could report it
        shutil.rmtree(job.partial_dir, ignore_errors=True)
        return AssemblyResult(Path(job.path).stem, job.path)
    expected_settings = json.dumps(job.settings.record(), sort_keys=True)
    layouts = set()
    for index, path in enumerate(job.episode_paths):
        try:
            attrs = storage.read_attrs(path)
        except OSError as error:  # e.g. truncated by a full disk or an interrupted copy of the folder
            raise storage.InvalidDatasetError(
                f"{path} is damaged ({detail(error)}); delete it and rerun the same command to collect it again"
            ) from None
        seed = job.settings.env_seed(index)
        found = (attrs.get("collection_settings"), attrs.get("episode_index"), attrs.get("episode_seed"))
        if found != (expected_settings, index, seed):
            raise storage.InvalidDatasetError(
                f"{path} does not belong to this collection; delete it and rerun the same command"
            )
        layouts.add((tuple(attrs["state_keys"]), tuple(attrs["state_sizes"])))
    if len(layouts) != 1:
        raise storage.InvalidDatasetError(f"episodes of {job.path} disagree on the state layout")
    (keys, sizes), = layouts
    attrs = {**job.attrs, "state_keys": list(keys), "state_sizes": list(sizes), "state_dim": sum(sizes)}
    storage.assemble_dataset(job.episode_paths, job.path, attrs)
    shutil.rmtree(job.partial_dir)
    return AssemblyResult(Path(job.path).stem, job.path)


def start_pool(workers: int) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: safe with EGL
    return ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(os.getpid(),))


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Kill our workers now, not after their job, and wait until they are gone (nothing writes after)."""
    children = multiprocessing.active_children()
    for process in children:
        process.kill()
    for process in children:
        process.join()
    pool.shutdown(wait=False, cancel_futures=True)
