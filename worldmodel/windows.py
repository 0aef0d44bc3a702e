"""Windows inside episodes: the one place that says which windows exist and how they are numbered.

A window is ``length`` consecutive steps that lie inside one episode (it never crosses an episode's end).
In an episode of T steps the windows start at 0, stride, 2*stride, ... up to T - length, so there are
``floor((T - length) / stride) + 1`` of them (none when T < length). Windows are numbered episode-major:
window i lies in episode ``i // per_episode`` and starts at ``(i % per_episode) * stride``.

The dataset (``worldmodel.data``), the envs' real contexts (``envs.context``) and the keypoint cache of
staged training (``worldmodel.keypoint_cache``) all count windows this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


def windows_per_episode(episode_steps: int, length: int, stride: int = 1) -> int:
    """Windows of ``length`` steps (every ``stride``-th start) inside an episode of ``episode_steps`` steps."""
    if length < 1 or stride < 1:
        raise ValueError(f"length and stride must be positive, got length={length}, stride={stride}")
    return max(0, (episode_steps - length) // stride + 1)


class EpisodeWindows(NamedTuple):
    """The windows of ``num_episodes`` episodes of ``episode_steps`` steps each, by arithmetic alone (no table)."""

    num_episodes: int
    episode_steps: int
    length: int
    stride: int = 1

    @property
    def per_episode(self) -> int:
        return windows_per_episode(self.episode_steps, self.length, self.stride)

    def __len__(self) -> int:
        return self.num_episodes * self.per_episode

    def locate(self, index: int) -> tuple[int, int]:
        """(episode, start) of window ``index`` (0 <= index < len(self))."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        episode, position = divmod(index, self.per_episode)
        return episode, position * self.stride

    def table(self) -> np.ndarray:
        """Every window's (episode, start), in order: int64 (len(self), 2)."""
        episodes, positions = np.divmod(np.arange(len(self), dtype=np.int64), self.per_episode)
        return np.stack([episodes, positions * self.stride], axis=1)


def flat_window_starts(
    episode_starts: Sequence[int] | Tensor, episode_lengths: Sequence[int] | Tensor, length: int, stride: int = 1
) -> Tensor:
    """For episodes concatenated along one axis (episode e fills rows ``episode_starts[e]`` onward, for
    ``episode_lengths[e]`` rows): the row of the first step of every window, in order, int64 (N,)."""
    starts = [
        int(first) + torch.arange(windows_per_episode(int(size), length, stride), dtype=torch.int64) * stride
        for first, size in zip(episode_starts, episode_lengths)
    ]
    return torch.cat(starts) if starts else torch.zeros(0, dtype=torch.int64)
