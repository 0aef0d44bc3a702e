"""Training checkpoints: atomic writes, RNG capture, and ``load_world_model`` for downstream code.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python containers, so it loads
with ``torch.load(weights_only=True)`` (no pickled classes):

    format       int, CHECKPOINT_FORMAT
    version      the worldmodel package version that wrote it
    model        WorldModel state dict
    model_config dataclasses.asdict(ModelConfig)
    train_config the training run's config as a plain dict (profile, seed, schedules, sizes ...)
    dataset      {"path": str, "tasks": [...], "action_repeats": {task: int}, "keypoint_cache": str|None}
    stage        "vision" | "keypoints" | "dynamics" | "joint" | "done": the stage to continue with
    step         optimizer steps completed within that stage
    global_step  optimizer steps completed over all stages (the x axis of the logs)
    optimizer    the current stage's optimizer state dict (None when between stages)
    rng          rank 0's torch (/ cuda) generator states at the moment of saving (older checkpoints also
                 hold numpy's and python's, which training never draws from; restoring them is harmless)
    rng_ranks    the same for every process of the run, in rank order (one entry for a single process), so
                 that a resume with as many processes continues every process's random draws exactly
    complete     True once training finished
    extra        the rest of the trainer's state (worldmodel.training.TrainState: stage_seconds, final_losses,
                 last_eval) and the GradScaler's state (None unless fp16)

Checkpoints are written atomically (``worldmodel.atomic``), so a kill never leaves a half-written one.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import worldmodel
from worldmodel.atomic import UnreadableTorchFile, atomic_torch_save, load_torch_file
from worldmodel.config import ModelConfig
from worldmodel.errors import InputError, detail
from worldmodel.model import WorldModel
from worldmodel.precision import inference_compute
from worldmodel.storage import FRAME_SHAPE, DatasetInfo

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_HINT = "train one with `python train/world_model.py`"


REQUIRED_KEYS = ("model", "model_config", "train_config", "dataset", "stage", "step", "global_step", "complete")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the request; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# RNG states in a weights_only-loadable form
# ----------------------------------------------------------------------------------------------
# World-model training draws only from torch's generators (the window order and the evaluation windows come
# from their own seeded numpy generators), so its checkpoints keep only those.
TRAINING_GENERATORS = ("torch", "cuda")


def capture_torch_rng_state() -> dict[str, Any]:
    """torch's CPU (and initialised CUDA) generator states, as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def capture_rng_state() -> dict[str, Any]:
    """torch's, numpy's global and python's generator states, as tensors and plain containers (for RL
    snapshots: stable-baselines3 draws minibatches from numpy's global generator)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, python_internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        **capture_torch_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(python_internal), "gauss_next": gauss_next},
    }
    return state


def seed_rng(seed: int) -> None:
    """Seed the generators a training checkpoint saves (``TRAINING_GENERATORS``): a fresh run's generator
    states are then a function of the seed, as the states a resume restores are."""
    torch.manual_seed(seed)


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the generators of ``capture_rng_state`` or ``capture_torch_rng_state`` (those present)."""
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                "MT19937",
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["position"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
    if "python" in state:
        python_state = state["python"]
        random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------
def save_checkpoint(
    path: Path,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    dataset: dict[str, Any],
    stage: str,
    step: int,
    global_step: int,
    optimizer_state: dict[str, Any] | None,
    complete: bool = False,
    extra: dict[str, Any] | None = None,
    rng_ranks: list[dict[str, Any]] | None = None,
) -> None:
    """Write a checkpoint atomically (see the module docstring for the layout). ``rng_ranks``: every process's
    ``capture_torch_rng_state()`` in rank order (other generators given are left out); by default this
    process's own, now."""
    rng_ranks = [
        {name: value for name, value in state.items() if name in TRAINING_GENERATORS}
        for state in rng_ranks or [capture_torch_rng_state()]
    ]
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": worldmodel.__version__,
        "model": {name: tensor.detach().cpu() for name, tensor in model_state.items()},
        "model_config": model_config,
        "train_config": train_config,
        "dataset": dataset,
        "stage": stage,
        "step": int(step),
        "global_step": int(global_step),
        "optimizer": optimizer_state,
        "rng": rng_ranks[0],
        "rng_ranks": rng_ranks,
        "complete": bool(complete),
        "extra": extra or {},
    }
    atomic_torch_save(payload, path)


