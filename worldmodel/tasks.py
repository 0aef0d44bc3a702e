"""The six DeepMind Control tasks of the paper (Minderer et al. 2019, S2.3) and their data conventions.

Every script names tasks by the short names below; ``all`` means the six. Action repeat defaults follow
PlaNet (acrobot and walker-stand chosen here) and can be overridden; the value used is always stored
with the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worldmodel.errors import InputError

CONTROL_STEPS_PER_EPISODE = 1000  # dm_control's time limit for all six tasks at their control timestep
MAX_ACTION_DIM = 6  # one model serves all tasks: actions are zero-padded to the largest action size
IMAGE_SIZE = 64


@dataclass(frozen=True)
class TaskSpec:
    name: str
    """Short name used in ids, file names and on the command line."""
    domain: str
    """dm_control domain name."""
    task: str
    """dm_control task name within the domain."""
    action_dim: int
    """Size of the task's own action vector (before zero-padding to MAX_ACTION_DIM)."""
    action_repeat: int
    """Default number of control steps one agent action is held for."""

    def horizon(self, action_repeat: int | None = None) -> int:
        """Agent steps per episode: 1000 control steps divided by the action repeat."""
        repeat = self.action_repeat if action_repeat is None else action_repeat
        return CONTROL_STEPS_PER_EPISODE // repeat


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("acrobot", "acrobot", "swingup", action_dim=1, action_repeat=4),
        TaskSpec("cartpole", "cartpole", "balance", action_dim=1, action_repeat=8),
        TaskSpec("cheetah", "cheetah", "run", action_dim=6, action_repeat=4),
        TaskSpec("reacher", "reacher", "easy", action_dim=2, action_repeat=4),
        TaskSpec("walker-stand", "walker", "stand", action_dim=6, action_repeat=2),
        TaskSpec("walker-walk", "walker", "walk", action_dim=6, action_repeat=2),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def task_id(name: str) -> int:
    """Stable integer id of a task (its position in TASK_NAMES), used as the per-window task label."""
    return TASK_NAMES.index(get_task(name).name)


def get_task(name: str, option: str = "") -> TaskSpec:
    """The spec of a task by short name; a clear error lists the valid names otherwise, prefixed by the
    command-line ``option`` the name came from, if given."""
    try:
        return TASKS[name]
    except KeyError:
        prefix = f"{option}: " if option else ""
        raise InputError(f"{prefix}unknown task {name!r}: choose from {', '.join(TASK_NAMES)} (or 'all')") from None


def parse_tasks(text: str) -> list[str]:
    """Parse a comma-separated task list (or ``all``) into validated short names, in the given order."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise InputError(f"no task given: choose from {', '.join(TASK_NAMES)} (or 'all')")
    if names == ["all"]:
        return list(TASK_NAMES)
    for name in names:
        get_task(name)
    return list(dict.fromkeys(names))  # drop repeats, keep order


def pad_actions(actions: np.ndarray) -> np.ndarray:
    """(..., A) task actions -> (..., MAX_ACTION_DIM) float32, zero-padded (one model serves all tasks)."""
    padded = np.zeros((*actions.shape[:-1], MAX_ACTION_DIM), np.float32)
    padded[..., : actions.shape[-1]] = actions
    return padded
