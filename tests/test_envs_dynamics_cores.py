"""The imagination envs with every dynamics core: the envs only use the core interface, so each core must
pass the env checkers, give vector env == N single envs, and replay ``WorldModel.observe``/``imagine`` from
per-env noise. The run directories reuse the session's smoke world model (its detector and normaliser)
with a freshly initialised core of each kind."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs  # noqa: F401  (registers the ids)
from envs.context import filter_context, posterior_noise
from envs.imagination_batch import prior_step
from envs.imagination_models import load_imagination_models
from envs.imagined import ImaginedEnv
from envs.real import RealPixelEnv
from envs.through_model import RealTaskThroughModel
from tests.env_relations import assert_step_is_the_cores_prior_step
from worldmodel.checkpoint import load_checkpoint, model_config_from_dict, save_checkpoint
from worldmodel.config import DYNAMICS
from worldmodel.fingerprint import model_fingerprint
from worldmodel.hidden_states import extract_window_features
from worldmodel.model import WorldModel
from worldmodel.reward import RewardTrainConfig, fit_reward_predictor, save_reward_predictor

TASK = "cheetah"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small batches: one thread is fastest on 2 cores


@pytest.fixture(scope="module", params=list(DYNAMICS))
def core_run(request: pytest.FixtureRequest, smoke_run: Path, tiny_dataset: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the smoke run whose checkpoint holds a fresh core of kind ``request.param`` (vision and
    keypoint normalisation kept), with a cheetah reward predictor fit on that core's hidden states."""
    run = tmp_path_factory.mktemp(f"core-{request.param}") / "run"
    shutil.copytree(smoke_run, run)
    saved = load_checkpoint(run)
    config = dataclasses.replace(model_config_from_dict(saved["model_config"]), dynamics=request.param)
    torch.manual_seed(0)
    model = WorldModel(config)
    kept = {name: value for name, value in saved["model"].items() if not name.startswith("dynamics.")}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert not unexpected and all(name.startswith("dynamics.") for name in missing)
    save_checkpoint(
        run / "checkpoint.pt", model_state=model.state_dict(), model_config=dataclasses.asdict(config),
        train_config=saved["train_config"], dataset=saved["dataset"], stage=saved["stage"], step=saved["step"],
        global_step=saved["global_step"], optimizer_state=None, complete=saved["complete"],
    )
    model.eval()
    features = extract_window_features(model, tiny_dataset, TASK, num_sequences=12, batch_size=12, seed=0)
    assert features.hidden.shape[-1] == model.dynamics.hidden_size
    fit = fit_reward_predictor(features.hidden, features.rewards, features.episodes, RewardTrainConfig(epochs=2, batch_size=12))
    save_reward_predictor(run / "reward_predictors" / f"{TASK}.pt", fit.predictor, TASK, model_fingerprint(model))
    return run


def make(run: Path, **kwargs: object) -> ImaginedEnv:
    return gym.make(f"StructVRNN-Imagined-{TASK}", checkpoint=run, **kwargs).unwrapped  # type: ignore[return-value]


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is:UserWarning")
def test_checkers_pass_with_every_core(core_run: Path) -> None:
    env = make(core_run, observe_keypoints=True, render_mode="rgb_array")
    core = env.batch.model.dynamics
    assert type(core).__name__ == {"vrnn": "VRNN", "srvp": "SRVP", "hvrnn": "HierarchicalVRNN"}[core.config.dynamics]
    assert env.observation_space.shape == (core.hidden_size + env.batch.model.config.feature_size,)
    gym_check_env(env, skip_render_check=False)
    sb3_check_env(env, warn=True)


def test_filter_and_prior_steps_replay_the_model(core_run: Path) -> None:
    model = load_imagination_models(TASK, core_run, device="cpu").world_model
    keypoints = torch.rand(1, 8, model.config.num_keypoints, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    actions = torch.rand(1, 8, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    future_actions = torch.rand(1, 5, 6, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        observed = model.observe(keypoints, actions, generator=generator)
        imagined = model.imagine(observed.final, future_actions, generator=generator)
        mine = torch.Generator().manual_seed(3)
        filtered = filter_context(model, keypoints, actions, posterior_noise(mine, model)[None])
        carry, hidden = filtered.carry, []
        for t in range(5):
            noise = torch.randn((1, model.dynamics.noise_size), generator=mine)
            carry = prior_step(model, carry, future_actions[:, t], noise)
            hidden.append(model.dynamics.hidden_state(carry))
    torch.testing.assert_close(filtered.hidden, observed.hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.stack(hidden, 1), imagined.hidden, rtol=0, atol=1e-6)
    final = model.normalizer.denormalize(model.dynamics.keypoints(carry)).view(1, -1, 3)
    torch.testing.assert_close(final, imagined.final.keypoints, rtol=0, atol=1e-5)


def test_vector_env_equals_single_envs_with_every_core(core_run: Path) -> None:
    num_envs, horizon, steps = 3, 4, 9  # crosses automatic resets
    actions = np.random.default_rng(1).uniform(-1, 1, (steps, num_envs, 6)).astype(np.float32)
    expected = []
    for index, seed in enumerate([7, 8, 9]):
        env = make(core_run, horizon=horizon)
        observation, _ = env.reset(seed=seed)
        records, ended = [(observation, 0.0)], False
        for action in actions[:, index]:
            if ended:
                (observation, _), reward, ended = env.reset(), 0.0, False
            else:
                observation, reward, _, ended, _ = env.step(action)
            records.append((observation, reward))
        expected.append(records)
    vector = gym.make_vec(f"StructVRNN-Imagined-{TASK}", num_envs=num_envs, checkpoint=core_run, horizon=horizon)
    observations, _ = vector.reset(seed=7)
    records = [(observations, np.zeros(num_envs))]
    for action in actions:
        observations, rewards, *_ = vector.step(action)
        records.append((observations, rewards))
    for t, (observations, rewards) in enumerate(records):
        for i in range(num_envs):
            np.testing.assert_allclose(observations[i], expected[i][t][0], rtol=0, atol=1e-5)
            assert rewards[i] == pytest.approx(expected[i][t][1], abs=1e-5)
    # A step is the core's prior step from the reset state under the action and the sub-env's first draw,
    # so opposite actions give different observations.
    env = make(core_run)
    assert_step_is_the_cores_prior_step(env)


def test_real_task_through_model_with_every_core(core_run: Path) -> None:
    models = load_imagination_models(TASK, core_run, device="cpu")
    real = RealTaskThroughModel(RealPixelEnv(TASK), models, observe_keypoints=True, warmup_steps=3)
    assert real.observation_space == make(core_run, observe_keypoints=True).observation_space
    observation, _ = real.reset(seed=0)
    assert real.observation_space.contains(observation)
    again, _ = real.reset(seed=0)
    np.testing.assert_array_equal(observation, again)
    observation, *_ = real.step(np.zeros(6, np.float32))
    assert real.observation_space.contains(observation)
