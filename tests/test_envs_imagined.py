"""The imagination envs StructVRNN-Imagined-<task>: single, vector, SB3 adapter, the real task through the
model, and downstream/rl.py, on a smoke-profile world model trained on the tiny dataset."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs  # noqa: F401  (registers the ids)
from envs.context import CONTEXT_LENGTH
from envs.imagination_models import CHECKPOINT_ENV, load_imagination_models
from envs.imagined import ImaginedEnv
from envs.imagined_vector import ImaginedVectorEnv
from envs.real import RealPixelEnv
from envs.sb3 import ImaginedSB3VecEnv
from envs.through_model import RealTaskThroughModel
from tests.env_relations import assert_step_is_the_cores_prior_step
from worldmodel.checkpoint import CheckpointError, load_world_model
from worldmodel.reward import (
    RewardPredictor,
    RewardPredictorMismatch,
    save_reward_predictor,
)
from worldmodel.tasks import TASK_NAMES, TASKS

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small batches: one thread is fastest on 2 cores


@pytest.fixture(scope="module")
def run_dir(imagination_run: Path) -> Path:
    """The session's smoke-profile world model with reward predictors for PREDICTOR_TASKS (conftest.py)."""
    return imagination_run


def make(run_dir: Path, task: str = "cheetah", **kwargs: object) -> ImaginedEnv:
    return gym.make(f"StructVRNN-Imagined-{task}", checkpoint=run_dir, **kwargs).unwrapped  # type: ignore[return-value]


