"""The real context an imagined episode starts from, and filtering it through the world model's posterior.

An imagined episode (``envs.imagined``) begins like the paper's open-loop predictions: ``CONTEXT_LENGTH``
(8) real frames and the actions between them are filtered through the posterior (detect -> observe), and
the episode continues from the resulting state with prior samples. The context comes from

- ``DatasetContexts``: a window of the dataset's test split (the default), or
- ``SimulatorContexts``: a fresh episode of the real dm_control task driven by uniform random actions
  (the data's policy) from its reset frame,

chosen with the env's seeded ``np.random.Generator``.

Choices written down here:

* Dataset contexts: every window of the test split is equally likely (starts ``s <= T - 8``, the
  windows ``worldmodel.data.WindowDataset`` serves), over the episodes of the main file and of its named
  parts (``storage.dataset_files``), numbered like ``WindowDataset`` and the keypoint cache number them. Detection is the cost of a reset (docs/DECISIONS.md),
  so it is avoided: a staged training run (``train/world_model.py --mode staged``) leaves every test frame's keypoints in
  ``<run dir>/keypoints.pt``, tagged with the detector weights' fingerprint; when that file matches the
  model and the dataset, contexts read their keypoints from it. Otherwise each window's 8 frames are
  detected in one call of fixed shape and kept in a per-process LRU cache, so a window gives
  bit-identical keypoints however many envs reset together.
* The context's last action ``a_7`` is never used: the agent's first action replaces it.
* Filtering runs the model's own recurrence (its dynamics core's ``unroll``, whichever core it is) with
  noise passed in rather than drawn
  from one generator, because every sub-env of a batch draws from its own seeded stream: a vector env
  then gives exactly what the same sub-envs give one by one (``tests/test_envs_imagined.py`` checks it
  against ``WorldModel.observe``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import h5py
import numpy as np
import torch
from torch import Tensor

from envs.simulator import Simulator  # cheap: dm_control itself loads when a Simulator is made
from worldmodel import storage
from worldmodel.config import OBSERVED_STEPS
from worldmodel.dynamics_core import CoreCarry
from worldmodel.errors import InputError, MissingInputError
from worldmodel.keypoint_cache import detect_in_chunks, load_keypoint_cache, vision_fingerprint
from worldmodel.model import WorldModel, inference_autocast, previous_actions
from worldmodel.tasks import MAX_ACTION_DIM, get_task, pad_actions, task_id
from worldmodel.windows import EpisodeWindows

CONTEXT_LENGTH = OBSERVED_STEPS  # real frames filtered before imagination starts (Figure 8)
DETECT_CHUNK = 128  # frames per detector call (bounds the activations' memory)
WINDOW_CACHE_SIZE = 4096  # detected windows kept per context source (8 x K x 3 floats each: ~25 MB at K = 64)
CONTEXT_SOURCES = ("dataset", "simulator")


class Context(NamedTuple):
    """One real context, ready for the posterior (all tensors on the model's device)."""

    keypoints: Tensor  # (L, K, 3) float32, detected in the context's frames
    actions: Tensor  # (L, 6) float32, actions[i] applied at frame i, zero-padded; actions[L-1] is never used
    first_frame: Tensor | None  # (64, 64, 3) uint8, the context's first frame (for decoding), if asked for
    info: dict[str, int]  # where it came from: dataset episode and start, or simulator episode seed


class ContextSource(Protocol):
    """Draws real contexts of one task with a caller's random generator."""

    task: str
    action_repeat: int

    def sample(self, rng: np.random.Generator, with_frame: bool, from_start: bool = False) -> Context:
        """A context drawn with ``rng``; ``from_start``: the first frames of an episode (its initial state)."""
        ...


@torch.inference_mode()
def detect_frames(model: WorldModel, frames: Tensor, chunk: int = DETECT_CHUNK) -> Tensor:
    """uint8 frames (N, 64, 64, 3) on the model's device -> keypoints (N, K, 3) float32, in fixed chunks."""
    return detect_in_chunks(model, frames, chunk, lambda: inference_autocast(frames.device))


# ----------------------------------------------------------------------------------------------
# Context sources
# ----------------------------------------------------------------------------------------------
class DatasetContexts:
    """Contexts from a dataset split (``<root>/<task>_<split>.h5`` and its parts): uniformly drawn windows of
    ``length`` frames with their actions; keypoints from the trainer's cache when given, else detected per window."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        task: str,
        model: WorldModel,
        action_repeat: int,
        split: str = "test",
        length: int = CONTEXT_LENGTH,
        keypoint_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        self.task = get_task(task).name
        self.root = Path(root)
        self.split = split
        self.path = storage.dataset_path(self.root, self.task, split)
        if not self.path.is_file():
            error = storage.missing_dataset_error(self.root, self.task, split)
            raise MissingInputError(f"{error} (or pass data=<dataset dir>, or context='simulator')")
        self.infos = storage.checked_dataset_files(self.root, self.task, split)  # damaged or foreign: InputError
        self.info = self.infos[0]  # the main file; its parts share its action repeat and episode length
        self.num_episodes = sum(info.num_episodes for info in self.infos)
        # Episode e of the split lies in file file_of[e] at row e - first_episode[file_of[e]].
        self._first_episode = np.cumsum([0] + [info.num_episodes for info in self.infos])
        if self.info.action_repeat != action_repeat:
            raise InputError(
                f"{self.path} was collected with action repeat {self.info.action_repeat}, but the world model "
                f"was trained on {self.task} with action repeat {action_repeat}; pass data= a matching dataset"
            )
        if self.info.episode_steps < length:
            raise InputError(
                f"episodes of {self.path} have {self.info.episode_steps} steps, fewer than a context of {length}; "
                "pass data= a dataset of longer episodes, or context='simulator'"
            )
        self.action_repeat = action_repeat
        self.model = model
        self.device = next(model.parameters()).device
        self.length = length
        self.windows = EpisodeWindows(self.num_episodes, self.info.episode_steps, length)  # every start
        actions = []
        for info in self.infos:  # small arrays once; frames are read per window, lazily
            with h5py.File(info.path, "r") as file:
                actions.append(pad_actions(file["actions"][...]))
        self._actions = torch.from_numpy(np.concatenate(actions)).to(self.device)  # (E, T, 6)
        self.cached_keypoints = self._trainer_keypoints(keypoint_cache) if keypoint_cache else None  # (E, T, K, 3)
        self._windows: OrderedDict[tuple[int, int], Tensor] = OrderedDict()  # (episode, start) -> (L, K, 3)
        # SubprocVecEnv workers open their own
        self._frames = [storage.ProcessLocalDataset(info.path, "frames") for info in self.infos]
        self._lock = threading.Lock()

    def _trainer_keypoints(self, path: str | os.PathLike[str]) -> Tensor | None:
        """This task's split from a staged run's keypoint cache, if it was made by this model's detector on
        this dataset (same episodes, same lengths); None otherwise."""
        try:
            splits = load_keypoint_cache(Path(path), vision_fingerprint(self.model))
        except (OSError, RuntimeError, KeyError, TypeError):  # unreadable or another layout: detect instead
            return None
        if not splits or self.split not in splits:
            return None
        cached = splits[self.split]
        mine = torch.nonzero(cached.task_ids == task_id(self.task)).flatten()
        steps = self.info.episode_steps
        if len(mine) != self.num_episodes or bool((cached.episode_lengths[mine] != steps).any()):
            return None
        rows = cached.episode_starts[mine][:, None] + torch.arange(steps)  # (E, T)
        return cached.keypoints[rows].float().to(self.device)

    def window_keypoints(self, episode: int, start: int) -> Tensor:
        """(L, K, 3) keypoints of frames start .. start+L-1 of an episode."""
        if self.cached_keypoints is not None:
            return self.cached_keypoints[episode, start : start + self.length]
        key = (episode, start)
        with self._lock:
            keypoints = self._windows.get(key)
            if keypoints is None:
                frames = torch.from_numpy(self._episode_frames(episode, slice(start, start + self.length))).to(self.device)
                keypoints = detect_frames(self.model, frames)
                self._windows[key] = keypoints
                if len(self._windows) > WINDOW_CACHE_SIZE:
                    self._windows.popitem(last=False)
            else:
                self._windows.move_to_end(key)
            return keypoints

    def sample(self, rng: np.random.Generator, with_frame: bool, from_start: bool = False) -> Context:
        if from_start:
            episode, start = int(rng.integers(self.num_episodes)), 0
        else:
            episode, start = self.windows.locate(int(rng.integers(len(self.windows))))
        keypoints = self.window_keypoints(episode, start)
        actions = self._actions[episode, start : start + self.length]
        first_frame = None
        if with_frame:
            with self._lock:
                first_frame = torch.from_numpy(self._episode_frames(episode, start)).to(self.device)
        return Context(keypoints, actions, first_frame, {"context_episode": episode, "context_start": start})

    def _episode_frames(self, episode: int, steps: slice | int) -> np.ndarray:
        """Frames ``steps`` of episode ``episode`` of the split (numbered across the main file and its parts)."""
        file = int(np.searchsorted(self._first_episode, episode, side="right")) - 1
        return self._frames[file].get()[episode - int(self._first_episode[file]), steps]

    def close(self) -> None:
        for frames in self._frames:
            frames.close()


class SimulatorContexts:
    """Contexts from the real task: reset with a drawn episode seed, then uniform random actions."""

    def __init__(self, task: str, model: WorldModel, action_repeat: int, length: int = CONTEXT_LENGTH) -> None:
        self.task = get_task(task).name
        self.action_repeat = action_repeat
        self.model = model
        self.device = next(model.parameters()).device
        self.length = length
        self.simulator = Simulator(self.task, action_repeat=action_repeat)
        self._lock = threading.Lock()

    def sample(self, rng: np.random.Generator, with_frame: bool, from_start: bool = False) -> Context:
        """Always from the start of an episode (``from_start`` changes nothing)."""
        episode_seed = int(rng.integers(2**31 - 1))
        action_dim = self.simulator.spec.action_dim
        # The data's policy (collect/dmcs.py): uniform in [-1, 1], one draw per agent step.
        actions = rng.uniform(-1.0, 1.0, (self.length - 1, action_dim)).astype(np.float32)
        with self._lock:
            frame, _ = self.simulator.reset(episode_seed)
            frames = [frame]
            for action in actions:
                frames.append(self.simulator.step(action).frame)
        frames_tensor = torch.from_numpy(np.stack(frames)).to(self.device)  # (L, 64, 64, 3)
        padded = np.concatenate([pad_actions(actions), np.zeros((1, MAX_ACTION_DIM), np.float32)])
        return Context(
            detect_frames(self.model, frames_tensor),
            torch.from_numpy(padded).to(self.device),
            frames_tensor[0] if with_frame else None,
            {"context_seed": episode_seed},
        )

    def close(self) -> None:
        self.simulator.close()


# ----------------------------------------------------------------------------------------------
# The posterior filter with per-env noise
# ----------------------------------------------------------------------------------------------
def posterior_noise(generator: torch.Generator, model: WorldModel, length: int = CONTEXT_LENGTH) -> Tensor:
    """The standard normal draws ``WorldModel.observe`` makes for one sequence: (length, samples, Z).

    Drawn in the order ``observe`` draws them for a batch of one ((samples, 1, Z) per frame), so the same
    generator state gives the same filtered state as ``model.observe(..., generator=generator)``.
    """
    core = model.dynamics
    return torch.randn((length, core.best_of, core.noise_size), generator=generator)


def posterior_step(
    model: WorldModel, carry: CoreCarry | None, action: Tensor, target: Tensor, noise: Tensor
) -> tuple[CoreCarry, Tensor]:
    """One observed frame through the model's own dynamics core (``observe_step``) with the given draws.

    carry: the state after the previous frame, or None for the first frame of a sequence.
    action (B, 6): the action that produced this frame (a_{t-1}); target (B, F): the frame's detected
    keypoints, normalised; noise (S, B, noise_size): the best-of-S standard normal draws.
    Returns the carry after this frame and its hidden state (B, H) (the state that predicts it).
    """
    step = model.dynamics.observe_step(carry, action, target, num_samples=noise.shape[0], noise=noise)
    return step.carry, step.hidden


class FilteredContext(NamedTuple):
    carry: CoreCarry  # after the context's last frame (normalised keypoints), what imagination continues from
    hidden: Tensor  # (B, L, H) hidden states of the context's frames (warm-up of the reward predictor)


@torch.inference_mode()
def filter_context(model: WorldModel, keypoints: Tensor, actions: Tensor, noise: Tensor) -> FilteredContext:
    """Posterior over a batch of contexts, as ``WorldModel.observe`` with per-context draws: keypoints
    (B, L, K, 3), actions (B, L, 6) (actions[:, t] applied at frame t), noise (B, L, S, noise_size) from
    ``posterior_noise`` per context."""
    targets = model.normalizer.normalize(keypoints.flatten(2))  # (B, L, F)
    unroll = model.dynamics.unroll(
        previous_actions(actions),
        targets,
        num_observed=keypoints.shape[1],
        num_samples=noise.shape[2],
        noise=noise.permute(1, 2, 0, 3),  # (L, S, B, noise_size)
    )
    return FilteredContext(unroll.final, unroll.hidden)


# ----------------------------------------------------------------------------------------------
# One source per process and setting, shared by all envs (so detections are cached once)
# ----------------------------------------------------------------------------------------------
_SOURCES: dict[tuple[Any, ...], ContextSource] = {}
_SOURCES_LOCK = threading.Lock()


def context_source(
    kind: str,
    task: str,
    model: WorldModel,
    fingerprint: str,
    action_repeat: int,
    data: str | os.PathLike[str] | None,
    keypoint_cache: str | os.PathLike[str] | None = None,
) -> ContextSource:
    """The shared ``DatasetContexts`` (kind 'dataset', from ``data``, with the trainer's ``keypoint_cache``
    of that dataset if any) or ``SimulatorContexts`` ('simulator')."""
    if kind not in CONTEXT_SOURCES:
        raise InputError(f"context must be one of {', '.join(CONTEXT_SOURCES)}, got {kind!r}")
    device = str(next(model.parameters()).device)
    if kind == "dataset":
        if data is None:
            raise InputError("context='dataset' needs a dataset directory; pass data=<dataset dir>")
        key: tuple[Any, ...] = (
            kind, str(Path(data).resolve()), task, fingerprint, device, action_repeat, str(keypoint_cache)
        )
    else:
        key = (kind, task, fingerprint, device, action_repeat)
    with _SOURCES_LOCK:
        source = _SOURCES.get(key)
        if source is None:
            if kind == "dataset":
                assert data is not None
                source = DatasetContexts(data, task, model, action_repeat, keypoint_cache=keypoint_cache)
            else:
                source = SimulatorContexts(task, model, action_repeat)
            _SOURCES[key] = source
        return source
