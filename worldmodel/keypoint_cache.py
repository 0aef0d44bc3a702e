"""The keypoint cache of staged training: every frame's detected keypoints, tied to the detector that made them.

Staged training (``train/world_model.py --mode staged``) detects the keypoints of every frame of the
dataset once, after the vision stage, and trains the dynamics on them. It leaves them in
``<run dir>/keypoints.pt`` (``KEYPOINT_CACHE_FILE``), one ``KeypointSplit`` per split, tagged with the
fingerprint of the vision weights; readers (the envs' dataset contexts, the dynamics benchmark) use the
cache only when that fingerprint is their model's.

Layout: a ``torch.save`` dict loadable with ``weights_only=True``::

    vision_fingerprint   str, ``vision_fingerprint(model)``
    data_layout          ``data_layout(root, tasks)``: per split, the files detected ([name, episodes, steps],
                         main files and their named parts in episode order); absent in caches of older versions
    train, test          ``KeypointSplit._asdict()`` of each split

A cache is used only for the data it was detected on: the trainer passes the data's layout, so a part added
to the dataset since (or a run that took another run's cache with ``--vision-from``) detects again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from worldmodel import storage
from worldmodel.atomic import UnreadableTorchFile, atomic_torch_save, load_torch_file
from worldmodel.fingerprint import model_fingerprint
from worldmodel.model import WorldModel, vision_modules
from worldmodel.precision import Autocast
from worldmodel.windows import flat_window_starts

KEYPOINT_CACHE_FILE = "keypoints.pt"


class KeypointSplit(NamedTuple):
    """Detected keypoints of every frame of one split, episodes concatenated along the first axis."""

    keypoints: Tensor  # (N, K, 3) float32
    actions: Tensor  # (N, 6) float32, actions[i] applied at frame i
    episode_starts: Tensor  # (E,) int64, first row of each episode
    episode_lengths: Tensor  # (E,) int64, frames per episode (T: the final frame, which no window uses, is left out)
    task_ids: Tensor  # (E,) int64

    @classmethod
    def from_episodes(
        cls, keypoints: Sequence[Tensor], actions: Sequence[Tensor], lengths: Sequence[int], task_ids: Sequence[int]
    ) -> KeypointSplit:
        """Concatenate per-part rows (each (n, K, 3) and (n, 6)) of episodes of the given lengths and tasks."""
        lengths_tensor = torch.tensor(list(lengths), dtype=torch.int64)
        return cls(
            keypoints=torch.cat(list(keypoints)),
            actions=torch.cat(list(actions)),
            episode_starts=torch.cumsum(lengths_tensor, 0) - lengths_tensor,
            episode_lengths=lengths_tensor,
            task_ids=torch.tensor(list(task_ids), dtype=torch.int64),
        )

    def window_starts(self, length: int) -> Tensor:
        """Flat row of the first frame of every window of ``length`` frames inside one episode."""
        return flat_window_starts(self.episode_starts, self.episode_lengths, length)

    def windows(self, starts: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Gather windows: starts (B,) -> keypoints (B, L, K, 3), actions (B, L, 6)."""
        rows = starts[:, None] + torch.arange(length)
        return self.keypoints[rows], self.actions[rows]

    def sequences(self, length: int) -> Tensor:
        """Non-overlapping chunks of ``length`` frames of every episode: (N, length, K, 3), for the
        dynamics' normalisation (within-sequence statistics)."""
        starts = flat_window_starts(self.episode_starts, self.episode_lengths, length, stride=length)
        return self.windows(starts, length)[0]


def vision_fingerprint(model: WorldModel) -> str:
    """Hash of the vision weights: ties a keypoint cache to the detector that made it."""
    return model_fingerprint(torch.nn.ModuleList(vision_modules(model)))


def data_layout(root: Path, tasks: Sequence[str]) -> dict[str, list[list[Any]]]:
    """Per split, [file name, episodes, steps] of every file the keypoints are detected in, in the cache's
    episode order (per task: the main file, then its parts; ``storage.dataset_files``)."""
    return {
        split: [[info.path.name, info.num_episodes, info.episode_steps]
                for task in tasks for info in storage.checked_dataset_files(root, task, split)]  # fmt: skip
        for split in storage.SPLITS
    }


def save_keypoint_cache(
    path: Path, splits: dict[str, KeypointSplit], fingerprint: str, layout: dict[str, list[list[Any]]] | None = None
) -> None:
    """Write the cache atomically; ``fingerprint`` is ``vision_fingerprint`` of the detecting model, ``layout``
    the ``data_layout`` of the data it was detected on."""
    payload: dict[str, Any] = {"vision_fingerprint": fingerprint}
    if layout is not None:
        payload["data_layout"] = layout
    payload.update({name: split._asdict() for name, split in splits.items()})
    atomic_torch_save(payload, path)


def load_keypoint_cache(
    path: Path, fingerprint: str, layout: dict[str, list[list[Any]]] | None = None
) -> dict[str, KeypointSplit] | None:
    """The cache if it exists and was made by the vision weights of ``fingerprint`` (and, given ``layout``, on
    data of that ``data_layout``), else None. An older cache without a layout counts as one of the main files
    alone."""
    if not path.is_file():
        return None
    try:
        payload = load_torch_file(path)
    except UnreadableTorchFile:  # damaged: detected again, like a missing cache
        return None
    if not isinstance(payload, dict) or payload.get("vision_fingerprint") != fingerprint:
        return None
    if layout is not None:
        stored = payload.get("data_layout")
        if stored is None:  # made before parts existed: valid while the data has no part
            if any(name.count(".") > 1 for files in layout.values() for name, *_ in files):
                return None
        elif stored != layout:
            return None
    return {name: KeypointSplit(**payload[name]) for name in ("train", "test") if name in payload}


@torch.no_grad()
def detect_in_chunks(
    model: WorldModel, frames: Tensor, chunk: int, autocast: Autocast = contextlib.nullcontext
) -> Tensor:
    """uint8 frames (N, 64, 64, 3) on the model's device -> keypoints (N, K, 3) float32, detected ``chunk``
    frames per call under ``autocast()`` (bounds the activations' memory)."""
    parts = []
    for begin in range(0, frames.shape[0], chunk):
        with autocast():
            parts.append(model.detect(frames[None, begin : begin + chunk])[0].float())
    return torch.cat(parts)
