"""``RealTaskThroughModel``: the real pixel task (``StructVRNN-Real-<task>``) seen through the world model.

Real frames -> detect -> posterior, step by step, so a policy trained in imagination (``envs.imagined``)
sees the same observations on the real task.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from envs.context import (
    CONTEXT_LENGTH,
    FilteredContext,
    detect_frames,
    filter_context,
    posterior_noise,
    posterior_step,
)
from envs.imagination_batch import check_actions, observation_space, observations_of
from envs.imagination_models import ImaginationModels
from worldmodel.config import WARMUP_ACTIONS
from worldmodel.devices import cpu_threads
from worldmodel.dynamics_core import CoreCarry
from worldmodel.errors import InputError
from worldmodel.tasks import MAX_ACTION_DIM, pad_actions


class RealTaskThroughModel(gym.Wrapper[np.ndarray, np.ndarray, np.ndarray, np.ndarray]):
    """The real pixel task (``StructVRNN-Real-<task>``) observed through the world model's posterior.

    Each real frame is detected and filtered with the posterior (best of S samples, as at the context of
    an imagined episode), so the observation is the same hidden state (and keypoints) an ``ImaginedEnv``
    of the same model gives: a policy trained in imagination runs here unchanged. By default (``refilter``)
    the state after each frame is that of the last 8 frames filtered afresh from the core's initial state,
    as an imagined episode's context is: the model and the agent never saw a state filtered longer.

    ## Action space
    The real env's: ``Box(-1, 1, (A,), float32)``.

    ## Observation space
    As ``ImaginedEnv``: the hidden state h_t that predicts the current frame (and its keypoints).

    ## Rewards
    The real task's reward (sum over the action repeat), unchanged.

    ## Starting state
    The real env's reset, then ``warmup_steps`` (default 7) actions, uniform random (``warmup_actions="random"``,
    the default) or zero (``"zero"``: the agent holds still while the filter fills), filtered like an imagined
    episode's 8-frame context; the agent acts from there. Warm-up rewards are not returned (they
    are in ``info["warmup_return"]`` at reset), so an episode has ``horizon - warmup_steps`` agent steps.

    ## Episode end
    As the real env: truncated at its horizon.

    ## Arguments
    | | |
    |---|---|
    | ``env`` | a ``StructVRNN-Real-<task>`` env (its action repeat must match the model's data) |
    | ``models`` | ``ImaginationModels`` of the same task (``load_imagination_models``) |
    | ``observe_keypoints`` | as ``ImaginedEnv`` |
    | ``warmup_steps`` | real steps filtered before the agent acts (default ``CONTEXT_LENGTH - 1``) |
    | ``warmup_actions`` | the warm-up's actions: ``"random"`` (uniform, default) or ``"zero"`` |
    | ``refilter`` | each frame's state from the last 8 frames filtered afresh from the core's initial state, as imagined episodes start (default ``True``); ``False``: one filter over the whole episode |
    | ``threads`` | torch CPU threads inside the filter (as ``ImaginedEnv``) |
    """

    def __init__(
        self,
        env: gym.Env[np.ndarray, np.ndarray],
        models: ImaginationModels,
        observe_keypoints: bool = False,
        warmup_steps: int = CONTEXT_LENGTH - 1,
        threads: int | None = 1,
        warmup_actions: str = "random",
        refilter: bool = True,
    ) -> None:
        super().__init__(env)
        simulator = getattr(env.unwrapped, "simulator", None)  # RealPixelEnv's; other envs are not checked
        repeat = None if simulator is None else simulator.action_repeat
        if repeat is not None and repeat != models.action_repeat:
            raise InputError(
                f"the real env steps with action repeat {repeat}, the world model's {models.task} data used "
                f"{models.action_repeat}; make it with action_repeat={models.action_repeat}"
            )
        if warmup_steps < 0:
            raise InputError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if warmup_actions not in WARMUP_ACTIONS:
            raise InputError(f"warmup_actions must be one of {', '.join(WARMUP_ACTIONS)}, got {warmup_actions!r}")
        self.warmup_actions = warmup_actions
        self.refilter = refilter
        self.models = models
        self.model = models.world_model
        self.observe_keypoints = observe_keypoints
        self.warmup_steps = warmup_steps
        self.threads = threads
        config = self.model.config
        self.observation_space = observation_space(self.model.dynamics, config.feature_size if observe_keypoints else 0)
        self._carry: CoreCarry | None = None
        self._generator = torch.Generator()
        self.first_frame: np.ndarray | None = None  # (64, 64, 3) the episode's first real frame
        self.first_keypoints: Tensor | None = None  # (1, K, 3) its detected keypoints
        self._recent_hidden: deque[Tensor] = deque(maxlen=CONTEXT_LENGTH)  # (H,) each, last frames'
        # the last frames' detected keypoints (1, K, 3) and the action that reached each (1, 6), zero for the first
        self._recent_inputs: deque[tuple[Tensor, Tensor]] = deque(maxlen=CONTEXT_LENGTH)

    @property
    def carry(self) -> CoreCarry:
        """The filter's state after the current real frame (normalised keypoints; do not modify); with ``refilter``
        that of the last frames' window."""
        if self._carry is None:
            raise RuntimeError("call reset() first")
        return self._carry

    @property
    def context_hidden(self) -> Tensor:
        """(L, H) the hidden states that predicted the last L <= ``CONTEXT_LENGTH`` real frames (as the posterior
        gave them): what warms up the reward predictor at an imagined episode's start (``worldmodel.planning``)."""
        if self._carry is None:
            raise RuntimeError("call reset() first")
        return torch.stack(list(self._recent_hidden))

    @torch.inference_mode()
    def refiltered(self, generator: torch.Generator) -> FilteredContext:
        """The last L <= ``CONTEXT_LENGTH`` real frames filtered afresh from the core's initial state, posterior
        draws from ``generator``: carry (batch 1) after the current frame, hidden (1, L, H) the states that
        predicted them.

        What the model was trained on and what an imagined episode starts from: a window that begins at the
        core's initial state (its first frame's action zero). With ``refilter`` the env's state after every
        frame is this (draws from the env's generator); a filter stepped over the whole episode instead goes far
        past the 16 steps of the training windows, and its state drifts from the states the dynamics, the reward
        predictor and the agents know (docs/DECISIONS.md, "Re-filtering the last 8 frames").
        """
        if self._carry is None:
            raise RuntimeError("call reset() first")
        keypoints = torch.stack([frame for frame, _ in self._recent_inputs], dim=1)  # (1, L, K, 3)
        reached = torch.stack([action for _, action in self._recent_inputs], dim=1)  # (1, L, 6)
        applied = torch.cat([reached[:, 1:], torch.zeros_like(reached[:, :1])], dim=1)  # (1, L, 6) at each frame
        noise = posterior_noise(generator, self.model, length=keypoints.shape[1])[None].to(self.models.device)
        with torch.autocast(self.models.device.type, enabled=False):
            return filter_context(self.model, keypoints, applied, noise)  # (its first frame's action: zero)

    def _filter(self, frame: np.ndarray, action: np.ndarray | None) -> np.ndarray:
        """Filter one real frame reached by ``action`` (None for the first) and return the observation."""
        with cpu_threads(self.threads, self.models.device):
            return self._filter_frame(frame, action)

    @torch.inference_mode()
    def _filter_frame(self, frame: np.ndarray, action: np.ndarray | None) -> np.ndarray:
        device = self.models.device
        keypoints = detect_frames(self.model, torch.from_numpy(np.ascontiguousarray(frame)).to(device)[None])
        if action is None:  # the episode's first frame: the reference for decoding (render, GIFs)
            self.first_frame, self.first_keypoints = np.array(frame), keypoints
        padded = torch.zeros(1, MAX_ACTION_DIM, device=device) if action is None else torch.from_numpy(
            pad_actions(np.asarray(action, np.float32)[None])
        ).to(device)
        if action is None:
            self._recent_hidden.clear()
            self._recent_inputs.clear()
        self._recent_inputs.append((keypoints, padded))
        if self.refilter and action is not None:
            self._carry, hidden = self.refiltered(self._generator)  # the window's states, newest last
            self._recent_hidden.clear()
            self._recent_hidden.extend(hidden[0])
        else:  # one more step of the filter (an episode's first frame: the window of one frame, the same)
            target = self.model.normalizer.normalize(keypoints.flatten(1))  # (1, F)
            noise = posterior_noise(self._generator, self.model, length=1)[0][:, None].to(device)  # (S, 1, Z)
            with torch.autocast(device.type, enabled=False):
                self._carry, state = posterior_step(self.model, self._carry, padded, target, noise)
            self._recent_hidden.append(state[0])
        return observations_of(self.model, self._carry, self.observe_keypoints)[0]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        frame, info = self.env.reset(seed=seed, options=options)
        rng = self.env.unwrapped.np_random  # the real env's seeded generator: one source of randomness
        self._generator.manual_seed(int(rng.integers(2**63 - 1)))
        self._carry = None
        observation = self._filter(frame, None)
        warmup_return = 0.0
        for _ in range(self.warmup_steps):
            action = rng.uniform(-1.0, 1.0, self.action_space.shape).astype(np.float32)
            if self.warmup_actions == "zero":  # drawn all the same: the filter's draws do not depend on it
                action = np.zeros_like(action)
            frame, reward, terminated, truncated, info = self.env.step(action)
            warmup_return += float(reward)
            observation = self._filter(frame, action)
            if terminated or truncated:
                raise ValueError(f"the real episode ended within the {self.warmup_steps} warm-up steps")
        return observation, {**info, "warmup_return": warmup_return}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._carry is None:
            raise RuntimeError("call reset() before step()")
        checked = check_actions(action, self.action_space.shape, self.models.task)
        frame, reward, terminated, truncated, info = self.env.step(checked)
        return self._filter(frame, checked), float(reward), bool(terminated), bool(truncated), info