def actions_for(task: str, steps: int, seed: int, batch: tuple[int, ...] = ()) -> np.ndarray:
    size = TASKS[task].action_dim
    return np.random.default_rng(seed).uniform(-1, 1, (steps, *batch, size)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Registration and the single env
# ----------------------------------------------------------------------------------------------
def test_ids_registered_with_vector_entry_points() -> None:
    for name in TASK_NAMES:
        spec = gym.spec(f"StructVRNN-Imagined-{name}")
        assert spec.entry_point == "envs.imagined:ImaginedEnv"
        assert spec.vector_entry_point == "envs.imagined_vector:ImaginedVectorEnv"
        assert spec.kwargs == {"task": name}


def test_module_prefixed_id_works_without_import(run_dir: Path) -> None:
    code = (
        "import gymnasium as gym, sys\n"
        f"env = gym.make('envs:StructVRNN-Imagined-cheetah', checkpoint={str(run_dir)!r}, device='cpu')\n"
        "obs, _ = env.reset(seed=0)\n"
        "assert 'envs' in sys.modules and obs.dtype.name == 'float32'\n"
        "print(env.unwrapped.horizon)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "250"  # cheetah: 1000 control steps / action repeat 4


# Keypoints decoded by a linear layer are unbounded, and the space says so; Gymnasium's checker warns about it.
@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is:UserWarning")
@pytest.mark.parametrize(("task", "observe_keypoints"), [("cheetah", False), ("reacher", True)])
def test_checkers_pass(run_dir: Path, task: str, observe_keypoints: bool) -> None:
    env = make(run_dir, task, observe_keypoints=observe_keypoints, render_mode="rgb_array")
    config = env.batch.model.config
    expected = config.rnn_size + (config.num_keypoints * 3 if observe_keypoints else 0)
    assert env.observation_space.shape == (expected,) and env.observation_space.dtype == np.float32
    assert env.action_space == gym.spaces.Box(-1, 1, (TASKS[task].action_dim,), np.float32)
    gym_check_env(env, skip_render_check=False)
    sb3_check_env(env, warn=True)


def test_step_types_truncation_and_render(run_dir: Path) -> None:
    env = make(run_dir, "cartpole", horizon=6, render_mode="rgb_array")
    observation, info = env.reset(seed=1)
    assert {"context_episode", "context_start"} <= set(info)
    first = env.render()
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    frames = [first]
    for step in range(1, 7):
        observation, reward, terminated, truncated, info = env.step(np.array([0.7], np.float32))
        assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
        assert not terminated and truncated == (step == 6)
        assert env.observation_space.contains(observation)
        frames.append(env.render())
    assert any(not np.array_equal(frames[0], frame) for frame in frames[1:])  # the imagined frame moves


def test_default_horizon_follows_the_data_action_repeat(run_dir: Path) -> None:
    assert make(run_dir, "cartpole").horizon == 125  # action repeat 8
    assert make(run_dir, "reacher").horizon == 250  # action repeat 4


def test_same_seed_same_trajectory(run_dir: Path) -> None:
    actions = actions_for("cheetah", 12, seed=0)

    def rollout(env: ImaginedEnv, seed: int) -> tuple[list[np.ndarray], list[float], np.ndarray]:
        observation, _ = env.reset(seed=seed)
        observations, rewards = [observation], []
        for action in actions:
            observation, reward, *_ = env.step(action)
            observations.append(observation)
            rewards.append(reward)
        return observations, rewards, env.render()

    env_a, env_b = make(run_dir, render_mode="rgb_array"), make(run_dir, render_mode="rgb_array")
    obs_a, rewards_a, frame_a = rollout(env_a, 3)
    obs_b, rewards_b, frame_b = rollout(env_b, 3)
    assert rewards_a == rewards_b
    assert all(np.array_equal(a, b) for a, b in zip(obs_a, obs_b))
    assert np.array_equal(frame_a, frame_b)
    obs_again, rewards_again, _ = rollout(env_a, 3)  # reseeding the same env replays it
    assert rewards_again == rewards_a and all(np.array_equal(a, b) for a, b in zip(obs_a, obs_again))
    obs_c, rewards_c, _ = rollout(env_b, 4)
    assert rewards_c != rewards_a and not np.array_equal(obs_c[-1], obs_a[-1])


def test_observations_are_fresh_arrays(run_dir: Path) -> None:
    env = make(run_dir)
    first, _ = env.reset(seed=0)
    kept = first.copy()
    second, *_ = env.step(np.zeros(6, np.float32))
    first[:] = 99.0  # a caller scribbling on an old observation changes nothing
    third, *_ = env.step(np.zeros(6, np.float32))
    assert not np.shares_memory(second, third)
    assert not np.array_equal(kept, second) and np.all(np.abs(third) <= 1.0)


def test_simulator_contexts(run_dir: Path) -> None:
    env = make(run_dir, "cartpole", context="simulator")
    obs_a, info_a = env.reset(seed=5)
    obs_b, info_b = make(run_dir, "cartpole", context="simulator").reset(seed=5)
    assert set(info_a) == {"context_seed"} and info_a == info_b
    assert np.array_equal(obs_a, obs_b)
    obs_c, info_c = env.reset(seed=6)
    assert info_c != info_a and not np.array_equal(obs_a, obs_c)


def test_start_share_starts_that_share_of_episodes_at_an_episode_beginning(run_dir: Path) -> None:
    always = make(run_dir, start_share=1.0)
    assert [always.reset(seed=seed)[1]["context_start"] for seed in range(8)] == [0] * 8
    # The tiny test split has one 30-step episode: 23 windows, so a uniform draw starts at 0 one time in 23.
    half = make(run_dir, start_share=0.5)
    starts = [half.reset(seed=seed)[1]["context_start"] for seed in range(40)]
    assert 10 <= starts.count(0) <= 30 and len(set(starts)) > 5
    default, zero = make(run_dir), make(run_dir, start_share=0.0)  # share 0 draws nothing more: same episodes
    for seed in range(3):
        (expected, expected_info), (observation, info) = default.reset(seed=seed), zero.reset(seed=seed)
        assert info == expected_info and np.array_equal(observation, expected)
    with pytest.raises(ValueError, match="start_share"):
        make(run_dir, start_share=1.5)


def test_trainer_keypoint_cache_stands_in_for_detection(run_dir: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    with_cache = make(run_dir)  # the staged smoke run left keypoints.pt for its own dataset
    assert with_cache.batch.source.cached_keypoints is not None
    copy = tmp_path / "dmcs"
    shutil.copytree(tiny_dataset, copy)
    detected = make(run_dir, data=copy)  # another dataset directory: the cache does not apply, detect
    assert detected.batch.source.cached_keypoints is None
    for seed in range(3):
        expected, info = with_cache.reset(seed=seed)
        observation, other_info = detected.reset(seed=seed)
        assert info == other_info
        np.testing.assert_allclose(observation, expected, rtol=0, atol=1e-5)


def test_callers_threads_and_autocast_are_left_alone(run_dir: Path) -> None:
    env = make(run_dir, threads=1)
    expected, _ = env.reset(seed=0)
    expected_step = env.step(np.ones(6, np.float32))
    torch.set_num_threads(2)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the dynamics stay in float32 regardless
            observation, _ = env.reset(seed=0)
            step = env.step(np.ones(6, np.float32))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    np.testing.assert_array_equal(observation, expected)
    np.testing.assert_array_equal(step[0], expected_step[0])
    assert step[1] == expected_step[1]
    with pytest.raises(ValueError, match="threads"):
        make(run_dir, threads=0)


def test_bad_actions_raise_or_clip(run_dir: Path) -> None:
    env = make(run_dir, "reacher")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([np.nan, 0.0], np.float32))
    with pytest.raises(ValueError, match="inf"):
        env.step(np.array([np.inf, 0.0], np.float32))
    with pytest.raises(ValueError, match="float array"):
        env.step(np.array(["a", "b"]))
    env.reset(seed=2)
    big = env.step(np.array([5.0, -7.0], np.float32))
    env.reset(seed=2)
    clipped = env.step(np.array([1.0, -1.0], np.float32))
    assert np.array_equal(big[0], clipped[0]) and big[1] == clipped[1]
    with pytest.raises(RuntimeError, match="reset"):
        make(run_dir, "reacher").step(np.zeros(2, np.float32))


def test_bad_arguments(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="context must be one of"):
        make(run_dir, context="video")
    with pytest.raises(ValueError, match="render_mode"):
        ImaginedEnv("cheetah", checkpoint=run_dir, render_mode="human")
    with pytest.raises(ValueError, match="horizon"):
        make(run_dir, horizon=0)
    with pytest.raises(FileNotFoundError, match="collect/dmcs.py"):
        make(run_dir, data=run_dir)  # no dataset there


# ----------------------------------------------------------------------------------------------
# Which model
# ----------------------------------------------------------------------------------------------
def test_missing_checkpoint_says_how_to_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/world_model here
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    with pytest.raises(CheckpointError, match=r"runs/world_model.*python train/world_model.py"):
        gym.make("StructVRNN-Imagined-cheetah")
    with pytest.raises(CheckpointError, match=r"nowhere.*python train/world_model.py"):
        gym.make("StructVRNN-Imagined-cheetah", checkpoint=tmp_path / "nowhere")
    monkeypatch.setenv(CHECKPOINT_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match=rf"elsewhere \(\${CHECKPOINT_ENV}"):
        gym.make("StructVRNN-Imagined-cheetah")


def test_checkpoint_from_environment_variable_and_file(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHECKPOINT_ENV, str(run_dir))
    from_variable = gym.make("StructVRNN-Imagined-cheetah").unwrapped
    from_file = make(run_dir / "checkpoint.pt")
    assert from_variable.batch.models.checkpoint == from_file.batch.models.checkpoint
    # Loaded once per process: both envs share the same module objects.
    assert from_variable.batch.model is from_file.batch.model


def test_missing_and_mismatched_reward_predictors_are_refused(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="downstream/reward.py"):
        make(run_dir, "walker-walk")  # no predictor fit for it
    other = RewardPredictor(load_world_model(run_dir, "cpu").config.rnn_size)
    foreign = tmp_path / "foreign.pt"
    save_reward_predictor(foreign, other, "cheetah", "0" * 64)  # fit on another model's hidden states
    with pytest.raises(RewardPredictorMismatch, match="another world model"):
        make(run_dir, reward_predictor=foreign)
    with pytest.raises(RewardPredictorMismatch, match="'cartpole'"):
        make(run_dir, reward_predictor=run_dir / "reward_predictors" / "cartpole.pt")  # another task's


# ----------------------------------------------------------------------------------------------
# The model's recursion, replayed with per-env noise
# ----------------------------------------------------------------------------------------------
def test_next_frame_is_the_cores_imagine_step_under_the_action(run_dir: Path) -> None:
    """A step's observation is the hidden state of one prior step of the core from the reset state, under the
    agent's action and the sub-env's first prior draw; so opposite actions give different observations."""
    env = make(run_dir)
    assert_step_is_the_cores_prior_step(env)


# ----------------------------------------------------------------------------------------------
# Batched envs
# ----------------------------------------------------------------------------------------------
def single_rollouts(run_dir: Path, seeds: list[int], actions: np.ndarray, horizon: int) -> list[list[tuple]]:
    """Per sub-env (observation, reward, truncated) under Gymnasium's next-step autoreset, one env each."""
    out = []
    for index, seed in enumerate(seeds):
        env = make(run_dir, horizon=horizon)
        observation, _ = env.reset(seed=seed)
        records = [(observation, 0.0, False)]
        ended = False
        for action in actions[:, index]:
            if ended:
                observation, _ = env.reset()
                reward, truncated = 0.0, False
            else:
                observation, reward, _, truncated, _ = env.step(action)
            ended = truncated
            records.append((observation, reward, truncated))
        out.append(records)
    return out


def test_vector_env_equals_single_envs_with_the_same_seeds(run_dir: Path) -> None:
    num_envs, horizon, steps = 3, 4, 11  # crosses two automatic resets
    actions = actions_for("cheetah", steps, seed=1, batch=(num_envs,))
    expected = single_rollouts(run_dir, [7, 8, 9], actions, horizon)
    vector = gym.make_vec("StructVRNN-Imagined-cheetah", num_envs=num_envs, checkpoint=run_dir, horizon=horizon)
    assert isinstance(vector.unwrapped, ImaginedVectorEnv)
    assert vector.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    observations, _ = vector.reset(seed=7)
    records = [(observations, np.zeros(num_envs), np.zeros(num_envs, bool))]
    for action in actions:
        observations, rewards, terminations, truncations, _ = vector.step(action)
        assert rewards.shape == (num_envs,) and not terminations.any()
        records.append((observations, rewards, truncations))
    for t, (observations, rewards, truncations) in enumerate(records):
        for i in range(num_envs):
            observation, reward, truncated = expected[i][t]
            np.testing.assert_allclose(observations[i], observation, rtol=0, atol=1e-5)
            assert rewards[i] == pytest.approx(reward, abs=1e-5)
            assert truncations[i] == truncated
    assert sum(record[2].sum() for record in records) == 2 * num_envs


def test_vector_env_same_step_autoreset_and_render(run_dir: Path) -> None:
    vector = gym.make_vec("StructVRNN-Imagined-cheetah", num_envs=2, checkpoint=run_dir, horizon=2,
                          autoreset_mode="SameStep", render_mode="rgb_array")
    single = make(run_dir, horizon=2)
    vector.reset(seed=0)
    single.reset(seed=0)
    action = np.zeros((2, 6), np.float32)
    vector.step(action)
    single.step(action[0])
    observations, _, _, truncations, infos = vector.step(action)
    final, *_ = single.step(action[0])
    assert truncations.all() and infos["_final_obs"].all()
    np.testing.assert_allclose(infos["final_obs"][0], final, atol=1e-5)
    reset_observation, _ = single.reset()
    np.testing.assert_allclose(observations[0], reset_observation, atol=1e-5)
    frames = vector.render()
    assert len(frames) == 2 and frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    with pytest.raises(ValueError, match="shape"):
        vector.step(np.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        vector.step(np.full((2, 6), np.nan, np.float32))


def test_sb3_vecenv_autoreset_semantics(run_dir: Path) -> None:
    num_envs, horizon = 2, 3
    venv = ImaginedSB3VecEnv("cheetah", num_envs, checkpoint=run_dir, horizon=horizon)
    singles = [make(run_dir, horizon=horizon) for _ in range(num_envs)]
    venv.seed(11)
    observations = venv.reset()
    for i, env in enumerate(singles):
        np.testing.assert_allclose(observations[i], env.reset(seed=11 + i)[0], atol=1e-5)
    actions = actions_for("cheetah", horizon, seed=2, batch=(num_envs,))
    for t, action in enumerate(actions):
        observations, rewards, dones, infos = venv.step(action)
        assert rewards.dtype == np.float32 and dones.dtype == bool
        for i, env in enumerate(singles):
            observation, reward, _, truncated, _ = env.step(action[i])
            assert dones[i] == truncated == (t == horizon - 1)
            assert rewards[i] == pytest.approx(reward, abs=1e-5)
            if truncated:
                np.testing.assert_allclose(infos[i]["terminal_observation"], observation, atol=1e-5)
                assert infos[i]["TimeLimit.truncated"] is True
                reset_observation, reset_info = env.reset()
                np.testing.assert_allclose(observations[i], reset_observation, atol=1e-5)  # the new episode
                assert venv.reset_infos[i] == reset_info
            else:
                np.testing.assert_allclose(observations[i], observation, atol=1e-5)
                assert "terminal_observation" not in infos[i]
    with pytest.raises(ValueError, match="shape"):
        venv.step(np.zeros((num_envs, 2), np.float32))
    assert venv.get_attr("horizon") == [horizon] * num_envs
    assert venv.env_is_wrapped(gym.Wrapper) == [False] * num_envs


# ----------------------------------------------------------------------------------------------
# The real task through the model, and RL in imagination
# ----------------------------------------------------------------------------------------------
def test_real_task_through_model_gives_the_imagined_observation_space(run_dir: Path) -> None:
    models = load_imagination_models("cartpole", run_dir, device="cpu")
    imagined = make(run_dir, "cartpole", observe_keypoints=True)
    real = RealTaskThroughModel(RealPixelEnv("cartpole"), models, observe_keypoints=True)
    assert real.observation_space == imagined.observation_space
    observation, info = real.reset(seed=0)
    assert real.observation_space.contains(observation) and "warmup_return" in info
    again, _ = real.reset(seed=0)
    np.testing.assert_array_equal(observation, again)
    observation, reward, terminated, truncated, _ = real.step(np.array([0.5], np.float32))
    assert real.observation_space.contains(observation)
    assert type(reward) is float and not terminated and not truncated
    with pytest.raises(ValueError, match="action repeat"):
        RealTaskThroughModel(RealPixelEnv("cartpole", action_repeat=2), models)


def test_real_return_is_the_whole_episode_warm_up_included(run_dir: Path) -> None:
    """downstream/rl.py's real return of random actions, against the rewards of the same real episode stepped
    by hand: the reset's seed, the warm-up drawn from the env's generator, then the policy's own draws."""
    from downstream import rl

    models = load_imagination_models("cartpole", run_dir, device="cpu")
    (measured,) = rl.real_returns(models, rl.Args(task="cartpole", seed=0), 1, None).values
    env = RealPixelEnv("cartpole", action_repeat=models.action_repeat)
    env.reset(seed=30_000)  # rl.real_returns' first episode
    rng = env.np_random
    rng.integers(2**63 - 1)  # RealTaskThroughModel seeds its posterior noise first
    warm_up = sum(env.step(rng.uniform(-1.0, 1.0, (1,)).astype(np.float32))[1] for _ in range(CONTEXT_LENGTH - 1))
    policy_rng, policy_return, truncated = np.random.default_rng(20_000), 0.0, False
    while not truncated:
        _, reward, _, truncated, _ = env.step(policy_rng.uniform(-1.0, 1.0, (1,)).astype(np.float32))
        policy_return += reward
    env.close()
    assert warm_up > 1.0  # the pole starts upright: the warm-up earns reward, so leaving it out would show
    assert measured == pytest.approx(warm_up + policy_return, rel=1e-6)


def test_ppo_in_imagination_then_real_evaluation(run_dir: Path, tmp_path: Path) -> None:
    from downstream import rl

    args = rl.Args(task="cartpole", algo="ppo", steps=256, num_envs=8, checkpoint=run_dir, eval_episodes=1,
                   gif=True, out=tmp_path, device="cpu", horizon=32)
    report = rl.main(args)
    assert report.agent_path.is_file() and report.results_path.is_file()
    assert report.gif_path is not None and report.gif_path.stat().st_size > 0
    for returns in (report.real_agent, report.real_random, report.imagined_agent):
        assert len(returns.values) == 1 and np.isfinite(returns.mean)
    # A real cartpole episode: 125 agent steps (7 of them the random warm-up), rewards in [0, 8] each.
    assert 0.0 <= report.real_random.mean <= 8.0 * 125


def test_init_agent_starts_from_the_given_agents_weights(run_dir: Path, tmp_path: Path) -> None:
    from stable_baselines3.common.vec_env import VecMonitor

    from downstream import rl
    from worldmodel.errors import InputError

    args = rl.Args(task="cartpole", algo="ppo", steps=64, num_envs=4, checkpoint=run_dir, device="cpu", seed=0)
    venv = VecMonitor(ImaginedSB3VecEnv("cartpole", 4, **rl.imagination_options(args)))
    source = rl.make_agent(args, venv)
    source.save(tmp_path / "source.zip")
    other_seed = dataclasses.replace(args, seed=1)
    started = rl.initial_agent(dataclasses.replace(other_seed, init_agent=tmp_path / "source.zip"), venv)
    fresh = rl.initial_agent(other_seed, venv)
    weights, started_weights, fresh_weights = (a.policy.state_dict() for a in (source, started, fresh))
    assert all(torch.equal(started_weights[key], value) for key, value in weights.items())
    assert not all(torch.equal(fresh_weights[key], value) for key, value in weights.items())  # the seed alone differs
    rl.make_agent(dataclasses.replace(args, algo="sac"), venv).save(tmp_path / "sac.zip")
    with pytest.raises(InputError, match="--init-agent .* cannot start this PPO agent"):
        rl.initial_agent(dataclasses.replace(args, init_agent=tmp_path / "sac.zip"), venv)
    venv.close()


def test_rl_cli_help_and_one_line_errors(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from downstream import rl

    with pytest.raises(SystemExit) as help_exit:
        rl.cli(["--help"])
    assert help_exit.value.code == 0 and "--algo" in capsys.readouterr().out
    for argv, phrase in [
        (["--steps", "0", "--checkpoint", str(run_dir)], "--steps must be positive"),
        (["--task", "humanoid"], "choose from acrobot"),
        (["--start-share", "2", "--checkpoint", str(run_dir)], "--start-share must be a fraction"),
        (["--init-agent", str(run_dir / "none.zip"), "--checkpoint", str(run_dir)], "--init-agent"),
        (["--checkpoint", str(run_dir), "--task", "walker-walk"], "no reward predictor"),
    ]:
        assert rl.cli(argv) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and phrase in error, error
