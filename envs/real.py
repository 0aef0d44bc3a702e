"""``StructVRNN-Real-<task>``: the real dm_control tasks as 64x64 pixel Gymnasium environments.

These are the envs a policy trained in imagination is evaluated on. They step the same
``envs.simulator.Simulator`` the collector uses, so frames, rewards and action repeat match the data the
world model was trained on.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.simulator import Simulator
from worldmodel.errors import InputError
from worldmodel.tasks import IMAGE_SIZE


class RealPixelEnv(gym.Env[np.ndarray, np.ndarray]):
    """A DeepMind Control task seen through 64x64 frames from camera 0.

    ## Action space
    | | |
    |---|---|
    | type | ``Box(-1, 1, (A,), float32)`` with A the task's action size (1 for acrobot and cartpole, 2 for reacher, 6 for cheetah and walker) |
    | out of bounds | clipped to [-1, 1] (dm_control clips too); NaN/inf or a wrong shape raise ``ValueError`` |

    ## Observation space
    | | |
    |---|---|
    | type | ``Box(0, 255, (64, 64, 3), uint8)`` |
    | content | ``physics.render(64, 64, camera_id=0)`` after the step |

    ## Rewards
    The sum of dm_control's rewards over the ``action_repeat`` control steps of an agent step, so in
    ``[0, action_repeat]``.

    ## Episode end
    Never terminated (DMC has no terminal states); truncated after the horizon of 1000 control steps,
    i.e. ``1000 // action_repeat`` agent steps.

    ## Arguments
    | | |
    |---|---|
    | ``task`` | short task name: ``acrobot``, ``cartpole``, ``cheetah``, ``reacher``, ``walker-stand``, ``walker-walk`` |
    | ``action_repeat`` | control steps per agent step; default: the task's (``worldmodel.tasks``, after PlaNet) |
    | ``fast_render`` | cheaper shadows and no multisampling (~2.5x faster, <= 1/255 mean pixel difference); default on |
    | ``render_mode`` | ``"rgb_array"`` returns the current 64x64 frame |

    ``info`` holds ``state``: the flattened low-dimensional dm_control observation (not for the agent).

    ## Starting state
    ``reset`` draws the episode's dm_control seed from the env's ``np_random`` (``info["episode_seed"]``);
    ``options={"episode_seed": s}`` starts from seed ``s`` instead (the collector's own seeds), with
    ``np_random`` advanced exactly as without it.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        task: str,
        action_repeat: int | None = None,
        fast_render: bool = True,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise InputError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.simulator = Simulator(task, action_repeat=action_repeat, fast_render=fast_render)
        self.task = self.simulator.spec.name
        self.horizon = self.simulator.horizon
        self.action_space = spaces.Box(-1.0, 1.0, (self.simulator.spec.action_dim,), np.float32)
        self.observation_space = spaces.Box(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        self._frame: np.ndarray | None = None
        self._steps = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        episode_seed = int(self.np_random.integers(2**31 - 1))  # the episode's initial state
        if options is not None and "episode_seed" in options:  # drawn above all the same: np_random stays in step
            episode_seed = int(options["episode_seed"])
        frame, state = self.simulator.reset(episode_seed)
        self._frame, self._steps = frame, 0
        return frame.copy(), {"state": state, "episode_seed": episode_seed}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._frame is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(
                f"action for {self.task} must have shape {self.action_space.shape}, got {action.shape}"
            )
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action contains NaN or inf: {action}")
        transition = self.simulator.step(np.clip(action, -1.0, 1.0))
        self._frame = transition.frame
        self._steps += 1
        truncated = self._steps >= self.horizon
        return transition.frame.copy(), float(transition.reward), False, truncated, {"state": transition.state}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        if self._frame is None:
            raise RuntimeError("call reset() before render()")
        return self._frame.copy()

    def close(self) -> None:
        self.simulator.close()

