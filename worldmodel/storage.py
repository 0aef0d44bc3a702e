"""HDF5 storage of collected episodes: writing, assembling, reading and validating (docs/CONTRACTS.md).

Two kinds of files, both plain HDF5 readable with h5py alone:

* An **episode file** holds one episode, written by a collector worker as soon as the episode ends::

      frames   uint8   (T+1, 64, 64, 3)  chunks (16, 64, 64, 3), gzip
      actions  float32 (T, A)
      rewards  float32 (T,)
      states   float32 (T+1, D)
      attrs    episode_seed, plus whatever the writer passes (task, state layout, ...)

* A **dataset file** ``<root>/<task>_<split>.h5`` (the *main file*) or ``<root>/<task>_<split>.<part>.h5`` (a
  named *part*, e.g. episodes collected later by an agent) holds E episodes of one task and split::

      frames        uint8   (E, T+1, 64, 64, 3)  chunks (1, 16, 64, 64, 3), gzip
      actions       float32 (E, T, A)            actions[e, t] is applied at frames[e, t]
      rewards       float32 (E, T)               rewards[e, t] is earned by frames[e, t] -> frames[e, t+1]
      states        float32 (E, T+1, D)          flattened dm_control observation of each frame
      episode_seeds int64   (E,)
      attrs         REQUIRED_ATTRS (task, action_repeat, seeds, render settings, versions, ...)

  It is assembled from episode files by copying their compressed frame chunks as they are
  (``read_direct_chunk``/``write_direct_chunk``): an episode chunk of 16 frames and a dataset chunk of
  (1, 16) frames hold the same bytes, so nothing is decompressed or compressed twice.

The episodes of a task and split are those of its main file followed by those of its parts, sorted by part
name (``dataset_files`` lists them, ``checked_dataset_files`` validates them); a part must agree with its
main file on everything that makes frames and steps comparable (``PART_AGREES_ON`` and the render settings).

Every file is written under a temporary name in its final folder, flushed to disk and renamed with
``os.replace``: a file under its final name is always complete, whenever the writer is killed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from worldmodel.atomic import atomic_output
from worldmodel.errors import InputError, MissingInputError, detail
from worldmodel.tasks import IMAGE_SIZE

FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "test")
FRAME_SHAPE: tuple[int, int, int] = (IMAGE_SIZE, IMAGE_SIZE, 3)
FRAME_CHUNK_STEPS = 16  # ~16 frames per chunk: a random 16-frame window touches at most 2 chunks
# Measured on DMC frames here: level 4 compresses 6-8x (level 1: ~6x) at ~0.06 ms per frame, 1% of the
# render time, and its chunks decompress faster than level 1's (~0.23 ms per 16-frame chunk).
GZIP_LEVEL = 4

DATASET_NAMES: tuple[str, ...] = ("frames", "actions", "rewards", "states", "episode_seeds")
REQUIRED_ATTRS: tuple[str, ...] = (
    "task",
    "domain",
    "dm_task",
    "split",
    "action_repeat",
    "horizon",
    "episode_steps",
    "num_episodes",
    "seed",
    "state_keys",
    "state_sizes",
    "package_version",
    "format_version",
)
RENDER_ATTR_PREFIX = "render_"  # render settings are stored one attr each: render_image_size, ...
# A part's name: what sits between "<task>_<split>." and ".h5". No dots, so a name maps to one file only.
PART_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
# What a part must share with its main file (besides task, split and every render_* attr) for its frames,
# actions and states to mean the same: episodes of other settings in one stream would mix data silently.
PART_AGREES_ON: tuple[str, ...] = (
    "domain", "dm_task", "action_repeat", "episode_steps", "action_dim", "state_keys", "state_sizes", "format_version"
)


class Episode(NamedTuple):
    """One episode of T agent steps in memory (Minari's convention: T+1 observations, T actions)."""

    frames: np.ndarray  # (T+1, 64, 64, 3) uint8; frames[0] is the reset frame
    actions: np.ndarray  # (T, A) float32; actions[t] is applied at frames[t]
    rewards: np.ndarray  # (T,) float32; rewards[t] is earned by frames[t] -> frames[t+1]
    states: np.ndarray  # (T+1, D) float32; low-dimensional observation of each frame
    seed: int  # the environment seed the episode was reset with


class DatasetInfo(NamedTuple):
    """What a dataset file holds, read from its shapes and attrs (no frames are read)."""

    path: Path
    task: str
    split: str
    num_episodes: int  # E
    episode_steps: int  # T agent steps per episode (T+1 frames)
    action_dim: int  # A, the task's own action size
    state_dim: int  # D
    action_repeat: int
    attrs: dict[str, Any]  # all attrs, decoded to plain Python values


class InvalidDatasetError(InputError):
    """A file does not follow the dataset layout above (damaged, truncated or foreign)."""


def dataset_path(root: str | os.PathLike[str], task: str, split: str, part: str = "") -> Path:
    """Where the main dataset file of one task and split lives under ``root`` (or its part named ``part``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    if part:
        return Path(root) / f"{task}_{split}.{check_part_name(part)}.h5"
    return Path(root) / f"{task}_{split}.h5"


def check_part_name(part: str) -> str:
    """``part`` if it is a valid part name, else an InputError saying what one looks like."""
    if not PART_NAME.fullmatch(part):
        raise InputError(
            f"part name {part!r}: use 1-48 letters, digits, '-' or '_', starting with a letter or digit (e.g. agent-r01)"
        )
    return part


def dataset_files(root: str | os.PathLike[str], task: str, split: str) -> tuple[Path, ...]:
    """The files holding the episodes of one task and split, in episode order: the main file (if it exists),
    then the parts sorted by name. Every reader of episodes goes through this listing (or
    ``checked_dataset_files``), so episode indices agree everywhere. A file named like a part but with an
    invalid part name is an InputError (it would otherwise be skipped silently)."""
    main = dataset_path(root, task, split)
    parts = []
    for path in Path(root).glob(f"{task}_{split}.*.h5"):
        part = path.name[len(f"{task}_{split}.") : -len(".h5")]
        if not PART_NAME.fullmatch(part):
            raise InputError(f"{path} is not a valid part name of {main.name}; rename it to {task}_{split}.<part>.h5 "
                             "(letters, digits, '-', '_') or move it out of the folder")  # fmt: skip
        parts.append((part, path))
    return ((main,) if main.is_file() else ()) + tuple(path for _, path in sorted(parts))


def part_differences(main: Mapping[str, Any], part: Mapping[str, Any]) -> list[str]:
    """The settings in which the attrs of a part differ from its main file's, as 'key=part value (main file:
    value)'. Render settings count when either side has them; the others when both do (a part about to be
    collected does not know its state layout yet)."""
    render_keys = sorted(key for key in {*main, *part} if key.startswith(RENDER_ATTR_PREFIX))
    keys = [key for key in PART_AGREES_ON if key in main and key in part] + render_keys
    return [f"{key}={part.get(key)!r} (main file: {main.get(key)!r})" for key in keys if part.get(key) != main.get(key)]


def missing_dataset_error(root: str | os.PathLike[str], task: str, split: str) -> MissingInputError:
    """The error to raise when a dataset file is absent: it says how to produce it."""
    path = dataset_path(root, task, split)
    hint = f"run `python collect/dmcs.py --domains {task} --out {root}` first"
    if (Path(root) / ".partial").is_dir():
        hint = f"a collection into {root} is unfinished: rerun the same collect/dmcs.py command to finish it"
    if not Path(root).is_dir():
        return MissingInputError(f"no dataset folder {root}; {hint}")
    return MissingInputError(f"no dataset file {path}; {hint}")


def checked_dataset(root: str | os.PathLike[str], task: str, split: str) -> DatasetInfo:
    """The validated dataset file of one task and split, for an entry point that is about to read it:
    absent, damaged (e.g. truncated by a killed copy), foreign or holding another task raises an
    InputError that says how to get a usable one. Frames are not decompressed (see validate_dataset)."""
    path = dataset_path(root, task, split)
    if not path.is_file():
        raise missing_dataset_error(root, task, split)
    recollect = (
        f"delete it and rerun the collect/dmcs.py command that made {root} (it collects only the missing files)"
    )
    try:
        info = validate_dataset(path)
    except InvalidDatasetError as error:
        raise InvalidDatasetError(f"{error}; {recollect}") from None
    if (info.task, info.split) != (task, split):
        raise InvalidDatasetError(f"{path} holds {info.task} {info.split}, not {task} {split}; {recollect}")
    if info.num_episodes < 1:
        raise InvalidDatasetError(f"{path} holds no episode; {recollect}")
    return info


def checked_dataset_files(root: str | os.PathLike[str], task: str, split: str) -> tuple[DatasetInfo, ...]:
    """``checked_dataset`` of the main file, then every part of it (``dataset_files``), each validated and
    agreeing with the main file on the settings that make episodes comparable; else one InputError that
    names the part and the differing setting."""
    main = checked_dataset(root, task, split)
    infos = [main]
    for path in dataset_files(root, task, split)[1:]:
        try:
            info = validate_dataset(path)
        except InvalidDatasetError as error:
            raise InvalidDatasetError(f"{error}; delete the part {path.name}, or collect it again") from None
        differences = part_differences(main.attrs, info.attrs)
        if (info.task, info.split) != (task, split):
            differences.insert(0, f"task/split={info.task}/{info.split}")
        if differences:
            raise InvalidDatasetError(
                f"part {path} differs from {main.path.name} in {'; '.join(differences)}: refusing to mix them; "
                "collect the part with the main file's settings, or move it out of the folder"
            )
        infos.append(info)
    return tuple(infos)


def episode_env_seed(sequence: np.random.SeedSequence, split: str) -> int:
    """An episode's 32-bit environment seed (dm_control's RandomState) from its seed sequence, with the split's
    index as the lowest bit: train and test episodes never start from the same state."""
    split_index = SPLITS.index(split)
    word = int(sequence.generate_state(1, np.uint32)[0])
    return (word & ~1) | split_index


def frame_chunk_steps(num_frames: int) -> int:
    """Frames per chunk: FRAME_CHUNK_STEPS, or fewer for (test-sized) episodes shorter than that."""
    return min(FRAME_CHUNK_STEPS, num_frames)


def _frames_dataset(group: h5py.Group, shape: tuple[int, ...], episode_axis: bool) -> h5py.Dataset:
    """The compressed frames dataset; chunks hold 16 consecutive frames of one episode."""
    chunk = (frame_chunk_steps(shape[-4]), *FRAME_SHAPE)
    return group.create_dataset(
        "frames",
        shape=shape,
        dtype=np.uint8,
        chunks=(1, *chunk) if episode_axis else chunk,
        compression="gzip",
        compression_opts=GZIP_LEVEL,
    )


def _set_attrs(target: h5py.AttributeManager, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        target[key] = value


def write_episode(path: str | os.PathLike[str], episode: Episode, attrs: Mapping[str, Any]) -> None:
    """Write one episode file atomically (frames compressed here, i.e. in the collector's worker)."""
    _check_episode(episode)
    with atomic_output(path) as temp, h5py.File(temp, "w") as file:
        frames = _frames_dataset(file, episode.frames.shape, episode_axis=False)
        frames[...] = episode.frames
        file.create_dataset("actions", data=episode.actions)
        file.create_dataset("rewards", data=episode.rewards)
        file.create_dataset("states", data=episode.states)
        _set_attrs(file.attrs, {**attrs, "episode_seed": int(episode.seed)})


def _check_episode(episode: Episode) -> None:
    steps = len(episode.actions)
    expected = {
        "frames": ((steps + 1, *FRAME_SHAPE), np.uint8),
        "actions": ((steps, episode.actions.shape[-1]), np.float32),
        "rewards": ((steps,), np.float32),
        "states": ((steps + 1, episode.states.shape[-1]), np.float32),
    }
    for name, (shape, dtype) in expected.items():
        array = getattr(episode, name)
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"episode {name}: expected {dtype.__name__}{shape}, got {array.dtype}{array.shape}")


