"""The state-space bound (``--model state-vrnn``): a dynamics core trained on the true low-dimensional states.

Perfect perception, learned dynamics: the same core as the keypoint models (``--dynamics``), but each
frame's input is the task's stored state (``states`` of the HDF5 files) instead of detected keypoints.
Its hidden states go through the reward experiment's protocol like any world model's, so the reward
error it reaches on predicted steps is what a world model with perfect perception could reach; the
true-states control, which sees the true state at every step, also on the predicted ones, is no such
target.

Shapes: tasks have states of different sizes D (cartpole 5 ... walkers 24). One model serves all tasks, so
every task's state is zero-padded to the largest D of the training data, rounded up to whole (K, 3)
triples (``WorldModel.perceive``, ``states_to_keypoints``); the per-task sizes are part of the model's
config (``ModelConfig.state_dims``), and data whose states differ from them is refused
(``check_state_dim``): the same padded vector would mean something else.

No vision stage: the trainer reads the states of both splits into the layout of its keypoint cache
(``state_split``), fits the dynamics' normaliser on them and runs its dynamics stage unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import h5py
import torch

from worldmodel import storage
from worldmodel.config import ModelConfig
from worldmodel.dynamics import KeypointNormalizer
from worldmodel.dynamics_benchmark import OpenLoop
from worldmodel.errors import InputError
from worldmodel.model import states_to_keypoints
from worldmodel.tasks import TASK_NAMES, pad_actions, task_id
from worldmodel.keypoint_cache import KeypointSplit


class StateSizeMismatch(InputError):
    """The data's states are not the ones the state-space bound was trained on."""


def dataset_state_dims(root: Path, tasks: Sequence[str]) -> dict[str, int]:
    """Each task's state size D, read from the files' shapes; both splits must agree."""
    dims: dict[str, int] = {}
    for task in tasks:
        sizes = {info.state_dim for split in storage.SPLITS for info in storage.checked_dataset_files(root, task, split)}
        if len(sizes) != 1:
            raise StateSizeMismatch(f"{task}: the train and test files of {root} hold states of sizes {sorted(sizes)}")
        dims[task] = sizes.pop()
    return dims


def state_model_config(net: ModelConfig, dims: dict[str, int]) -> ModelConfig:
    """``net`` as the state-space bound of data whose tasks have states of sizes ``dims``: the per-task sizes
    recorded, K = ceil(max D / 3) so that 3K features hold the largest state. An explicit ``state_dims``
    that disagrees with the data is an error."""
    state_dims = tuple(dims.get(task, 0) for task in TASK_NAMES)
    if net.state_dims and tuple(net.state_dims) != state_dims:
        raise StateSizeMismatch(
            f"--net.state-dims {tuple(net.state_dims)} differs from the dataset's {state_dims}: leave it out "
            "(the trainer reads it from the data)"
        )
    return dataclasses.replace(net, state_dims=state_dims, num_keypoints=math.ceil(max(state_dims) / 3))


def check_state_dim(config: ModelConfig, task: str, state_dim: int, where: object) -> None:
    """Refuse states of ``task`` from ``where`` whose size is not the one the model was trained on."""
    trained = config.state_dims[task_id(task)]
    if trained == 0:
        raise StateSizeMismatch(f"the state-space bound was not trained on {task}'s states: train it on data with {task}")
    if state_dim != trained:
        raise StateSizeMismatch(
            f"{task} states in {where} have size {state_dim}, the state-space bound was trained on size {trained}: "
            "use the data it was trained on, or train it again on this data"
        )


def state_split(root: Path, tasks: Sequence[str], split: str, config: ModelConfig) -> KeypointSplit:
    """The true states of every episode of a split in the keypoint cache's layout (frames 0..T-1, episodes in
    the order of ``training.detect_split``): states zero-padded to (K, 3) per frame, actions to 6. Frames are
    not read."""
    states, actions, lengths, task_ids = [], [], [], []
    for task in tasks:
        for info in storage.checked_dataset_files(root, task, split):  # the main file, then its parts
            check_state_dim(config, task, info.state_dim, info.path)
            steps = info.episode_steps
            with h5py.File(info.path, "r") as file:
                task_states = torch.from_numpy(file["states"][:, :steps])  # (E, T, D): frame T starts no window
                task_actions = pad_actions(file["actions"][...])  # (E, T, 6)
            states.append(states_to_keypoints(task_states, config.num_keypoints).flatten(0, 1))
            actions.append(torch.from_numpy(task_actions).flatten(0, 1))
            lengths += [steps] * info.num_episodes
            task_ids += [task_id(task)] * info.num_episodes
    return KeypointSplit.from_episodes(states, actions, lengths, task_ids)


def per_feature_points(result: OpenLoop, normalizer: KeypointNormalizer) -> OpenLoop:
    """An open-loop evaluation of the bound recast so that the keypoint distance of
    ``dynamics_benchmark.horizon_errors`` measures it sensibly: every state feature, normalised by the
    dynamics' per-feature within-episode std, becomes a point (value, 0, 0). The distance is then the mean
    absolute error per feature in those units (the padded triples are not image points; zero padding adds
    zero error to every row alike, so ratios to hold-last are unaffected)."""

    def points(keypoints: torch.Tensor) -> torch.Tensor:  # (..., K, 3) -> (..., F, 3)
        normalised = normalizer.normalize(keypoints.flatten(-2).to(normalizer.mean.device)).cpu()
        return torch.stack([normalised, torch.zeros_like(normalised), torch.zeros_like(normalised)], -1)

    return OpenLoop(points(result.detected), points(result.samples), result.starts)
