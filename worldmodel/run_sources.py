"""Where a training run's weights come from before its first step: its own checkpoint in ``--out`` (resumed,
or finished and left alone), or another finished run's (``--vision-from``: the detector and reconstructor,
and their keypoint cache; ``--init-from``: every weight). Each check raises InputError, with what to give
instead, before anything is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from worldmodel.atomic import atomic_write
from worldmodel.checkpoint import CHECKPOINT_FILE, CheckpointError, find_checkpoint, load_checkpoint
from worldmodel.config import ModelConfig
from worldmodel.errors import InputError
from worldmodel.keypoint_cache import KEYPOINT_CACHE_FILE
from worldmodel.model import WorldModel
from worldmodel.options import changed_options
from worldmodel.train_config import Stage, TrainConfig, config_differences


def existing_run(config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint in --out, if any: InputError where these options cannot use it (a finished run with
    other options, a run without --resume, --resume with other options, or a damaged checkpoint)."""
    run_dir, checkpoint_path = config.out, config.out / CHECKPOINT_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir} is a file, not a folder; choose another --out")
    if config.resume and not checkpoint_path.is_file():
        raise InputError(f"--resume: no checkpoint in {run_dir}; start a new run without --resume")
    if not checkpoint_path.is_file():
        return None
    checkpoint = load_checkpoint(checkpoint_path)  # damaged or foreign: CheckpointError
    differences = config_differences(checkpoint["train_config"], config)
    if checkpoint["complete"] and differences:
        raise InputError(f"{run_dir} holds a finished run with other options ({', '.join(differences)}); choose another --out")
    if checkpoint["complete"]:
        return checkpoint  # a rerun of finished work: nothing to do
    if not config.resume:
        raise InputError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    if differences:
        raise InputError(
            f"--resume with a different config than the run in {run_dir} ({', '.join(differences)}); "
            "give the run's options (see its config.json), or choose another --out"
        )
    return checkpoint


def check_same_data(checkpoint: dict[str, Any], dataset_record: dict[str, Any], config: TrainConfig) -> None:
    """A resumed run continues on data collected like its own (the model's steps mean the same duration)."""
    trained_on = checkpoint["dataset"].get("action_repeats")
    if trained_on != dataset_record["action_repeats"]:
        raise InputError(
            f"--data {config.data} was collected with action repeats {dataset_record['action_repeats']}, the run in "
            f"{config.out} trained on data with {trained_on}; resume with its dataset ({checkpoint['dataset'].get('path')})"
        )


DETECTOR_SETTINGS = ("heatmap", "heatmap_logit_scale", "keypoint_sigma")  # ModelConfig fields a taken detector must share


def check_detector_settings(model: WorldModel, checkpoint: dict[str, Any], option: str) -> None:
    """Refuse a detector trained with other settings that change what the same weights detect (the weights'
    shapes do not show them: at another softmax scale the same logits give other keypoints)."""
    their_net = {name: value for name, value in (checkpoint.get("model_config") or {}).items() if name in DETECTOR_SETTINGS}
    mine = {name: getattr(model.config, name) for name in DETECTOR_SETTINGS}
    defaults = {name: getattr(ModelConfig(), name) for name in DETECTOR_SETTINGS}  # for checkpoints that predate one
    differing = changed_options(their_net, mine, defaults)
    if differing:
        give = " ".join(f"--net.{name.replace('_', '-')} {their_net.get(name, defaults[name])}" for name in differing)
        raise InputError(f"{option}: its detector was trained with other settings; give {give} to take it")


def take_vision(model: WorldModel, source: Path, dataset_record: dict[str, Any], run_dir: Path | None) -> None:
    """Load the vision weights of the finished run ``source`` into ``model`` and copy its keypoint cache into
    ``run_dir`` (rank 0; None elsewhere), so that the staged run starts at the keypoint stage."""
    try:
        checkpoint = load_checkpoint(source)
    except CheckpointError as error:
        raise InputError(f"--vision-from: {error}") from None
    if checkpoint["stage"] in (Stage.VISION, Stage.JOINT) and not checkpoint["complete"]:
        raise InputError(f"--vision-from {source}: its vision stage has not finished (resume that run first)")
    theirs = checkpoint["dataset"]
    if (theirs.get("path"), list(theirs.get("tasks", []))) != (dataset_record["path"], dataset_record["tasks"]):
        raise InputError(f"--vision-from {source} was trained on {theirs.get('path')} ({', '.join(theirs.get('tasks', []))}); "
                         f"this run uses {dataset_record['path']} ({', '.join(dataset_record['tasks'])}): give the same --data and --tasks")  # fmt: skip
    own_parts = ("dynamics.", "normalizer.")  # what this run trains and fits itself
    vision = {key: value for key, value in checkpoint["model"].items() if not key.startswith(own_parts)}
    wanted = {key: value.shape for key, value in model.state_dict().items() if not key.startswith(own_parts)}
    if {key: value.shape for key, value in vision.items()} != wanted:
        raise InputError(f"--vision-from {source}: its vision network differs from this one; give the same --model and --net sizes")
    check_detector_settings(model, checkpoint, f"--vision-from {source}")
    model.load_state_dict(vision, strict=False)
    cache = find_checkpoint(source).parent / KEYPOINT_CACHE_FILE
    if run_dir is not None and cache.is_file():  # else detected again (the fingerprint decides either way)
        atomic_write(run_dir / KEYPOINT_CACHE_FILE, lambda temp: shutil.copyfile(cache, temp))


def take_run(model: WorldModel, source: Path, dataset_record: dict[str, Any]) -> None:
    """--init-from: load every weight of the finished run ``source`` into ``model`` (the dynamics are then
    fine-tuned). Its data may be another folder, with more episodes, of its tasks or some of them, collected
    with the same action repeats (the model's steps must mean the same duration); its keypoint cache is not
    taken (the data differ, so the keypoints are detected again)."""
    try:
        checkpoint = load_checkpoint(source)
    except CheckpointError as error:
        raise InputError(f"--init-from: {error}") from None
    if not checkpoint["complete"]:
        raise InputError(f"--init-from {source}: the run has not finished (resume it first)")
    theirs = checkpoint["dataset"]
    repeats = theirs.get("action_repeats") or {}
    foreign = [task for task in dataset_record["tasks"] if task not in repeats]
    if foreign:
        raise InputError(f"--init-from {source} was not trained on {', '.join(foreign)} (its tasks: "
                         f"{', '.join(theirs.get('tasks', []))}): give --tasks among those")  # fmt: skip
    for task, repeat in dataset_record["action_repeats"].items():
        if repeats[task] != repeat:
            raise InputError(f"--data {dataset_record['path']} holds {task} with action repeat {repeat}, --init-from "
                             f"{source} was trained with {repeats[task]}: give data collected like its own")  # fmt: skip
    check_detector_settings(model, checkpoint, f"--init-from {source}")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise InputError(f"--init-from {source}: its network differs from this one; give the same --model, "
                         "--dynamics and --net sizes (see its config.json)") from None  # fmt: skip