def read_episode(path: str | os.PathLike[str]) -> Episode:
    """Read a whole episode file into memory."""
    with h5py.File(path, "r") as file:
        return Episode(
            frames=file["frames"][...],
            actions=file["actions"][...],
            rewards=file["rewards"][...],
            states=file["states"][...],
            seed=int(file.attrs["episode_seed"]),
        )


def read_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All attrs of an HDF5 file as plain Python values (str, int, float, bool, lists)."""
    with h5py.File(path, "r") as file:
        return decode_attrs(file.attrs)


def decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    return {key: _plain(value) for key, value in attrs.items()}


def _plain(value: Any) -> Any:
    """h5py returns numpy scalars, arrays and bytes; callers compare attrs with JSON-like values."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def assemble_dataset(
    episode_paths: Sequence[str | os.PathLike[str]], path: str | os.PathLike[str], attrs: Mapping[str, Any]
) -> DatasetInfo:
    """Join episode files (all of the same shapes) into one dataset file, atomically.

    Episodes are read one at a time (any number of them, little memory); frame chunks are copied
    compressed; the episodes' seeds become ``episode_seeds``. Returns the validated result.
    """
    if not episode_paths:
        raise ValueError("no episodes to assemble")
    with h5py.File(episode_paths[0], "r") as first:
        shapes = {name: first[name].shape for name in ("frames", "actions", "rewards", "states")}
    count = len(episode_paths)
    with atomic_output(path) as temp, h5py.File(temp, "w") as file:
        frames = _frames_dataset(file, (count, *shapes["frames"]), episode_axis=True)
        arrays = {
            name: file.create_dataset(name, (count, *shapes[name]), np.float32)
            for name in ("actions", "rewards", "states")
        }
        seeds = np.empty(count, np.int64)
        for index, source in enumerate(episode_paths):
            with h5py.File(source, "r") as episode:
                for name, shape in shapes.items():
                    if episode[name].shape != shape:
                        raise InvalidDatasetError(f"{source}: {name} shape {episode[name].shape} != {shape}")
                _copy_frame_chunks(episode["frames"], frames, index)
                for name, dataset in arrays.items():
                    dataset[index] = episode[name][...]
                seeds[index] = int(episode.attrs["episode_seed"])
        file.create_dataset("episode_seeds", data=seeds)
        _set_attrs(file.attrs, attrs)
    return validate_dataset(path)


