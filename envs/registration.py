"""Gymnasium ids for the six tasks; registration is lazy (entry points are strings)."""

from __future__ import annotations

import gymnasium as gym

from worldmodel.tasks import TASK_NAMES


def register_all() -> None:
    for name in TASK_NAMES:
        real_id = f"StructVRNN-Real-{name}"
        if real_id not in gym.registry:
            gym.register(id=real_id, entry_point="envs.real:RealPixelEnv", kwargs={"task": name})
