"""RNN hidden states of a world model over real windows: the representation the reward experiment probes.

The protocol of the paper's Figure 8 (Minderer et al. 2019, S2.3): of each length-L window, the first ``num_observed`` frames are
filtered through the posterior; the rest are predicted open loop through the prior from the true
actions. Only the observed frames are ever shown to the model, so frames after the context cannot
change the predicted hidden states. The per-frame features are what the model perceives: keypoints
detected in the frames, or for the state-space bound (``state-vrnn``) the stored true states, in which
case no frame is read at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from worldmodel.atomic import atomic_write_stream
from worldmodel.config import OBSERVED_STEPS
from worldmodel.data import WindowDataset
from worldmodel.model import inference_autocast
from worldmodel.state_bound import check_state_dim

# Windows whose observed frames the detector takes in one call during extraction. All 256 windows of a batch at
# once (2,048 frames) held ~2 GiB of activations; 64 at a time hold ~0.6 GiB and ran 7-10% faster (caches). Detection
# is per frame, so the keypoints are the same bit for bit (checked in bf16 and fp32), and the dynamics still run the
# whole batch, so the prior draws, which depend on the batch's shape, are unchanged.
DETECT_WINDOWS = 64


class WindowFeatures(NamedTuple):
    """Per-window sequences of one task's test windows, all (N, L, ...) on the CPU."""

    hidden: Tensor  # (N, L, H) float32, hidden[:, t] is the state that predicts frame t
    rewards: Tensor  # (N, L) float32, rewards[:, t] earned by frame t -> t+1
    actions: Tensor  # (N, L, 6) float32
    states: Tensor  # (N, L, D) float32, true low-dimensional states (the upper-bound control)
    episodes: np.ndarray  # (N,) int64 episode of each window (for splits by episode)


@torch.no_grad()
def observe_then_imagine(
    model: torch.nn.Module, frames: Tensor, actions: Tensor, num_observed: int, states: Tensor | None = None
) -> Tensor:
    """Hidden states (B, L, H) of windows: posterior over frames[:, :num_observed], prior after.

    frames: (B, >= num_observed, 64, 64, 3) uint8 (unused by the state-space bound); actions: (B, L, 6),
    actions[:, t] applied at frame t; states: (B, >= num_observed, D) true states (what the bound reads).
    """
    length = actions.shape[1]
    observed_states = None if states is None else states[:, :num_observed]
    # The detector sees DETECT_WINDOWS windows at a time, the dynamics all B rows at once; later frames are never read.
    keypoints = model.perceive(frames[:, :num_observed], observed_states, DETECT_WINDOWS)  # (B, n, K, 3)
    observed = model.observe(keypoints, actions[:, :num_observed])  # hidden (B, n, H)
    # The state after frame n-1 continues with a_{n-1}, ..., a_{L-2}: it predicts frames n .. L-1.
    predicted = model.imagine(observed.final, actions[:, num_observed - 1 : length - 1])
    return torch.cat([observed.hidden, predicted.hidden], 1).float()  # (B, L, H)


def choose_windows(num_windows: int, wanted: int, seed: int) -> np.ndarray:
    """Up to `wanted` window indices drawn without replacement (sorted for read locality)."""
    if wanted >= num_windows:
        return np.arange(num_windows)
    return np.sort(np.random.default_rng(seed).choice(num_windows, wanted, replace=False))


def extract_window_features(
    model: torch.nn.Module,
    data_root: Path,
    task: str,
    num_sequences: int,
    length: int = 20,
    num_observed: int = OBSERVED_STEPS,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
) -> WindowFeatures:
    """Hidden states, rewards, actions and true states of `num_sequences` test windows of one task.

    Raises ``StateSizeMismatch`` when the model is the state-space bound and the task's states differ from
    those it was trained on."""
    dataset = WindowDataset(data_root, [task], "test", length=length, states=True, frames=model.reads_frames)
    if not model.reads_frames:
        check_state_dim(model.config, task, dataset.state_dim, dataset.files[0].info.path)
    indices = choose_windows(len(dataset), num_sequences, seed)
    # Windows are read in this process: reading is ~10% of a batch's time, and a worker forked here would share
    # this process's heap copy-on-write. Where the heap is kept (worldmodel/heap.py) that heap is the size of the
    # largest batch, and every page of it written after the fork is copied: a worker made extraction 2x slower.
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices.tolist()), batch_size=batch_size, num_workers=0
    )
    torch.manual_seed(seed)  # prior samples of the predicted steps
    hidden, rewards, actions, states, episodes = [], [], [], [], []
    model.eval()
    for window in tqdm(loader, desc=f"hidden states {task}", unit="batch", leave=False):
        with inference_autocast(device):
            hidden.append(
                observe_then_imagine(
                    model, window.frames.to(device), window.actions.to(device), num_observed, window.states.to(device)
                ).cpu()
            )
        rewards.append(window.rewards)
        actions.append(window.actions)
        states.append(window.states)
        episodes.append(window.episode.numpy())
    return WindowFeatures(
        torch.cat(hidden), torch.cat(rewards), torch.cat(actions), torch.cat(states), np.concatenate(episodes)
    )


def save_features(path: Path, features: WindowFeatures) -> None:
    """Cache to .npz (hidden states in float16 to halve the size), written atomically."""
    atomic_write_stream(
        path,
        lambda handle: np.savez(
            handle,
            hidden=features.hidden.half().numpy(),
            rewards=features.rewards.numpy(),
            actions=features.actions.numpy(),
            states=features.states.numpy(),
            episodes=features.episodes,
        ),
    )


def load_features(path: Path) -> WindowFeatures:
    with np.load(path) as cached:
        return WindowFeatures(
            torch.from_numpy(cached["hidden"]).float(),
            torch.from_numpy(cached["rewards"]),
            torch.from_numpy(cached["actions"]),
            torch.from_numpy(cached["states"]),
            cached["episodes"],
        )
