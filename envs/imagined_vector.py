"""``gym.make_vec("StructVRNN-Imagined-<task>", num_envs=N)``: N imagined episodes as one tensor batch.

The ids' ``vector_entry_point``. Every sub-env is exactly the single ``ImaginedEnv`` (same seed, same
actions -> same observations and rewards), but all of them step as one batch on the model's device.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.imagination_batch import RENDER_MODES, ImaginationBatch, ImaginationOptions, build_batch, check_actions
from worldmodel.errors import InputError


class ImaginedVectorEnv(VectorEnv[np.ndarray, np.ndarray, np.ndarray]):
    """``num_envs`` sub-envs of ``ImaginedEnv`` (see its docstring for the spaces, rewards and arguments),
    stepped as one tensor batch.

    ## Action space
    ``Box(-1, 1, (num_envs, A), float32)``; out-of-bounds values are clipped, NaN/inf or a wrong shape raise
    ``ValueError``.

    ## Observation space
    ``Box(float32, (num_envs, D))``, rows as ``ImaginedEnv``'s observation.

    ## Seeding
    ``reset(seed=s)`` seeds sub-env i with ``s + i`` (a list seeds each); ``seed=None`` keeps the sub-envs'
    current generators (random ones at the first reset). Sub-env i then is ``ImaginedEnv`` reset with the
    same seed, also across automatic resets.

    ## Autoreset
    ``autoreset_mode`` (default ``AutoresetMode.NEXT_STEP``, Gymnasium's): the step after a sub-env's
    truncation resets it (its action is ignored, reward 0) and returns the new episode's first
    observation. ``SAME_STEP``: the truncating step already returns the new episode's observation, the
    final one is in ``info["final_obs"]``. ``DISABLED``: reset sub-envs with
    ``reset(options={"reset_mask": mask})``.

    ## Extra arguments
    | | |
    |---|---|
    | ``num_envs`` | number of sub-envs (one batch) |
    | ``autoreset_mode`` | ``AutoresetMode`` or its value ``"NextStep"``, ``"SameStep"``, ``"Disabled"`` |

    ``render()`` returns a tuple of the sub-envs' imagined 64x64 frames (``render_mode="rgb_array"``).
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 30, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        task: str,
        num_envs: int = 1,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        **options: Any,
    ) -> None:
        """``options``: the fields of ``ImaginationOptions`` (``ImaginedEnv``'s table)."""
        settings = ImaginationOptions(**options)
        settings.check()  # cheap checks before anything is loaded
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in AutoresetMode)
            raise InputError(f"autoreset_mode must be one of {choices}, got {autoreset_mode!r}") from None
        self.render_mode = settings.render_mode
        self.autoreset_mode = mode
        self.metadata = {**self.metadata, "autoreset_mode": mode}
        self.batch: ImaginationBatch = build_batch(task, num_envs, settings)
        self.task = self.batch.task
        self.horizon = self.batch.horizon
        self.num_envs = num_envs
        self.single_observation_space = self.batch.observation_space
        self.single_action_space = spaces.Box(-1.0, 1.0, (self.batch.action_dim,), np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._sub_env_rngs: list[np.random.Generator | None] = [None] * num_envs
        self._needs_reset = np.zeros(num_envs, dtype=bool)  # truncated at the last step (next-step mode)

    def _seeds(self, seed: int | Sequence[int | None] | None) -> list[int | None]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, (int, np.integer)):
            return [int(seed) + i for i in range(self.num_envs)]
        seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"a list of seeds needs one per sub-env ({self.num_envs}), got {len(seeds)}")
        return seeds

    def _reset_sub_envs(self, indices: np.ndarray, seeds: Sequence[int | None]) -> dict[str, Any]:
        """Reset the given sub-envs (seeding those with a seed) and return their infos, vector style."""
        rngs = []
        for index, seed in zip(indices, seeds):
            if seed is not None or self._sub_env_rngs[index] is None:
                self._sub_env_rngs[index] = seeding.np_random(seed)[0]  # as gym.Env.reset(seed=...) does
            rngs.append(self._sub_env_rngs[index])
        result = self.batch.reset(indices.tolist(), rngs)  # type: ignore[arg-type]
        self._needs_reset[indices] = False
        infos: dict[str, Any] = {}
        for index, info in zip(indices, result.infos):
            infos = self._add_info(infos, info, int(index))
        return infos

    def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if isinstance(seed, (int, np.integer)):
            super().reset(seed=int(seed))
        seeds = self._seeds(seed)
        mask = (options or {}).get("reset_mask")
        if mask is None:
            indices = np.arange(self.num_envs)
        else:
            mask = np.asarray(mask)
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_ or not mask.any():
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) with a True")
            indices = np.flatnonzero(mask)
        infos = self._reset_sub_envs(indices, [seeds[i] for i in indices])
        return self.batch.observations(), infos

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        checked = check_actions(actions, self.action_space.shape, self.task)
        if self.autoreset_mode == AutoresetMode.DISABLED and self._needs_reset.any():
            raise RuntimeError(
                f"sub-envs {np.flatnonzero(self._needs_reset).tolist()} ended: reset them with "
                "reset(options={'reset_mask': mask}) before stepping (autoreset_mode is DISABLED)"
            )
        result = self.batch.step(checked)
        observations = result.observations
        rewards = result.rewards.astype(np.float64)
        truncations = result.truncated.copy()
        terminations = np.zeros(self.num_envs, dtype=bool)  # DMC has no terminal states
        infos: dict[str, Any] = {}
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            ended = np.flatnonzero(self._needs_reset)
            if len(ended):  # these sub-envs were stepped for nothing: their new episode starts now
                infos = self._reset_sub_envs(ended, [None] * len(ended))
                observations[ended] = self.batch.observations(torch.as_tensor(ended, device=self.batch.device))
                rewards[ended] = 0.0
                truncations[ended] = False
            self._needs_reset = truncations.copy()
        elif self.autoreset_mode == AutoresetMode.SAME_STEP:
            ended = np.flatnonzero(truncations)
            if len(ended):
                for index in ended:
                    infos = self._add_info(infos, {"final_obs": observations[index].copy(), "final_info": {}}, int(index))
                reset_infos = self._reset_sub_envs(ended, [None] * len(ended))
                infos.update(reset_infos)
                observations[ended] = self.batch.observations(torch.as_tensor(ended, device=self.batch.device))
        else:
            self._needs_reset = truncations.copy()
        return observations, rewards, terminations, truncations, infos

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode != "rgb_array":
            return None
        return tuple(self.batch.render())

    def close_extras(self, **kwargs: Any) -> None:
        """Nothing to release: models and context sources are shared per process."""
