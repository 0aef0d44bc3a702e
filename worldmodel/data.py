"""Windows of consecutive steps from the collected datasets, as a torch Dataset (docs/CONTRACTS.md; the data
conventions, frames/actions/rewards alignment and windows, in docs/DESIGN.md section 2).

``WindowDataset(root, tasks, split, length)`` serves every window of ``length`` consecutive frames
(with their actions and rewards) that lies inside one episode, from one or more tasks' files
``<root>/<task>_<split>.h5`` and their named parts ``<task>_<split>.<part>.h5`` (``storage.dataset_files``),
written by ``collect/dmcs.py``. Windows are counted and numbered as
``worldmodel.windows`` says: starts 0, stride, 2*stride, ... up to T - length in an episode of T steps.

Choices written down here:

* Episodes of a task are numbered across its files: the main file's first, then each part's, in name order
  (``Window.episode``); the keypoint cache and the envs' dataset contexts number them the same way.
* The window index is arithmetic over (file, episode, start), computed from the files' shapes alone:
  no frames are read and no per-window table is stored (``index()`` materializes it when wanted).
* Actions, rewards (and states when asked) are small and loaded into memory once; each item reads
  only its frames from disk, i.e. two gzip chunks of 16 frames for a 16-frame window.
* Actions are zero-padded to MAX_ACTION_DIM (6) so one model serves all tasks; states, whose size
  differs across tasks, are zero-padded to the largest state size among the dataset's tasks (for a
  single task that is its own size D).
* ``frames=False`` skips reading frames (for reward and state experiments): frames is then an empty
  uint8 tensor of shape (L, 0, 0, 0).
* HDF5 handles are opened lazily, per process (``storage.ProcessLocalDataset``): a DataLoader worker
  (forked or spawned) never uses a handle opened by its parent, and pickling the dataset drops them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from worldmodel import storage
from worldmodel.errors import InputError
from worldmodel.tasks import pad_actions, parse_tasks, task_id
from worldmodel.windows import EpisodeWindows

# Random windows rarely reuse a chunk, but a sequential sweep (stride 1) reads each chunk ~16 times:
# a cache of a few chunks (196 kB each, uncompressed) per file serves that.
CHUNK_CACHE_BYTES = 4 * 1024 * 1024


class Window(NamedTuple):
    frames: Tensor  # (L, 64, 64, 3) uint8, or (L, 0, 0, 0) when frames=False
    actions: Tensor  # (L, 6) float32; actions[i] applied at frames[i]; zero-padded to MAX_ACTION_DIM
    rewards: Tensor  # (L,) float32; rewards[i] earned by frames[i] -> frames[i+1]
    states: Tensor  # (L, D) float32, or (L, 0) unless requested
    task_id: Tensor  # () int64, worldmodel.tasks.task_id(task)
    episode: Tensor  # () int64, episode index within its task's split (main file first, then the parts)
    start: Tensor  # () int64, index of frames[0] within the episode


class WindowKey(NamedTuple):
    """Where a window lies: its file (index into ``WindowDataset.files``), episode in that file and first step."""

    file: int
    episode: int
    start: int


class FileWindows(NamedTuple):
    """One dataset file as the sampler sees it: shapes and attrs plus its small arrays in memory."""

    info: storage.DatasetInfo
    task_id: int
    first_episode: int  # index of its first episode within its task's split (episodes of earlier files of the task)
    windows: EpisodeWindows
    actions: np.ndarray  # (E, T, 6) float32, zero-padded
    rewards: np.ndarray  # (E, T) float32
    states: np.ndarray | None  # (E, T+1, D_max) float32, zero-padded; None unless states=True

    @property
    def num_windows(self) -> int:
        return len(self.windows)


class WindowDataset(Dataset[Window]):
    """All windows of ``length`` steps (every ``stride``-th start) of the given tasks and split."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        tasks: str | Sequence[str],
        split: str,
        length: int,
        stride: int = 1,
        states: bool = False,
        frames: bool = True,
    ) -> None:
        if length < 1 or stride < 1:
            raise InputError(f"length and stride must be positive, got length={length}, stride={stride}")
        self.root = Path(root)
        self.tasks: tuple[str, ...] = tuple(parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks)))
        self.split = split
        self.length = length
        self.stride = stride
        self.with_states = states
        self.with_frames = frames
        infos = [self._open_infos(task) for task in self.tasks]
        self.state_dim = max(info.state_dim for task_infos in infos for info in task_infos) if states else 0
        self.files: tuple[FileWindows, ...] = tuple(
            self._load(info, first_episode)
            for task_infos in infos
            for info, first_episode in zip(task_infos, np.cumsum([0] + [info.num_episodes for info in task_infos]))
        )
        self._offsets = np.cumsum([0] + [file.num_windows for file in self.files])
        self._frames = [
            storage.ProcessLocalDataset(file.info.path, "frames", rdcc_nbytes=CHUNK_CACHE_BYTES) for file in self.files
        ]

    def _open_infos(self, task: str) -> tuple[storage.DatasetInfo, ...]:
        infos = storage.checked_dataset_files(self.root, task, self.split)  # absent, damaged, foreign: InputError
        info = infos[0]  # the parts have its episode length
        if info.episode_steps < self.length:
            raise InputError(
                f"window length {self.length} exceeds the {info.episode_steps} steps per episode of {info.path}; "
                "collect longer episodes (collect/dmcs.py --episode-steps) or use shorter windows"
            )
        return infos

    def _load(self, info: storage.DatasetInfo, first_episode: int) -> FileWindows:
        with h5py.File(info.path, "r") as file:  # closed again: no handle may cross a fork
            actions = pad_actions(file["actions"][...])
            rewards = file["rewards"][...]
            states = None
            if self.with_states:
                states = np.zeros((info.num_episodes, info.episode_steps + 1, self.state_dim), np.float32)
                states[..., : info.state_dim] = file["states"][...]
        return FileWindows(
            info=info,
            task_id=task_id(info.task),
            first_episode=int(first_episode),
            windows=EpisodeWindows(info.num_episodes, info.episode_steps, self.length, self.stride),
            actions=actions,
            rewards=rewards,
            states=states,
        )

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def key(self, index: int) -> WindowKey:
        """The (file, episode, start) of window ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        index %= len(self)
        file = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return WindowKey(file, *self.files[file].windows.locate(index - int(self._offsets[file])))

    def index(self) -> np.ndarray:
        """Every window's (file, episode, start) as an int64 array of shape (len(self), 3), in order."""
        parts = []
        for number, file in enumerate(self.files):
            table = file.windows.table()  # (n, 2): episode, start
            parts.append(np.concatenate([np.full_like(table[:, :1], number), table], axis=1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, index: int) -> Window:
        number, episode, start = self.key(index)
        file = self.files[number]
        steps = slice(start, start + self.length)
        if self.with_frames:
            frames = torch.from_numpy(self._frames[number].get()[episode, steps])
        else:
            frames = torch.empty((self.length, 0, 0, 0), dtype=torch.uint8)
        states = (
            torch.from_numpy(file.states[episode, steps].copy())
            if file.states is not None
            else torch.empty((self.length, 0), dtype=torch.float32)
        )
        return Window(
            frames=frames,
            actions=torch.from_numpy(file.actions[episode, steps].copy()),
            rewards=torch.from_numpy(file.rewards[episode, steps].copy()),
            states=states,
            task_id=torch.tensor(file.task_id, dtype=torch.int64),
            episode=torch.tensor(file.first_episode + episode, dtype=torch.int64),
            start=torch.tensor(start, dtype=torch.int64),
        )

    def close(self) -> None:
        """Close this process's HDF5 handles (they reopen on the next read)."""
        for frames in self._frames:
            frames.close()