def _copy_frame_chunks(source: h5py.Dataset, target: h5py.Dataset, episode: int) -> None:
    """Copy an episode's compressed (16, 64, 64, 3) chunks into the (1, 16, 64, 64, 3) chunks of row
    ``episode``: same element count and memory order, hence the same compressed bytes."""
    if source.compression != target.compression or source.compression_opts != target.compression_opts:
        raise InvalidDatasetError("episode frames use another compression than the dataset")
    if source.chunks != target.chunks[1:]:
        raise InvalidDatasetError(f"episode frame chunks {source.chunks} do not match {target.chunks[1:]}")
    for start in range(0, source.shape[0], source.chunks[0]):
        filter_mask, chunk = source.id.read_direct_chunk((start, 0, 0, 0))
        target.id.write_direct_chunk((episode, start, 0, 0, 0), chunk, filter_mask)


def open_dataset(path: str | os.PathLike[str]) -> h5py.File:
    """Open a dataset file for reading; a truncated or non-HDF5 file raises InvalidDatasetError."""
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise InvalidDatasetError(f"{path}: not a readable HDF5 file ({detail(error)})") from None


class ProcessLocalDataset:
    """One dataset (e.g. ``frames``) of an HDF5 file, opened on first use in each process.

    An h5py handle must not cross a fork: a DataLoader worker or a SubprocVecEnv worker (forked or spawned)
    opens its own on first use instead of the parent's, and pickling drops the handle. ``options`` go to
    ``h5py.File`` (e.g. ``rdcc_nbytes``, the chunk cache).
    """

    def __init__(self, path: str | os.PathLike[str], name: str, **options: Any) -> None:
        self.path, self.name, self.options = Path(path), name, options
        self._dataset: h5py.Dataset | None = None  # the dataset object, not the file: saves a lookup per read
        self._pid = -1

    def get(self) -> h5py.Dataset:
        if self._dataset is None or self._pid != os.getpid():  # a forked child: the parent's is not ours
            self._dataset = h5py.File(self.path, "r", **self.options)[self.name]
            self._pid = os.getpid()
        return self._dataset

    @property
    def is_open(self) -> bool:
        """Whether this process holds an open handle."""
        return self._dataset is not None and self._pid == os.getpid()

    def close(self) -> None:
        """Close this process's handle (it reopens on the next ``get``)."""
        if self.is_open:
            assert self._dataset is not None
            self._dataset.file.close()
        self._dataset = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None, "_pid": -1}  # h5py handles cannot be pickled


