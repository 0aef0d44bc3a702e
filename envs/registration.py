"""Gymnasium ids for the six tasks; registration is lazy (entry points are strings).

- ``StructVRNN-Real-<task>``: the real dm_control task as 64x64 pixels (``envs.real``).
- ``StructVRNN-Imagined-<task>``: the task stepped inside a trained world model (``envs.imagined``), with
  a native batched ``vector_entry_point`` (``envs.imagined_vector``) that ``gym.make_vec`` uses.

No ``max_episode_steps`` is registered for the imagined ids: their horizon depends on the action repeat
the world model's data was collected with, so the envs truncate themselves.
"""

from __future__ import annotations

import gymnasium as gym

from worldmodel.tasks import TASK_NAMES


def register_all() -> None:
    for name in TASK_NAMES:
        real_id = f"StructVRNN-Real-{name}"
        if real_id not in gym.registry:
            gym.register(id=real_id, entry_point="envs.real:RealPixelEnv", kwargs={"task": name})
        imagined_id = f"StructVRNN-Imagined-{name}"
        if imagined_id not in gym.registry:
            gym.register(
                id=imagined_id,
                entry_point="envs.imagined:ImaginedEnv",
                vector_entry_point="envs.imagined_vector:ImaginedVectorEnv",
                kwargs={"task": name},
            )
