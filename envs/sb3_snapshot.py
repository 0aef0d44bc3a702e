"""Snapshots of PPO training in imagination that a killed run continues from exactly.

A snapshot is one file (written atomically: a kill leaves the previous one) that holds everything the rest
of ``learn()`` depends on, taken at a rollout boundary (after an update, before the next rollout):

    format         int, SNAPSHOT_FORMAT
    settings       the run's settings that decide the result (downstream/rl.py checks them on resume)
    num_timesteps  imagined steps done
    agent          the stable-baselines3 save (policy, Adam state, last observations, step counters), as bytes
    env            ``ImaginedSB3VecEnv.get_state()``: the imagined episodes in flight, their generators
    monitor        VecMonitor's running episode returns and lengths
    rng            torch / numpy / python generators (``worldmodel.checkpoint.capture_rng_state``)
    action_space   the agent's action space generator (JSON)

Why a rollout boundary: PPO's rollout buffer is empty there (the next rollout starts by clearing it), so
nothing but the above is in flight. Continuing is ``load_snapshot`` and then ``learn(steps - num_timesteps,
reset_num_timesteps=False)``: SB3 then keeps the saved last observations instead of resetting the env and
counts the progress (and any schedule) against the same total. The resumed run's updates, random draws
and imagined episodes are the uninterrupted run's, bit for bit (tests/test_resume.py).

SAC is not snapshotted: its replay buffer (all transitions so far) would have to be saved each time.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecMonitor

from envs.sb3 import ImaginedSB3VecEnv, generator_from_state
from worldmodel.atomic import UnreadableTorchFile, atomic_torch_save, load_torch_file
from worldmodel.checkpoint import capture_rng_state, restore_rng_state
from worldmodel.errors import InputError

SNAPSHOT_FORMAT = 1


class SnapshotError(InputError):
    """A snapshot is unreadable or belongs to another run; the message says what to do."""


def _imagined_env(venv: VecMonitor) -> ImaginedSB3VecEnv:
    env = venv.venv
    assert isinstance(env, ImaginedSB3VecEnv), "snapshots need VecMonitor(ImaginedSB3VecEnv)"
    return env


def save_snapshot(path: Path, agent: PPO, settings: dict[str, Any]) -> None:
    """Write the snapshot of ``agent`` (whose env is ``VecMonitor(ImaginedSB3VecEnv)``) at a rollout boundary."""
    venv = agent.get_env()
    assert isinstance(venv, VecMonitor)
    saved = io.BytesIO()
    agent.save(saved)
    payload = {
        "format": SNAPSHOT_FORMAT,
        "settings": settings,
        "num_timesteps": int(agent.num_timesteps),
        "agent": torch.frombuffer(bytearray(saved.getvalue()), dtype=torch.uint8),
        "env": _imagined_env(venv).get_state(),
        "monitor": {
            "returns": torch.from_numpy(np.asarray(venv.episode_returns, dtype=np.float64).copy()),
            "lengths": torch.from_numpy(np.asarray(venv.episode_lengths, dtype=np.int64).copy()),
            "count": int(venv.episode_count),
        },
        "rng": capture_rng_state(),
        "action_space": json.dumps(agent.action_space.np_random.bit_generator.state),
    }
    atomic_torch_save(payload, path)


def read_snapshot(path: Path) -> dict[str, Any]:
    """The snapshot's contents (tensors and plain containers only); SnapshotError if it is not one."""
    try:
        payload = load_torch_file(path)
    except UnreadableTorchFile as error:
        raise SnapshotError(f"cannot read the training snapshot {path} ({error}): delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{path} is not a training snapshot of this version: delete it to start over")
    return payload


def load_snapshot(payload: dict[str, Any], venv: VecMonitor, device: str) -> PPO:
    """The agent of ``read_snapshot(...)``, on ``venv`` (a fresh ``VecMonitor(ImaginedSB3VecEnv)`` of the same
    settings) put back where the snapshot was taken, with the process's generators restored: call
    ``learn(..., reset_num_timesteps=False)`` next, without drawing random numbers in between."""
    # force_reset=False: keep the saved last observations (by default SB3 drops them and resets the env).
    agent = PPO.load(io.BytesIO(payload["agent"].numpy().tobytes()), env=venv, device=device, force_reset=False)
    # PPO.load re-seeded the generators and queued seeds for the env's next reset: put all back.
    _imagined_env(venv).set_state(payload["env"])
    monitor = payload["monitor"]
    venv.episode_returns = monitor["returns"].numpy().copy()
    venv.episode_lengths = monitor["lengths"].numpy().copy()
    venv.episode_count = monitor["count"]
    agent.action_space._np_random = generator_from_state(json.loads(payload["action_space"]))
    restore_rng_state(payload["rng"])
    return agent


class PeriodicSnapshots(BaseCallback):
    """Save a snapshot at the first rollout boundary after every ``every`` imagined steps."""

    def __init__(self, path: Path, every: int, settings: dict[str, Any]) -> None:
        super().__init__()
        self.path, self.every, self.settings = path, every, settings
        self.saved_at = 0

    def _on_training_start(self) -> None:
        self.saved_at = self.num_timesteps  # a resumed run does not save its starting point again

    def _on_rollout_start(self) -> None:
        if self.num_timesteps // self.every > self.saved_at // self.every:
            assert isinstance(self.model, PPO)
            save_snapshot(self.path, self.model, self.settings)
            self.saved_at = self.num_timesteps

    def _on_step(self) -> bool:
        return True