def read_info(path: str | os.PathLike[str]) -> DatasetInfo:
    """Shapes and attrs of a dataset file, without reading its arrays."""
    with open_dataset(path) as file:
        return _info(Path(path), file)


def _info(path: Path, file: h5py.File) -> DatasetInfo:
    missing = [name for name in DATASET_NAMES if not isinstance(file.get(name), h5py.Dataset)] + [
        name for name in REQUIRED_ATTRS if name not in file.attrs
    ]
    if missing:
        raise InvalidDatasetError(f"{path}: missing {', '.join(missing)}")
    if file["actions"].ndim != 3 or file["states"].ndim != 3:
        raise InvalidDatasetError(f"{path}: actions or states is not (episodes, steps, size)")
    try:
        attrs = decode_attrs(file.attrs)
    except OSError as error:  # a damaged attribute block
        raise InvalidDatasetError(f"{path}: unreadable attributes ({detail(error)})") from None
    episodes, steps = file["actions"].shape[:2]
    try:
        task, split, action_repeat = str(attrs["task"]), str(attrs["split"]), int(attrs["action_repeat"])
    except (TypeError, ValueError):
        raise InvalidDatasetError(f"{path}: attrs task, split or action_repeat of a foreign kind") from None
    return DatasetInfo(
        path=path,
        task=task,
        split=split,
        num_episodes=int(episodes),
        episode_steps=int(steps),
        action_dim=int(file["actions"].shape[2]),
        state_dim=int(file["states"].shape[2]),
        action_repeat=action_repeat,
        attrs=attrs,
    )


