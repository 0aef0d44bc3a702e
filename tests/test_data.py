"""The window reader (worldmodel.data.WindowDataset) on the real tiny dataset, and the HDF5 storage
layer (worldmodel.storage) on real files."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from worldmodel import storage
from worldmodel.data import Window, WindowDataset
from worldmodel.tasks import MAX_ACTION_DIM, TASK_NAMES, TASKS, task_id
from worldmodel.windows import EpisodeWindows, flat_window_starts

STEPS = 30  # episode length of the tiny dataset (tests/conftest.py)
EPISODES = {"train": 2, "test": 1}


def file_arrays(root: Path, task: str, split: str) -> dict[str, np.ndarray]:
    with h5py.File(storage.dataset_path(root, task, split), "r") as file:
        return {name: file[name][...] for name in ("frames", "actions", "rewards", "states")}


@pytest.mark.parametrize(("length", "stride"), [(16, 1), (20, 1), (16, 3), (30, 1), (7, 5)])
def test_window_count_and_index_stay_inside_episodes(tiny_dataset: Path, length: int, stride: int) -> None:
    dataset = WindowDataset(tiny_dataset, "all", "train", length, stride=stride)
    per_episode = (STEPS - length) // stride + 1
    assert len(dataset) == len(TASK_NAMES) * EPISODES["train"] * per_episode
    index = dataset.index()
    assert index.shape == (len(dataset), 3)
    expected_starts = np.arange(0, STEPS - length + 1, stride)
    for file in range(len(TASK_NAMES)):
        for episode in range(EPISODES["train"]):
            rows = index[(index[:, 0] == file) & (index[:, 1] == episode)]
            np.testing.assert_array_equal(rows[:, 2], expected_starts)  # every start, none past T - L
    assert [tuple(dataset.key(i)) for i in range(len(dataset))] == [tuple(row) for row in index]
    with pytest.raises(IndexError):
        dataset.key(len(dataset))


def test_every_window_matches_its_file(tiny_dataset: Path) -> None:
    """All windows of all tasks: frames, rewards, real action dims as in the file; padding exactly 0."""
    length = 16
    dataset = WindowDataset(tiny_dataset, TASK_NAMES, "test", length)
    arrays = {task: file_arrays(tiny_dataset, task, "test") for task in TASK_NAMES}
    for index in range(len(dataset)):
        window = dataset[index]
        assert isinstance(window, Window)
        task = TASK_NAMES[int(window.task_id)]
        episode, start = int(window.episode), int(window.start)
        assert (dataset.files[dataset.key(index).file].info.task, episode, start) == (task, *dataset.key(index)[1:])
        steps = slice(start, start + length)
        action_dim = TASKS[task].action_dim
        assert window.frames.dtype == torch.uint8 and window.frames.shape == (length, 64, 64, 3)
        assert window.actions.dtype == torch.float32 and window.actions.shape == (length, MAX_ACTION_DIM)
        assert window.task_id.dtype == torch.int64 and window.task_id.shape == ()
        np.testing.assert_array_equal(window.frames.numpy(), arrays[task]["frames"][episode, steps])
        np.testing.assert_array_equal(window.actions[:, :action_dim].numpy(), arrays[task]["actions"][episode, steps])
        assert torch.count_nonzero(window.actions[:, action_dim:]) == 0
        np.testing.assert_array_equal(window.rewards.numpy(), arrays[task]["rewards"][episode, steps])
        assert window.states.shape == (length, 0)


def test_task_ids_follow_the_task_table(tiny_dataset: Path) -> None:
    dataset = WindowDataset(tiny_dataset, "walker-walk,cartpole", "train", 16)
    ids = torch.stack([dataset[i].task_id for i in range(len(dataset))])
    half = len(dataset) // 2
    assert set(ids[:half].tolist()) == {task_id("walker-walk")} and set(ids[half:].tolist()) == {task_id("cartpole")}
    assert task_id("walker-walk") == TASK_NAMES.index("walker-walk")


def test_states_padded_to_the_largest_task(tiny_dataset: Path) -> None:
    dataset = WindowDataset(tiny_dataset, ["cartpole", "walker-walk"], "train", 16, states=True)
    largest = max(storage.read_info(storage.dataset_path(tiny_dataset, task, "train")).state_dim
                  for task in ("cartpole", "walker-walk"))
    cartpole = file_arrays(tiny_dataset, "cartpole", "train")["states"]
    window = dataset[3]
    assert int(window.task_id) == task_id("cartpole") and window.states.shape == (16, largest)
    own = cartpole.shape[-1]
    np.testing.assert_array_equal(window.states[:, :own].numpy(), cartpole[0, 3:19])
    assert torch.count_nonzero(window.states[:, own:]) == 0
    single = WindowDataset(tiny_dataset, "cartpole", "train", 16, states=True)
    assert single[0].states.shape == (16, own)


def test_without_frames_reads_no_frames(tiny_dataset: Path) -> None:
    with_frames = WindowDataset(tiny_dataset, "reacher", "train", 20)
    without = WindowDataset(tiny_dataset, "reacher", "train", 20, frames=False)
    a, b = with_frames[5], without[5]
    assert b.frames.shape == (20, 0, 0, 0) and b.frames.dtype == torch.uint8
    assert torch.equal(a.actions, b.actions) and torch.equal(a.rewards, b.rewards) and a.start == b.start
    assert not any(frames.is_open for frames in without._frames)  # no HDF5 file was opened for frames


def test_dataloader_with_two_workers_sees_every_window_once(tiny_dataset: Path) -> None:
    dataset = WindowDataset(tiny_dataset, "all", "train", 16, stride=2)
    first = dataset[0]  # handles now open in this process: the workers must open their own
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        assert batch.frames.dtype == torch.uint8 and batch.frames.shape[1:] == (16, 64, 64, 3)
        assert batch.actions.shape[1:] == (16, MAX_ACTION_DIM)
        seen += [(int(t), int(e), int(s)) for t, e, s in zip(batch.task_id, batch.episode, batch.start)]
        for row, (t, e, s) in enumerate(seen[-len(batch.task_id):]):
            if (t, e, s) == (int(first.task_id), 0, 0):
                assert torch.equal(batch.frames[row], first.frames)
    expected = {(task_id(dataset.files[f].info.task), e, s) for f, e, s in dataset.index().tolist()}
    assert len(seen) == len(dataset) and set(seen) == expected


def test_pickled_dataset_reads_the_same(tiny_dataset: Path) -> None:
    dataset = WindowDataset(tiny_dataset, "cheetah", "test", 16)
    window = dataset[4]
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    assert torch.equal(copy[4].frames, window.frames) and torch.equal(copy[4].actions, window.actions)
    dataset.close()
    assert torch.equal(dataset[4].frames, window.frames)  # reopens after close


def test_missing_dataset_says_how_to_collect(tmp_path: Path, tiny_dataset: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"python collect/dmcs.py --domains cartpole"):
        WindowDataset(tmp_path / "nowhere", "cartpole", "train", 16)
    (tmp_path / "some").mkdir()
    storage.dataset_path(tmp_path / "some", "cartpole", "train").write_bytes(
        storage.dataset_path(tiny_dataset, "cartpole", "train").read_bytes()
    )
    with pytest.raises(FileNotFoundError, match=r"cheetah_train.h5; run `python collect/dmcs.py"):
        WindowDataset(tmp_path / "some", "cartpole,cheetah", "train", 16)


def test_bad_window_requests(tiny_dataset: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the 30 steps"):
        WindowDataset(tiny_dataset, "cartpole", "train", 31)
    with pytest.raises(ValueError, match="positive"):
        WindowDataset(tiny_dataset, "cartpole", "train", 16, stride=0)
    with pytest.raises(ValueError, match="unknown task"):
        WindowDataset(tiny_dataset, "pendulum", "train", 16)


# --------------------------------------------------------------------------------------------------
# Storage


def synthetic_episode(steps: int, seed: int) -> storage.Episode:
    """Compressible frames that still differ everywhere between episodes and steps."""
    rng = np.random.default_rng(seed)
    frames = np.repeat(rng.integers(0, 256, (steps + 1, 8, 8, 3), dtype=np.uint8), 8, axis=1).repeat(8, axis=2)
    return storage.Episode(
        frames=frames,
        actions=rng.uniform(-1, 1, (steps, 2)).astype(np.float32),
        rewards=rng.uniform(0, 1, steps).astype(np.float32),
        states=rng.normal(size=(steps + 1, 5)).astype(np.float32),
        seed=1000 + seed,
    )


DATASET_ATTRS = {
    "task": "reacher", "domain": "reacher", "dm_task": "easy", "split": "train", "action_repeat": 4,
    "horizon": 250, "episode_steps": 20, "num_episodes": 3, "seed": 0, "state_keys": ["a", "b"],
    "state_sizes": [2, 3], "package_version": "test", "format_version": storage.FORMAT_VERSION,
}


@pytest.mark.parametrize("steps", [20, 47, 10])  # 21 frames: one full chunk + an edge chunk; 11: one short chunk
def test_assembly_copies_episodes_exactly(tmp_path: Path, steps: int) -> None:
    episodes = [synthetic_episode(steps, seed) for seed in range(3)]
    paths = [tmp_path / f"episode_{i}.h5" for i in range(3)]
    for path, episode in zip(paths, episodes):
        storage.write_episode(path, episode, {"episode_index": 0})
        assert storage.read_episode(path).seed == episode.seed
    target = tmp_path / "reacher_train.h5"
    info = storage.assemble_dataset(paths, target, {**DATASET_ATTRS, "episode_steps": steps})
    assert (info.num_episodes, info.episode_steps, info.action_dim, info.state_dim) == (3, steps, 2, 5)
    with h5py.File(target, "r") as file:
        assert file["frames"].chunks == (1, min(16, steps + 1), 64, 64, 3)
        for index, episode in enumerate(episodes):
            for name in ("frames", "actions", "rewards", "states"):
                np.testing.assert_array_equal(file[name][index], getattr(episode, name))
        np.testing.assert_array_equal(file["episode_seeds"][...], [1000, 1001, 1002])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in paths), target.name])


def test_validation_names_the_problem(tmp_path: Path, tiny_dataset: Path) -> None:
    path = tmp_path / "cartpole_train.h5"
    path.write_bytes(storage.dataset_path(tiny_dataset, "cartpole", "train").read_bytes())
    storage.validate_dataset(path)
    with h5py.File(path, "a") as file:
        file["rewards"][0, 3] = np.nan
    with pytest.raises(storage.InvalidDatasetError, match="rewards has non-finite"):
        storage.validate_dataset(path)
    with h5py.File(path, "a") as file:
        del file["rewards"]
    with pytest.raises(storage.InvalidDatasetError, match="missing rewards"):
        storage.validate_dataset(path)
    path.write_text("not hdf5")
    with pytest.raises(storage.InvalidDatasetError, match="not a readable HDF5"):
        storage.validate_dataset(path)


def test_flat_window_starts_follow_the_episode_windows() -> None:
    """Episodes concatenated along one axis give the same windows, shifted by each episode's first row."""
    lengths, length, stride = [30, 12, 5, 16], 8, 3
    firsts = np.cumsum([0] + lengths[:-1])
    expected = [
        first + start
        for first, steps in zip(firsts, lengths)
        for _, start in EpisodeWindows(1, steps, length, stride).table().tolist()
    ]
    assert flat_window_starts(firsts.tolist(), lengths, length, stride).tolist() == expected
    assert expected[:8] == [0, 3, 6, 9, 12, 15, 18, 21] and 30 + 3 in expected and 42 not in expected  # 5 < 8: none
    assert EpisodeWindows(2, 30, 8, 3).locate(8) == (1, 0) and len(EpisodeWindows(2, 30, 8, 3)) == 16
