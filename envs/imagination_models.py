"""The world model and a task's reward predictor that the imagination envs run, loaded once per process.

Which world model (first found wins): the ``checkpoint=`` keyword (a run directory of ``train/world_model.py``
or a checkpoint file in it), the ``STRUCTVRNN_CHECKPOINT`` environment variable, the trainer's default run
directory ``runs/world_model``. Its reward predictor is ``<run dir>/reward_predictors/<task>.pt`` (or
``reward_predictor=``); it must carry the fingerprint of that model's weights. Models are loaded once per
process and device (cache keyed by path and mtime) and shared by every env of the process: never modify them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar

import torch

from worldmodel.checkpoint import CHECKPOINT_FILE, CheckpointError, LoadedWorldModel, find_checkpoint, load_world_model
from worldmodel.devices import resolve_device
from worldmodel.errors import MissingInputError
from worldmodel.fingerprint import model_fingerprint
from worldmodel.model import WorldModel
from worldmodel.reward import RewardPredictor, RewardPredictorMismatch, load_reward_predictor
from worldmodel.tasks import IMAGE_SIZE, get_task

CHECKPOINT_ENV = "STRUCTVRNN_CHECKPOINT"
DEFAULT_RUN_DIR = Path("runs/world_model")  # train/world_model.py's default --out
REWARD_PREDICTOR_DIR = "reward_predictors"  # downstream/reward.py writes <run dir>/reward_predictors/<task>.pt
_Loaded = TypeVar("_Loaded")


# ----------------------------------------------------------------------------------------------
# Loading the world model and its reward predictor (once per process)
# ----------------------------------------------------------------------------------------------
class ImaginationModels(NamedTuple):
    """A world model, one task's reward predictor fit on its hidden states, and what the checkpoint says."""

    world_model: WorldModel  # eval mode, on `device`; shared: never modify
    reward_predictor: RewardPredictor  # eval mode, on `device`; shared: never modify
    fingerprint: str  # model_fingerprint(world_model)
    checkpoint: Path  # the checkpoint file
    dataset: Path | None  # the training data directory recorded in the checkpoint
    keypoint_cache: Path | None  # a staged run's detected keypoints of that data (train/world_model.py)
    task: str
    action_repeat: int  # the one the model's data of this task was collected with
    device: torch.device


def resolve_checkpoint(checkpoint: str | os.PathLike[str] | None) -> Path:
    """The checkpoint file: the argument, else $STRUCTVRNN_CHECKPOINT, else runs/world_model; one clear error."""
    if checkpoint is not None:
        candidates = [(Path(checkpoint), "checkpoint=")]
    elif os.environ.get(CHECKPOINT_ENV):
        candidates = [(Path(os.environ[CHECKPOINT_ENV]), f"${CHECKPOINT_ENV}")]
    else:
        candidates = [(DEFAULT_RUN_DIR, "the default run directory")]
    path, origin = candidates[0]
    try:
        return find_checkpoint(path).resolve()
    except CheckpointError:
        raise CheckpointError(
            f"no world-model checkpoint at {path} ({origin}; looked for {path} or {path / CHECKPOINT_FILE}): "
            f"train one with `python train/world_model.py --out {DEFAULT_RUN_DIR}`, then fit its reward "
            f"predictors with `python downstream/reward.py --run {DEFAULT_RUN_DIR}`; or pass checkpoint=<run dir> "
            f"or set {CHECKPOINT_ENV}"
        ) from None


# Models loaded in this process, keyed by what they were loaded from (path, mtime, device, ...): every env of
# the process shares them (they are never modified) and a file changed on disk is loaded again.
_LOADED: dict[tuple[Any, ...], Any] = {}
_LOAD_LOCK = threading.Lock()


def _load_once(key: tuple[Any, ...], load: Callable[[], _Loaded]) -> _Loaded:
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = load()
        return _LOADED[key]


def _load_world_model(path: Path, device: torch.device) -> tuple[LoadedWorldModel, str]:
    loaded = load_world_model(path, device)
    loaded.model.requires_grad_(False)
    return loaded, model_fingerprint(loaded.model)


def _load_reward_predictor(
    path: Path, task: str, fingerprint: str, hidden_size: int, device: torch.device
) -> RewardPredictor:
    predictor = load_reward_predictor(path, task, fingerprint, map_location=device)
    if predictor.input_size != hidden_size:
        raise RewardPredictorMismatch(
            f"{path} reads {predictor.input_size} features, the world model's hidden state has {hidden_size}"
        )
    return predictor.to(device).requires_grad_(False)


def load_imagination_models(
    task: str,
    checkpoint: str | os.PathLike[str] | None = None,
    reward_predictor: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    *,
    allow_state_bound: bool = False,
) -> ImaginationModels:
    """The world model and the task's reward predictor, from the per-process cache when unchanged on disk.

    Raises CheckpointError (no model: how to train one), FileNotFoundError (no reward predictor: how to fit
    one), RewardPredictorMismatch (the predictor was fit on another model's hidden states, or another task).
    """
    spec = get_task(task)
    device = resolve_device(device)
    path = resolve_checkpoint(checkpoint)
    model_key = ("world model", str(path), path.stat().st_mtime_ns, str(device))
    loaded, fingerprint = _load_once(model_key, lambda: _load_world_model(path, device))
    if loaded.config.reads_states and not allow_state_bound:  # the envs need frames; action_ranking reads states
        raise CheckpointError(
            f"the world model at {path} is a state-space bound (state-vrnn): it reads true states, not frames, "
            "and has no imagination env; it is a control for downstream/reward.py --state-bound"
        )
    dataset_info = loaded.info.dataset
    repeats = dataset_info.get("action_repeats") or {}
    if spec.name not in repeats:
        trained_on = ", ".join(dataset_info.get("tasks", repeats)) or "unknown tasks"
        raise CheckpointError(
            f"the world model at {path} was not trained on {spec.name} (its tasks: {trained_on}); "
            f"pass checkpoint= a run trained on {spec.name}"
        )
    if loaded.config.image_size != IMAGE_SIZE:
        raise CheckpointError(
            f"the world model at {path} sees {loaded.config.image_size}-pixel frames, the tasks render {IMAGE_SIZE}; "
            "pass checkpoint= a run of train/world_model.py on collect/dmcs.py data"
        )

    predictor_path = Path(reward_predictor) if reward_predictor is not None else (
        path.parent / REWARD_PREDICTOR_DIR / f"{spec.name}.pt"
    )
    if not predictor_path.is_file():
        raise MissingInputError(
            f"no reward predictor for {spec.name} at {predictor_path}; fit one for this world model with "
            f"`python downstream/reward.py --run {path.parent} --tasks {spec.name}` (or pass reward_predictor=)"
        )
    predictor_key = (
        "reward predictor", str(predictor_path.resolve()), predictor_path.stat().st_mtime_ns, fingerprint, spec.name,
        str(device),
    )
    hidden_size = loaded.model.dynamics.hidden_size
    predictor = _load_once(
        predictor_key, lambda: _load_reward_predictor(predictor_path, spec.name, fingerprint, hidden_size, device)
    )
    recorded = dataset_info.get("path")
    cache = dataset_info.get("keypoint_cache")
    return ImaginationModels(
        world_model=loaded.model,
        reward_predictor=predictor,
        fingerprint=fingerprint,
        checkpoint=path,
        dataset=Path(recorded) if recorded else None,
        keypoint_cache=Path(cache) if cache else None,
        task=spec.name,
        action_repeat=int(repeats[spec.name]),
        device=device,
    )
