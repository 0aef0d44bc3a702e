"""Checkpoints: RNG round trip, weights_only loading, load_world_model."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.precision import choose_compute
from worldmodel.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_world_model,
    model_config_from_dict,
    restore_rng_state,
    save_checkpoint,
)
from worldmodel.config import ModelConfig
from worldmodel.model import WorldModel


def draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_round_trip() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leaves a cached Gaussian in numpy's legacy state
    state = capture_rng_state()
    expected = draws()
    draws()  # move every generator on
    restore_rng_state(state)
    assert draws() == expected


def write_model_checkpoint(path: Path, model: WorldModel, config: ModelConfig) -> None:
    save_checkpoint(
        path,
        model_state=model.state_dict(),
        model_config=dataclasses.asdict(config),
        train_config={"profile": "smoke", "seed": 3},
        dataset={"path": "/data", "tasks": ["cheetah"], "action_repeats": {"cheetah": 4}, "keypoint_cache": None},
        stage="done",
        step=0,
        global_step=12,
        optimizer_state=None,
        complete=True,
    )


def test_checkpoint_loads_weights_only_and_restores_the_same_outputs(tmp_path: Path) -> None:
    config = ModelConfig.smoke(variant="struct-vrnn")
    torch.manual_seed(0)
    model = WorldModel(config)
    model.fit_keypoint_normalization(torch.rand(4, 6, config.num_keypoints, 3))  # buffers travel too
    model.eval()
    write_model_checkpoint(tmp_path / "checkpoint.pt", model, config)

    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no pickled classes inside
    assert raw["dataset"]["action_repeats"] == {"cheetah": 4} and raw["version"]
    assert set(raw["rng"]) == {"torch"}  # the only generator (on the CPU) that training draws from

    loaded, loaded_config, info = load_world_model(tmp_path, "cpu")  # a run directory works
    assert loaded_config == config and not loaded.training
    assert info.complete and info.global_step == 12 and info.dataset["tasks"] == ["cheetah"]
    frames = torch.randint(0, 256, (2, 5, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    actions = torch.rand(2, 5, 6)
    model = choose_compute("cpu").prepare(model)  # the loader puts the convs in the chosen memory format too
    assert loaded.detector is not None and loaded.detector.to_heatmaps.weight.is_contiguous(memory_format=torch.channels_last)
    for net in (model, loaded):
        torch.manual_seed(7)
        detected = net.detect(frames)
        rollout = net.observe(detected, actions)
        decoded = net.decode(rollout.keypoints, frames[:, 0], detected[:, 0])
        if net is model:
            expected = (detected, rollout.keypoints, decoded)
    assert torch.equal(detected, expected[0])
    assert torch.equal(rollout.keypoints, expected[1])
    assert torch.equal(decoded, expected[2])


def test_missing_checkpoint_says_how_to_train_one(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="python train/world_model.py"):
        load_world_model(tmp_path, "cpu")
    with pytest.raises(CheckpointError, match="python train/world_model.py"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_world_model(tmp_path, "cpu")


def test_model_config_round_trips_through_a_plain_dict() -> None:
    config = ModelConfig.cpu(variant="cnn-vrnn")
    assert model_config_from_dict(dataclasses.asdict(config)) == config
    with pytest.raises(CheckpointError, match="fields"):
        model_config_from_dict({**dataclasses.asdict(config), "no_such_field": 1})