def find_checkpoint(path_or_run_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint file itself, or ``<run dir>/checkpoint.pt``; CheckpointError if missing."""
    path = Path(path_or_run_dir)
    candidate = path / CHECKPOINT_FILE if path.is_dir() else path
    if not candidate.is_file():
        where = f"run directory {path}" if path.is_dir() else str(path)
        raise CheckpointError(f"no world-model checkpoint at {where}: {TRAIN_HINT}")
    return candidate


def load_checkpoint(
    path_or_run_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The raw checkpoint dict, loaded with ``weights_only=True``."""
    path = find_checkpoint(path_or_run_dir)
    damaged = f"it is damaged or not a checkpoint of train/world_model.py: restore it, or {TRAIN_HINT}"
    try:
        checkpoint = load_torch_file(path, map_location)
    except UnreadableTorchFile as error:
        raise CheckpointError(f"cannot read checkpoint {path} ({error}); {damaged}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a world-model checkpoint (format {CHECKPOINT_FORMAT}); {damaged}")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; {damaged}")
    return checkpoint


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from its plain-dict form; unknown keys are an error (version skew)."""
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint model config is not a dict; the checkpoint is foreign: {TRAIN_HINT}")
    unknown = set(values) - known
    if unknown:
        raise CheckpointError(
            f"checkpoint model config has fields this code does not know: {sorted(unknown)}; "
            "it was written by another version of this package: load it with that version"
        )
    converted = {}
    for field in dataclasses.fields(ModelConfig):
        if field.name in values:
            value = values[field.name]
            # Tuples become lists on the way through plain containers; give them back their type.
            converted[field.name] = tuple(value) if isinstance(value, list) else value
    return ModelConfig(**converted)


class CheckpointInfo(NamedTuple):
    """What a loaded checkpoint says about how the model was made."""

    path: Path
    stage: str
    step: int
    global_step: int
    complete: bool
    version: str
    dataset: dict[str, Any]  # path, tasks, action_repeats, keypoint_cache
    train_config: dict[str, Any]


class LoadedWorldModel(NamedTuple):
    model: WorldModel  # in eval mode, on the requested device
    config: ModelConfig
    info: CheckpointInfo


def load_world_model(
    path_or_run_dir: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> LoadedWorldModel:
    """A ready WorldModel from a run directory or a checkpoint file.

    ``model, config, info = load_world_model("runs/world_model", "cpu")``; raises CheckpointError
    ("... train one with python train/world_model.py") when there is none.
    """
    checkpoint = load_checkpoint(path_or_run_dir, map_location="cpu")
    try:
        config = model_config_from_dict(checkpoint["model_config"])
        model = WorldModel(config)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError, AttributeError) as error:  # CheckpointError passes through
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"checkpoint {find_checkpoint(path_or_run_dir)} holds weights that do not fit its model config "
            f"({detail(error)}); it is damaged or foreign: {TRAIN_HINT}"
        ) from None
    model = inference_compute(torch.device(device)).prepare(model.to(device)).eval()
    info = CheckpointInfo(
        path=find_checkpoint(path_or_run_dir),
        stage=checkpoint["stage"],
        step=checkpoint["step"],
        global_step=checkpoint["global_step"],
        complete=checkpoint["complete"],
        version=checkpoint["version"],
        dataset=checkpoint["dataset"],
        train_config=checkpoint["train_config"],
    )
    return LoadedWorldModel(model, config, info)


def check_dataset_fits(info: CheckpointInfo, config: ModelConfig, dataset: DatasetInfo) -> None:
    """Refuse a dataset file the world model of a checkpoint was not trained on data like: another task, another
    action repeat (the model's steps would mean another duration) or another frame size."""
    tasks = list(info.dataset.get("tasks", []))
    repeats = info.dataset.get("action_repeats") or {}
    if dataset.task not in repeats:
        raise CheckpointError(
            f"the world model {info.path} was not trained on {dataset.task} (its tasks: {', '.join(tasks) or 'unknown'}); "
            f"use a run trained on {dataset.task}, or leave it out of --tasks"
        )
    if int(repeats[dataset.task]) != dataset.action_repeat:
        raise CheckpointError(
            f"{dataset.path} was collected with action repeat {dataset.action_repeat}, the world model {info.path} "
            f"was trained on {dataset.task} data with action repeat {repeats[dataset.task]}; "
            f"use the dataset it was trained on ({info.dataset.get('path')})"
        )
    if config.image_size != FRAME_SHAPE[0]:
        raise CheckpointError(
            f"the world model {info.path} sees {config.image_size}x{config.image_size} frames, {dataset.path} holds "
            f"{FRAME_SHAPE[0]}x{FRAME_SHAPE[1]}; use a model trained on this kind of data"
        )
