"""A stable-baselines3 ``VecEnv`` of imagined episodes: all sub-envs as one tensor batch.

    from envs.sb3 import ImaginedSB3VecEnv
    venv = ImaginedSB3VecEnv("cheetah", num_envs=64)
    model = stable_baselines3.SAC("MlpPolicy", VecMonitor(venv))

SB3's conventions: ``reset()`` returns only observations (infos in ``reset_infos``), seeds set with
``seed()`` apply at the next ``reset()`` (sub-env i gets ``seed + i``); a sub-env that ends is reset in
the same step, its last observation is in ``infos[i]["terminal_observation"]`` and
``infos[i]["TimeLimit.truncated"]`` is True (the episode was cut, not finished: SB3 bootstraps from it).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from envs.imagination_batch import ImaginationBatch, ImaginationOptions, build_batch, check_actions


def generator_from_state(state: dict[str, Any]) -> np.random.Generator:
    """A numpy Generator continuing exactly from ``generator.bit_generator.state``."""
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


class ImaginedSB3VecEnv(VecEnv):
    """``num_envs`` imagined sub-envs of one task for stable-baselines3 (arguments as ``ImaginedEnv``).

    Sub-env i seeded with s is the single ``ImaginedEnv`` reset with seed s (same observations and
    rewards for the same actions), across automatic resets too.
    """

    def __init__(self, task: str, num_envs: int = 1, **options: Any) -> None:
        """``options``: the fields of ``envs.imagination_batch.ImaginationOptions``."""
        settings = ImaginationOptions(**options)
        self.batch: ImaginationBatch = build_batch(task, num_envs, settings)
        self.render_mode = settings.render_mode  # read by VecEnv.__init__ through get_attr
        self.task = self.batch.task
        self.horizon = self.batch.horizon
        action_space = spaces.Box(-1.0, 1.0, (self.batch.action_dim,), np.float32)
        super().__init__(num_envs, self.batch.observation_space, action_space)
        self._sub_env_rngs: list[np.random.Generator | None] = [None] * num_envs
        self._actions: np.ndarray | None = None

    def _rng(self, index: int, seed: int | None) -> np.random.Generator:
        if seed is not None or self._sub_env_rngs[index] is None:
            self._sub_env_rngs[index] = seeding.np_random(seed)[0]  # as gym.Env.reset(seed=...) does
        rng = self._sub_env_rngs[index]
        assert rng is not None
        return rng

    def reset(self) -> np.ndarray:
        indices = list(range(self.num_envs))
        result = self.batch.reset(indices, [self._rng(i, self._seeds[i]) for i in indices])
        self.reset_infos = result.infos
        self._reset_seeds()
        self._reset_options()
        return result.observations

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = check_actions(actions, (self.num_envs, *self.action_space.shape), self.task)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_async() must come before step_wait()")
        result = self.batch.step(self._actions)
        self._actions = None
        observations = result.observations
        dones = result.truncated.copy()
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        ended = np.flatnonzero(dones)
        if len(ended):
            for index in ended:
                infos[index]["terminal_observation"] = observations[index].copy()
                infos[index]["TimeLimit.truncated"] = True  # truncation, never a terminal state
            reset = self.batch.reset(ended.tolist(), [self._rng(int(i), None) for i in ended])
            observations[ended] = reset.observations
            for index, info in zip(ended, reset.infos):
                self.reset_infos[index] = info
        return observations, result.rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        """Nothing to release: models and context sources are shared per process."""

    # ---- state, to continue an interrupted training run exactly (envs.sb3_snapshot) ----------------------
    def get_state(self) -> dict[str, Any]:
        """The batch's state, every sub-env's generator and the seeds waiting for the next ``reset()``: tensors
        and plain containers (generator states as JSON: their 128-bit integers stay exact)."""
        return {
            "batch": self.batch.state_dict(),
            "sub_env_rngs": [None if rng is None else json.dumps(rng.bit_generator.state) for rng in self._sub_env_rngs],
            "seeds": list(self._seeds),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``get_state()`` was taken (same world model, task and number of sub-envs)."""
        self.batch.load_state_dict(state["batch"])
        self._sub_env_rngs = [None if saved is None else generator_from_state(json.loads(saved))
                              for saved in state["sub_env_rngs"]]  # fmt: skip
        self._seeds = list(state["seeds"])

    # ---- SB3's attribute plumbing: the sub-envs are one object, so attributes are the adapter's ----------
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if indices is not None and list(self._get_indices(indices)) != list(range(self.num_envs)):
            raise ValueError("attributes are shared by all sub-envs of the batch: set them for all")
        setattr(self, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        selected = list(self._get_indices(indices))
        if method_name == "render":
            return list(self.batch.render(selected)) if self.render_mode == "rgb_array" else [None] * len(selected)
        method = getattr(self, method_name)
        return [method(*method_args, **method_kwargs) for _ in selected]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        if self.render_mode != "rgb_array":
            return [None] * self.num_envs
        return list(self.batch.render())
