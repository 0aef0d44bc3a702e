"""Uniform-random-action episodes of the collector (``collect/dmcs.py``): what decides a dataset file's
contents (``GroupSettings``), each episode's seeds, and the rollout a worker runs.

The agent-acted episodes of ``--policy`` have the same three things in ``collect/agent.py``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from envs.simulator import CAMERA_ID, Simulator
from worldmodel import storage
from worldmodel.tasks import IMAGE_SIZE, task_id


class GroupSettings(NamedTuple):
    """Everything that determines the contents of one <task>_<split>.h5 (stored with it as JSON)."""

    format_version: int
    task: str
    split: str
    seed: int
    episodes: int
    episode_steps: int  # T, agent steps per stored episode
    episode_steps_cap: int | None  # the --episode-steps option
    action_repeat: int
    render: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return self._asdict()

    @property
    def name(self) -> str:
        return f"{self.task}_{self.split}"

    def env_seed(self, episode: int) -> int:
        return episode_seeds(self.seed, self.task, self.split, episode)[0]

    def extra_attrs(self) -> dict[str, Any]:
        return {}  # random episodes: nothing beside the attrs every dataset file has


def episode_seeds(seed: int, task: str, split: str, episode: int) -> tuple[int, np.random.SeedSequence]:
    """The environment seed and the action-noise seed sequence of one episode.

    Derived from (seed, task index, split, episode index) only, so any subset of tasks, order of work
    or resume yields the same episodes. The environment seed's lowest bit is the split index: train and
    test seeds never coincide.
    """
    split_index = storage.SPLITS.index(split)
    episode_sequence = np.random.SeedSequence(seed, spawn_key=(task_id(task), split_index, episode))
    env_sequence, action_sequence = episode_sequence.spawn(2)
    return storage.episode_env_seed(env_sequence, split), action_sequence  # 32-bit, lowest bit the split


_SIMULATORS: dict[tuple[str, int, bool], Simulator] = {}  # one Simulator per task in each worker, reused

def _simulator(settings: GroupSettings) -> Simulator:
    key = (settings.task, settings.action_repeat, settings.render["fast_render"])
    if key not in _SIMULATORS:
        _SIMULATORS[key] = Simulator(settings.task, settings.action_repeat, fast_render=key[2], camera_id=CAMERA_ID)
    return _SIMULATORS[key]


def random_episode(settings: GroupSettings, index: int) -> tuple[storage.Episode, list[tuple[str, int]]]:
    """One uniform-random-action episode and the simulator's state layout."""
    simulator = _simulator(settings)
    env_seed, action_sequence = episode_seeds(settings.seed, settings.task, settings.split, index)
    steps = settings.episode_steps
    # One uniform draw per agent step; float32 so the stored action is exactly the applied one.
    actions = np.random.default_rng(action_sequence).uniform(
        simulator.action_low, simulator.action_high, size=(steps, len(simulator.action_low))
    ).astype(np.float32)
    frames = np.empty((steps + 1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    states = np.empty((steps + 1, simulator.state_dim), np.float32)
    rewards = np.empty(steps, np.float32)
    frames[0], states[0] = simulator.reset(env_seed)
    for t in range(steps):
        transition = simulator.step(actions[t])
        frames[t + 1], rewards[t], states[t + 1] = transition.frame, transition.reward, transition.state
    return storage.Episode(frames, actions, rewards, states, env_seed), simulator.state_layout
