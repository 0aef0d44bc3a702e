"""The real pixel envs StructVRNN-Real-<task>: checkers, seeding, truncation, bad actions."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs  # noqa: F401  (registers the ids)
from envs.simulator import Simulator
from worldmodel.tasks import TASK_NAMES, TASKS


@pytest.mark.parametrize("task", TASK_NAMES)
def test_checkers_pass(task: str) -> None:
    env = gym.make(f"StructVRNN-Real-{task}", render_mode="rgb_array")
    assert env.action_space.shape == (TASKS[task].action_dim,)
    assert env.action_space.dtype == np.float32
    assert env.observation_space.shape == (64, 64, 3) and env.observation_space.dtype == np.uint8
    gym_check_env(env.unwrapped, skip_render_check=False)
    sb3_check_env(env.unwrapped, warn=True)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    env.close()


def test_same_seed_same_trajectory_and_matches_simulator() -> None:
    def rollout(seed: int) -> tuple[list[np.ndarray], list[float], int]:
        env = gym.make("StructVRNN-Real-cheetah")
        obs, info = env.reset(seed=seed)
        env.action_space.seed(seed)
        frames, rewards = [obs], []
        for _ in range(5):
            obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            assert not terminated and not truncated
            frames.append(obs)
            rewards.append(reward)
        env.close()
        return frames, rewards, info["episode_seed"]

    frames_a, rewards_a, seed_a = rollout(3)
    frames_b, rewards_b, seed_b = rollout(3)
    frames_c, _, seed_c = rollout(4)
    assert seed_a == seed_b != seed_c
    assert rewards_a == rewards_b
    assert all(np.array_equal(a, b) for a, b in zip(frames_a, frames_b))
    assert not np.array_equal(frames_a[0], frames_c[0])  # another seed, another initial state

    # The env is the collector's simulator: same episode seed -> same first frame.
    simulator = Simulator("cheetah")
    first_frame, _ = simulator.reset(seed_a)
    assert np.abs(first_frame.astype(int) - frames_a[0]).mean() <= 1.0
    simulator.close()


def test_truncates_at_horizon_never_terminates() -> None:
    env = gym.make("StructVRNN-Real-cartpole", action_repeat=8)
    env.reset(seed=0)
    action = np.zeros(1, np.float32)
    for step in range(1, 126):
        _, reward, terminated, truncated, _ = env.step(action)
        assert not terminated
        assert 0.0 <= reward <= 8.0
        assert truncated == (step == 125)  # 1000 control steps / action repeat 8
    env.close()


def test_action_repeat_is_configurable() -> None:
    env = gym.make("StructVRNN-Real-walker-walk", action_repeat=4)
    assert env.unwrapped.horizon == 250
    env.close()


def test_bad_actions_raise_clear_errors_and_out_of_bounds_clip() -> None:
    env = gym.make("StructVRNN-Real-reacher").unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([np.nan, 0.0], np.float32))
    # Out of bounds is clipped: the same next frame as the clipped action.
    env.reset(seed=1)
    big, *_ = env.step(np.array([5.0, -7.0], np.float32))
    env.reset(seed=1)
    clipped, *_ = env.step(np.array([1.0, -1.0], np.float32))
    assert np.array_equal(big, clipped)
    env.close()


def test_unknown_task_lists_valid_ones() -> None:
    from envs.real import RealPixelEnv

    with pytest.raises(ValueError, match="choose from acrobot, cartpole"):
        RealPixelEnv("humanoid")
