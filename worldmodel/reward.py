"""Per-task GRU reward predictors on world-model hidden states (Minderer et al. 2019, S2.3 and Figure 8).

The predictor reads a sequence of per-frame feature vectors (the VRNN hidden states, or a control such
as the true low-dimensional states or the actions) and outputs one reward per frame.

Timing: ``rewards[t]`` is earned by the step from frame t to frame t+1 and depends on the state that
step leads to, so it is the target of the output at frame t+1 (``align_rewards``). Frame 0 of a window
has no target. The hidden state that predicts frame t+1 has already seen the action a_t (the action order
of docs/CONTRACTS.md and docs/DESIGN.md section 2), so a causal predictor can know it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.atomic import UnreadableTorchFile, atomic_torch_save, load_torch_file
from worldmodel.devices import cpu_threads
from worldmodel.errors import InputError, MissingInputError, detail


# Bumped whenever a change to the predictor or its training changes the numbers it gives, so that cached
# fit results of an older version are not reused (downstream/reward.py keys its result cache on it).
FIT_VERSION = 2
# Torch threads of every fit, whatever the caller or the machine: the thread count changes the order of
# floating-point sums, and on a task with rare large rewards (acrobot) that alone moved a fold's figure by 2x
# (docs/DYNAMICS.md), so a fit's result must not depend on the core count. One thread also suits the fits' use:
# several run side by side in processes (worldmodel/reward_jobs.py), and a GRU step this small splits badly.
FIT_THREADS = 1


class RewardPredictor(nn.Module):
    """dense 128 -> GRU 128 -> GRU 128 -> dense 1, ReLU between (S2.3).

    Inputs are standardized per feature, and the output is in units of the training rewards' std around
    their mean (both fit on the training data and kept as buffers, so a saved predictor carries them). The
    output layer starts at zero: an untrained predictor *is* the null model (the mean training reward at
    every step), so training can only move away from it where the inputs carry reward information. This
    matters for the tiny, sparse random-policy rewards (acrobot ~0.003 ± 0.02): in raw units an untrained
    head's offset alone is several null-model MSEs.
    """

    def __init__(self, input_size: int, units: int = 128) -> None:
        super().__init__()
        self.input_size, self.units = input_size, units
        self.register_buffer("input_mean", torch.zeros(input_size))
        self.register_buffer("input_std", torch.ones(input_size))
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))
        self.dense_in = nn.Linear(input_size, units)
        self.gru1 = nn.GRU(units, units, batch_first=True)
        self.gru2 = nn.GRU(units, units, batch_first=True)
        self.dense_out = nn.Linear(units, 1)
        nn.init.zeros_(self.dense_out.weight)
        nn.init.zeros_(self.dense_out.bias)

    def fit_normalization(self, inputs: Tensor) -> None:
        """Set the per-feature mean/std from training inputs (N, T, F); a floor keeps constant features finite."""
        flat = inputs.reshape(-1, self.input_size).float()
        self.input_mean.copy_(flat.mean(0))
        self.input_std.copy_(flat.std(0).clamp_min(1e-3))

    def fit_reward_scale(self, targets: Tensor) -> None:
        """Set the output's mean and std from the training reward targets (any shape)."""
        self.reward_mean.copy_(targets.float().mean())
        self.reward_std.copy_(targets.float().std().clamp_min(1e-6))

    def standardized(self, inputs: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Like ``forward``, but rewards in training units: (reward - reward_mean) / reward_std."""
        if state is None:
            state = self.initial_state(inputs.shape[0], inputs.device)
        x = (inputs.float() - self.input_mean) / self.input_std  # (B, T, F)
        x = F.relu(self.dense_in(x))  # (B, T, U)
        x, state1 = self.gru1(x, state[0:1].contiguous())
        x, state2 = self.gru2(F.relu(x), state[1:2].contiguous())
        return self.dense_out(F.relu(x)).squeeze(-1), torch.cat([state1, state2], 0)  # (B, T), (2, B, U)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        return torch.zeros(2, batch_size, self.units, device=device)  # (layers, B, units)

    def forward(self, inputs: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """inputs (B, T, F) -> (rewards (B, T), state (2, B, units)); pass `state` back to continue."""
        standardized, state = self.standardized(inputs, state)
        return standardized * self.reward_std + self.reward_mean, state


def align_rewards(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Window rewards (N, L) -> per-frame targets (N, L) and mask (L,): target[t] = rewards[t-1]."""
    targets = torch.zeros_like(rewards)
    targets[:, 1:] = rewards[:, :-1]
    mask = torch.ones(rewards.shape[1], dtype=torch.bool, device=rewards.device)
    mask[0] = False  # frame 0 is reached by no step inside the window
    return targets, mask


def episode_folds(episodes: np.ndarray, num_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds of window indices, split by episode so no episode is on both sides; reproducible by seed.

    Fold f tests on the f-th group of shuffled episodes (5 folds = 80% train / 20% test).
    """
    unique = np.unique(episodes)
    if len(unique) < num_folds:
        raise InputError(
            f"{len(unique)} test episodes cannot make {num_folds} folds; collect more test episodes "
            "(collect/dmcs.py --test-episodes) or lower --folds"
        )
    shuffled = np.random.default_rng(seed).permutation(unique)
    groups = np.array_split(shuffled, num_folds)
    folds = []
    for group in groups:
        is_test = np.isin(episodes, group)
        folds.append((np.flatnonzero(~is_test), np.flatnonzero(is_test)))
    return folds


@dataclass(frozen=True)
class RewardTrainConfig:
    epochs: int = 60
    """Maximum passes over the training windows."""
    batch_size: int = 256
    """Windows per gradient step."""
    lr_start: float = 1e-3
    """Adam learning rate at the first epoch (S2.3)."""
    lr_end: float = 1e-4
    """Learning rate reached at the last epoch, decayed geometrically (S2.3)."""
    validation_fraction: float = 0.1
    """Share of the training episodes held out for early stopping."""
    patience: int = 8
    """Stop after this many epochs without a better validation loss; the best weights are kept (the untrained
    predictor, i.e. the null model, if no epoch beats it)."""
    units: int = 128
    """Width of the dense and GRU layers (S2.3)."""
    seed: int = 0
    """Seeds the initialization, the validation split and the batch order."""


class FitResult(NamedTuple):
    predictor: RewardPredictor
    train_losses: list[float]
    validation_losses: list[float]
    best_epoch: int  # -1: no epoch beat the untrained predictor (the null model) on validation


def fit_reward_predictor(
    inputs: Tensor, rewards: Tensor, episodes: np.ndarray, config: RewardTrainConfig
) -> FitResult:
    """Train a RewardPredictor on windows: inputs (N, L, F), window rewards (N, L), episode id per window.

    Runs on ``FIT_THREADS`` torch threads (the caller's setting is restored), so the result is the same on
    every machine for the same inputs and seed.
    """
    with cpu_threads(FIT_THREADS, torch.device("cpu")):  # the predictor lives on the CPU
        return _fit(inputs, rewards, episodes, config)


def _fit(inputs: Tensor, rewards: Tensor, episodes: np.ndarray, config: RewardTrainConfig) -> FitResult:
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    predictor = RewardPredictor(inputs.shape[-1], config.units)
    targets, mask = align_rewards(rewards)

    # Early-stopping split, by episode like the test split, so validation windows are unseen episodes.
    unique = np.random.default_rng(config.seed).permutation(np.unique(episodes))
    num_val = max(1, int(round(len(unique) * config.validation_fraction))) if len(unique) > 1 else 0
    is_val = np.isin(episodes, unique[:num_val])
    train_idx = torch.from_numpy(np.flatnonzero(~is_val))
    val_idx = torch.from_numpy(np.flatnonzero(is_val)) if num_val else train_idx
    predictor.fit_normalization(inputs[train_idx])
    predictor.fit_reward_scale(targets[train_idx][:, mask])
    # The loss is in units of the training rewards' variance (as the predictor's standardized output).
    standardized_targets = (targets[:, mask] - predictor.reward_mean) / predictor.reward_std  # (N, L-1)
    variance = float(predictor.reward_std) ** 2

    optimizer = torch.optim.Adam(predictor.parameters(), lr=config.lr_start)
    decay = (config.lr_end / config.lr_start) ** (1.0 / max(1, config.epochs - 1))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)

    train_losses: list[float] = []
    val_losses: list[float] = []
    initial = float(evaluate_mse(predictor, inputs[val_idx], rewards[val_idx]).nanmean())  # the null model
    best = (initial, -1, copy.deepcopy(predictor.state_dict()))
    for epoch in range(config.epochs):
        predictor.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        total = 0.0
        for batch in order.split(config.batch_size):
            predicted, _ = predictor.standardized(inputs[batch])
            loss = F.mse_loss(predicted[:, mask], standardized_targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch) * variance  # logged in reward units
        scheduler.step()
        train_losses.append(total / len(train_idx))
        val_losses.append(float(evaluate_mse(predictor, inputs[val_idx], rewards[val_idx]).nanmean()))
        if val_losses[-1] < best[0]:
            best = (val_losses[-1], epoch, copy.deepcopy(predictor.state_dict()))
        elif epoch - best[1] >= config.patience:
            break
    predictor.load_state_dict(best[2])
    predictor.eval()
    return FitResult(predictor, train_losses, val_losses, best[1])


@torch.no_grad()
def predict_rewards(predictor: RewardPredictor, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """The predictor's rewards (N, L) of windows (N, L, F), in batches; compare with ``align_rewards``' targets."""
    predictor.eval()
    return torch.cat([predictor(inputs[i : i + batch_size])[0] for i in range(0, len(inputs), batch_size)])


def evaluate_mse(predictor: RewardPredictor, inputs: Tensor, rewards: Tensor, batch_size: int = 1024) -> Tensor:
    """Per-frame MSE (L,) over windows; frame 0 (no target) is NaN."""
    targets, mask = align_rewards(rewards)
    per_frame = ((predict_rewards(predictor, inputs, batch_size) - targets) ** 2).mean(0)
    per_frame[~mask] = float("nan")
    return per_frame


def null_reward(train_rewards: Tensor) -> float:
    """What the null model predicts at every step: the mean of the training windows' reward targets."""
    targets, mask = align_rewards(train_rewards)
    return float(targets[:, mask].mean())


def null_model_mse(train_rewards: Tensor, test_rewards: Tensor) -> Tensor:
    """Per-frame MSE (L,) of predicting the mean training reward at every step; frame 0 is NaN."""
    targets, mask = align_rewards(test_rewards)
    mean_reward = align_rewards(train_rewards)[0][:, mask].mean()  # null_reward's, kept a tensor (same sums)
    per_frame = ((targets - mean_reward) ** 2).mean(0)
    per_frame[~mask] = float("nan")
    return per_frame


class RewardPredictorMismatch(InputError):
    """A saved reward predictor belongs to another world model (or task) than the one it is used with."""


def save_reward_predictor(
    path: str | Path, predictor: RewardPredictor, task: str, world_model: str, experiment: str | None = None
) -> None:
    """Write a predictor with the fingerprint of the world model whose hidden states it reads (atomically), and
    ``experiment``, what fitted it (a reward experiment's ``--out``; read back by ``predictor_experiment``)."""
    payload = {
        "state_dict": predictor.state_dict(),
        "input_size": predictor.input_size,
        "units": predictor.units,
        "task": task,
        "world_model_fingerprint": world_model,
        "experiment": experiment,
    }
    atomic_torch_save(payload, Path(path))


def predictor_experiment(path: str | Path) -> str | None:
    """What fitted the predictor saved at ``path`` (``save_reward_predictor``'s ``experiment``); None where there
    is no readable predictor there, or it does not say (those saved before it was recorded)."""
    if not Path(path).is_file():
        return None
    try:
        payload = load_torch_file(path, "cpu")
    except UnreadableTorchFile:
        return None
    experiment = payload.get("experiment") if isinstance(payload, dict) else None
    return experiment if isinstance(experiment, str) else None


def load_reward_predictor(
    path: str | Path, task: str, world_model: str, map_location: str | torch.device = "cpu"
) -> RewardPredictor:
    """Load a predictor saved by ``save_reward_predictor``; refuse one made for another model or task."""
    path = Path(path)
    refit = "fit it again with python downstream/reward.py --run <run dir>"
    if not path.is_file():
        raise MissingInputError(f"no reward predictor at {path}; {refit}")
    try:
        payload = load_torch_file(path, map_location)
    except UnreadableTorchFile as error:
        raise RewardPredictorMismatch(f"cannot read reward predictor {path} ({error}); {refit}") from None
    keys = ("task", "world_model_fingerprint", "input_size", "units", "state_dict")
    if not isinstance(payload, dict) or any(key not in payload for key in keys):
        raise RewardPredictorMismatch(f"{path} is not a reward predictor of downstream/reward.py; {refit}")
    if payload["task"] != task:
        raise RewardPredictorMismatch(f"{path} predicts rewards of {payload['task']!r}, not {task!r}")
    if payload["world_model_fingerprint"] != world_model:
        raise RewardPredictorMismatch(
            f"{path} was trained on the hidden states of another world model "
            f"({payload['world_model_fingerprint'][:12]} != {world_model[:12]}): rerun "
            "python downstream/reward.py --run <this run dir> to fit predictors for this checkpoint"
        )
    try:
        predictor = RewardPredictor(payload["input_size"], payload["units"])
        predictor.load_state_dict(payload["state_dict"])
    except (TypeError, RuntimeError) as error:
        raise RewardPredictorMismatch(f"{path} holds weights of another shape ({detail(error)}); {refit}") from None
    return predictor.eval()

