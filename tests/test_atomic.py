"""Atomic writes: the final name only ever holds a complete file; temporaries are found and cleaned."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.atomic import (
    atomic_output,
    atomic_torch_save,
    atomic_write,
    atomic_write_stream,
    atomic_write_text,
    stale_temporaries,
)


def test_interrupted_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "file.h5"
    with pytest.raises(RuntimeError), atomic_output(target) as temp:
        temp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as temp:
        temp.write_text("new")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_rewrites_leave_only_the_final_file_in_a_created_folder(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [path.name for path in target.parent.iterdir()] == ["a.json"]


def test_no_glob_for_the_final_suffix_sees_a_temporary_and_the_file_gets_normal_permissions(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(temp: Path) -> None:
        seen.append(temp)
        temp.write_bytes(b"half-written")
        assert temp.exists() and not list(tmp_path.rglob("*.h5")) and not list(tmp_path.glob("*.h5"))

    atomic_write(tmp_path / "data.h5", write)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".data.h5.") and seen[0].suffix == ".tmp"
    assert list(tmp_path.rglob("*.h5")) == [tmp_path / "data.h5"]
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "data.h5").stat().st_mode)
    assert mode == 0o666 & ~umask  # like any new file, not mkstemp's 0o600


def test_stale_temporaries_finds_what_a_killed_writer_left(tmp_path: Path) -> None:
    target = tmp_path / "cheetah_train.h5"
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as temp:
        leftover = temp.with_name(temp.name.replace(".tmp", "x.tmp"))  # a second writer's name pattern
        leftover.write_text("left by a SIGKILL")
        raise KeyboardInterrupt
    (tmp_path / "other.h5").write_text("not ours")
    assert stale_temporaries(target) == [leftover]


def test_stream_writers_that_add_suffixes_write_the_final_name(tmp_path: Path) -> None:
    """np.save would append .npy to a temporary that lacks it; through a stream it cannot."""
    atomic_write_stream(tmp_path / "errors.npy", lambda handle: np.save(handle, np.arange(4)))
    assert [path.name for path in tmp_path.iterdir()] == ["errors.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "errors.npy"), np.arange(4))


def test_torch_save_round_trips(tmp_path: Path) -> None:
    atomic_torch_save({"weights": torch.arange(3)}, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(loaded["weights"], torch.arange(3))


def test_load_torch_file_reads_what_atomic_torch_save_wrote_and_refuses_damage(tmp_path: Path) -> None:
    from worldmodel.atomic import UnreadableTorchFile, atomic_torch_save, load_torch_file
    from worldmodel.keypoint_cache import load_keypoint_cache

    path = tmp_path / "payload.pt"
    atomic_torch_save({"vision_fingerprint": "abc", "x": torch.arange(3)}, path)
    assert torch.equal(load_torch_file(path)["x"], torch.arange(3))
    path.write_bytes(path.read_bytes()[:-40])  # a killed copy
    with pytest.raises(UnreadableTorchFile, match="truncated"):
        load_torch_file(path)
    assert load_keypoint_cache(path, "abc") is None  # a damaged cache counts as none: detected again
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(UnreadableTorchFile):
        load_torch_file(tmp_path / "text.pt")