def validate_dataset(path: str | os.PathLike[str]) -> DatasetInfo:
    """Check a dataset file against the layout (shapes, dtypes, chunks, attrs, finite rewards and
    states); raise InvalidDatasetError naming the first problem. Frames are not decompressed."""
    path = Path(path)
    with open_dataset(path) as file:
        info = _info(path, file)
        episodes, steps = info.num_episodes, info.episode_steps
        expected = {
            "frames": ((episodes, steps + 1, *FRAME_SHAPE), np.uint8),
            "actions": ((episodes, steps, info.action_dim), np.float32),
            "rewards": ((episodes, steps), np.float32),
            "states": ((episodes, steps + 1, info.state_dim), np.float32),
            "episode_seeds": ((episodes,), np.int64),
        }
        for name, (shape, dtype) in expected.items():
            dataset = file[name]
            if dataset.shape != shape or dataset.dtype != dtype:
                raise InvalidDatasetError(f"{path}: {name} is {dataset.dtype}{dataset.shape}, expected {shape} {dtype}")
        if file["frames"].chunks != (1, frame_chunk_steps(steps + 1), *FRAME_SHAPE):
            raise InvalidDatasetError(f"{path}: frames chunks {file['frames'].chunks}")
        try:
            checks = {
                "num_episodes": (info.attrs["num_episodes"], episodes),
                "episode_steps": (info.attrs["episode_steps"], steps),
                "state_sizes": (sum(info.attrs["state_sizes"]), info.state_dim),
                "state_keys": (len(info.attrs["state_keys"]), len(info.attrs["state_sizes"])),
            }
        except TypeError:  # e.g. a number where a list belongs
            raise InvalidDatasetError(f"{path}: attrs state_sizes or state_keys of a foreign kind") from None
        for name, (stored, actual) in checks.items():
            if stored != actual:
                raise InvalidDatasetError(f"{path}: attr {name} says {stored}, the data says {actual}")
        for name in ("rewards", "states", "actions"):
            try:
                values = file[name][...]
            except OSError as error:  # a damaged chunk
                raise InvalidDatasetError(f"{path}: {name} unreadable ({detail(error)})") from None
            if not np.isfinite(values).all():
                raise InvalidDatasetError(f"{path}: {name} has non-finite values")
    return info
