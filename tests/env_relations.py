"""Relations the imagination envs must satisfy, shared by the env tests of every core."""

from __future__ import annotations

import numpy as np
import torch

from envs.imagination_batch import NOISE_BLOCK, prior_step
from envs.imagined import ImaginedEnv


def assert_step_is_the_cores_prior_step(env: ImaginedEnv) -> None:
    """A step's observation is the hidden state of one prior step of the core from the reset state, under the
    agent's action and the sub-env's first prior draw; so opposite actions give different observations."""
    model = env.batch.model
    observations = []
    for sign in (1.0, -1.0):
        env.reset(seed=0)
        stream = torch.Generator()
        stream.set_state(env.batch.noise.generators[0].get_state())  # where the episode's prior draws start
        first_draw = torch.randn((NOISE_BLOCK, model.dynamics.noise_size), generator=stream)[:1]
        action = np.full(6, sign, np.float32)
        with torch.inference_mode():
            carry = prior_step(model, env.batch.carry, torch.from_numpy(action)[None], first_draw)
            expected = model.dynamics.hidden_state(carry)[0].numpy()
        observation, *_ = env.step(action)
        np.testing.assert_allclose(observation, expected, rtol=0, atol=1e-6)
        observations.append(observation)
    assert not np.allclose(*observations)
