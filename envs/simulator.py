"""A dm_control task as the data pipeline sees it: agent steps with action repeat, 64x64 frames.

Shared by the collector (``collect/dmcs.py``) and the real pixel envs (``StructVRNN-Real-<task>``) so
both produce exactly the same frames, rewards and states for the same seed and actions.

Conventions (those of the datasets, docs/CONTRACTS.md): one agent action is held for ``action_repeat`` control steps and the
agent step's reward is the sum of their rewards; frames are ``physics.render(64, 64, camera_id=0)``;
the low-dimensional state is the task's observation dict flattened in dm_control's key order
(see ``state_layout``).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

# Headless rendering: EGL works with Mesa's software EGL and on GPUs; must be set before dm_control loads.
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from worldmodel.errors import InputError  # noqa: E402
from worldmodel.tasks import IMAGE_SIZE, TaskSpec, get_task  # noqa: E402

# Smaller shadow maps and no multisampling: ~2.5x the frames/s, mean pixel difference <= 1/255 (docs/DECISIONS.md).
FAST_RENDER_SETTINGS = {"shadowsize": 1024, "offsamples": 0}
CAMERA_ID = 0  # the tasks' default camera


def render_settings(fast_render: bool, image_size: int = IMAGE_SIZE, camera_id: int = CAMERA_ID) -> dict[str, int | bool]:
    """What frames are rendered with, stored with the data so datasets never mix settings (the collector
    needs it before any Simulator exists)."""
    return {
        "fast_render": fast_render,
        "image_size": image_size,
        "camera_id": camera_id,
        **(FAST_RENDER_SETTINGS if fast_render else {}),
    }


class Transition(NamedTuple):
    frame: np.ndarray  # (64, 64, 3) uint8, the frame the step leads to
    reward: float  # sum of the control-step rewards of this agent step
    state: np.ndarray  # (D,) float32, flattened low-dimensional observation after the step


class Simulator:
    """One dm_control task stepped at the agent's rate and rendered at 64x64 from camera 0."""

    def __init__(
        self,
        task: str,
        action_repeat: int | None = None,
        fast_render: bool = True,
        image_size: int = IMAGE_SIZE,
        camera_id: int = CAMERA_ID,
    ) -> None:
        from dm_control import suite  # imported late: it is slow and needs MUJOCO_GL set

        self.spec: TaskSpec = get_task(task)
        self.action_repeat = self.spec.action_repeat if action_repeat is None else int(action_repeat)
        if self.action_repeat < 1:
            raise InputError(f"action_repeat must be >= 1, got {self.action_repeat}")
        self.horizon = self.spec.horizon(self.action_repeat)
        self.fast_render = fast_render
        self.image_size = image_size
        self.camera_id = camera_id
        self._env = suite.load(self.spec.domain, self.spec.task, task_kwargs={"random": 0})
        if fast_render:
            quality = self._env.physics.model.vis.quality
            quality.shadowsize = FAST_RENDER_SETTINGS["shadowsize"]
            quality.offsamples = FAST_RENDER_SETTINGS["offsamples"]
        self.state_layout: list[tuple[str, int]] = [
            (key, int(np.prod(spec.shape))) for key, spec in self._env.observation_spec().items()
        ]
        self.state_dim = sum(size for _, size in self.state_layout)
        action_spec = self._env.action_spec()
        self.action_low = action_spec.minimum.astype(np.float32)
        self.action_high = action_spec.maximum.astype(np.float32)

    def reset(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Start an episode whose initial state is drawn from ``seed``; returns (frame, state)."""
        self._env.task.random.seed(seed)  # reseed the task's RandomState in place: no reload needed
        time_step = self._env.reset()
        return self.render(), self._flatten(time_step.observation)

    def step(self, action: np.ndarray) -> Transition:
        """Hold ``action`` (the task's own size) for ``action_repeat`` control steps."""
        reward, time_step = self._hold(action)
        return Transition(self.render(), reward, self._flatten(time_step.observation))

    def step_reward(self, action: np.ndarray) -> float:
        """As ``step``, without rendering or reading the state: the reward only (replaying actions for returns)."""
        return self._hold(action)[0]

    def _hold(self, action: np.ndarray) -> tuple[float, Any]:
        reward = 0.0
        for _ in range(self.action_repeat):
            time_step = self._env.step(action)
            reward += float(time_step.reward or 0.0)
        return reward, time_step

    def render(self) -> np.ndarray:
        return self._env.physics.render(self.image_size, self.image_size, camera_id=self.camera_id)

    def render_settings(self) -> dict[str, int | bool]:
        """What this simulator renders with (``render_settings``)."""
        return render_settings(self.fast_render, self.image_size, self.camera_id)

    def close(self) -> None:
        self._env.close()

    @staticmethod
    def _flatten(observation: dict) -> np.ndarray:
        return np.concatenate([np.asarray(v, np.float32).ravel() for v in observation.values()])
