"""``StructVRNN-Imagined-<task>``: a DeepMind Control task stepped inside a trained Struct-VRNN world model.

An episode starts from a real context (``envs.context``: 8 frames and actions from the dataset's test split
or the real simulator) filtered through the posterior, and then continues in imagination: each action
drives one imagine step of the model's dynamics core (a prior sample), the agent observes the core's hidden
state (``DynamicsCore.hidden_state``: the GRU state of the VRNNs, SRVP's y), and the
task's GRU reward predictor (``downstream/reward.py``), carried as a recurrent state over the same
hidden states, gives the reward. ``render()`` decodes the imagined keypoints into a 64x64 frame. What a step
computes, where the reward comes from, the contexts and the seeding: docs/DESIGN.md section 5.

The pieces, one module each: the world model and the reward predictor it runs (``envs.imagination_models``:
which checkpoint, loaded once per process), the batch of sub-envs that every imagined env steps
(``envs.imagination_batch.ImaginationBatch``: the single env here is a batch of one,
``envs.imagined_vector.ImaginedVectorEnv`` and ``envs.sb3.ImaginedSB3VecEnv`` run many sub-envs as one
tensor batch), and the real task seen through the same model (``envs.through_model.RealTaskThroughModel``,
``StructVRNN-Real-<task>``: real frames -> detect -> posterior, step by step, so a policy trained here sees
the same observations there).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.imagination_batch import RENDER_MODES, ImaginationOptions, build_batch, check_actions

__all__ = ["ImaginedEnv"]


class ImaginedEnv(gym.Env[np.ndarray, np.ndarray]):
    """A DeepMind Control task imagined by a Struct-VRNN world model, with a learned reward.

    ## Action space
    | | |
    |---|---|
    | type | ``Box(-1, 1, (A,), float32)`` with A the task's action size (1 for acrobot and cartpole, 2 for reacher, 6 for cheetah and walker); zero-padded to 6 for the model |
    | out of bounds | clipped to [-1, 1] (as dm_control does); NaN/inf or a wrong shape raise ``ValueError`` |

    ## Observation space
    | | |
    |---|---|
    | type | ``Box(float32)`` of size H (the dynamics core's ``hidden_size``: the GRU size for the VRNNs, 512 ``paper``, 256 ``cpu``; SRVP's state size), or H + 3K with ``observe_keypoints`` |
    | ``[0, H)`` | the core's hidden state that predicts the current frame: in [-1, 1] for the VRNNs (a GRU state), unbounded for SRVP's y |
    | ``[H, H+3K)`` | with ``observe_keypoints``: the current frame's keypoints (x, y, mu) x K, unbounded |

    ## Rewards
    The task's GRU reward predictor (S2.3, ``downstream/reward.py``), fit on this model's hidden states of
    real test windows, fed the hidden states of the episode (context included) as one sequence: the reward
    of the step t -> t+1 is its output at the state that predicts frame t+1. A float, roughly in the real
    task's range ``[0, action_repeat]`` (a regression, so not bounded).

    ## Starting state
    A context of 8 real frames and the 7 actions between them, filtered through the posterior: a random
    window of the dataset's test split (``context="dataset"``), or the first 8 frames of a real episode
    under uniform random actions (``context="simulator"``), chosen with ``np_random``. With ``start_share``
    p > 0, a share p of the dataset's windows are an episode's first 8 frames: the real task's initial states
    after a random warm-up, where real evaluation episodes (``RealTaskThroughModel``) hand over to the agent.

    ## Episode end
    Never terminated; truncated after ``horizon`` imagined steps (default ``1000 // action_repeat``, the
    action repeat the world model's data of this task was collected with).

    ## Arguments
    | | |
    |---|---|
    | ``task`` | ``acrobot``, ``cartpole``, ``cheetah``, ``reacher``, ``walker-stand``, ``walker-walk`` (set by the id) |
    | ``checkpoint`` | run directory of ``train/world_model.py`` or its checkpoint file; default ``$STRUCTVRNN_CHECKPOINT``, else ``runs/world_model`` |
    | ``reward_predictor`` | the predictor file; default ``<run dir>/reward_predictors/<task>.pt`` (its fingerprint must match the model) |
    | ``data`` | dataset directory for dataset contexts; default: the one recorded in the checkpoint |
    | ``context`` | ``"dataset"`` (test split, default) or ``"simulator"`` (the real task under random actions) |
    | ``start_share`` | share of dataset contexts that are an episode's first frames (default 0: every window alike) |
    | ``observe_keypoints`` | append the current keypoints to the observation (default ``False``) |
    | ``horizon`` | imagined steps per episode; default ``1000 // action_repeat`` |
    | ``device`` | ``"auto"`` (cuda if available), ``"cpu"``, ``"cuda"``, ... |
    | ``threads`` | torch CPU threads inside the env's calls (default 1: its tensors are small, see ``worldmodel.devices.cpu_threads``); ``None`` leaves torch's setting |
    | ``render_mode`` | ``"rgb_array"``: the imagined 64x64 frame decoded from the current keypoints |

    ``info`` at reset says where the context came from: ``context_episode`` and ``context_start`` (dataset)
    or ``context_seed`` (simulator). For many envs at once use ``gym.make_vec`` (one tensor batch).
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 30}

    def __init__(self, task: str, **options: Any) -> None:
        """``options``: the fields of ``ImaginationOptions`` (the table above)."""
        settings = ImaginationOptions(**options)
        self.batch = build_batch(task, 1, settings)
        self.render_mode = settings.render_mode
        self.task = self.batch.task
        self.horizon = self.batch.horizon
        self.action_repeat = self.batch.models.action_repeat
        self.action_space = spaces.Box(-1.0, 1.0, (self.batch.action_dim,), np.float32)
        self.observation_space = self.batch.observation_space

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        result = self.batch.reset([0], [self.np_random])
        return result.observations[0], result.infos[0]

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.batch.started[0]:
            raise RuntimeError("call reset() before step()")
        checked = check_actions(action, self.action_space.shape, self.task)
        result = self.batch.step(checked[None])
        return result.observations[0], float(result.rewards[0]), False, bool(result.truncated[0]), {}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self.batch.render([0])[0]
