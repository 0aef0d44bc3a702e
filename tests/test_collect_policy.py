"""Collection with a trained agent (collect/dmcs.py --policy, collect/agent.py) and named dataset parts, for
real: a PPO agent trained for a few imagined steps in the smoke world model acts on real cartpole; the part's
layout, provenance, seeding, replay through the simulator, the readers that take it in, resume after SIGKILL,
and the refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from collect.agent import WARMUP_STEPS
from collect.dmcs import collect_with_policy
from envs.simulator import Simulator
from tests.process_tree import kill_tree, start, wait_for
from worldmodel import storage
from worldmodel.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
COLLECTOR = REPO_ROOT / "collect" / "dmcs.py"
TASK = "cartpole"
STEPS = 30  # the tiny dataset's episode length: a part must have its main file's
PART = "agent-r01"
EPISODES = 2


def train_agent(run: Path, folder: Path, observe_keypoints: bool = False) -> Path:
    """A PPO agent trained for 64 imagined cartpole steps in the world model ``run`` (seconds)."""
    from stable_baselines3 import PPO

    from envs.sb3 import ImaginedSB3VecEnv

    venv = ImaginedSB3VecEnv(TASK, 4, checkpoint=run, horizon=16, device="cpu", observe_keypoints=observe_keypoints)
    venv.seed(0)
    model = PPO("MlpPolicy", venv, n_steps=16, batch_size=32, seed=0, device="cpu", verbose=0)
    model.learn(64)
    path = folder / f"{TASK}-ppo.zip"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def agent(imagination_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PPO agent trained for 64 imagined cartpole steps in the smoke world model, observing its hidden states."""
    return train_agent(imagination_run, tmp_path_factory.mktemp("agent"))


def dataset_copy(tiny_dataset: Path, folder: Path) -> Path:
    """The tiny dataset's cartpole files (train: 2 episodes, test: 1) in a fresh folder."""
    folder.mkdir(parents=True)
    for split in storage.SPLITS:
        shutil.copy(storage.dataset_path(tiny_dataset, TASK, split), folder)
    return folder


def collect_part(folder: Path, agent: Path, run: Path, seed: int = 5, noise: float = 0.3, part: str = PART) -> Path:
    collect_with_policy(agent, run, TASK, folder, part=part, noise=noise, train_episodes=EPISODES,
                        episode_steps=STEPS, seed=seed)  # fmt: skip
    return storage.dataset_path(folder, TASK, "train", part)


def cli_options(agent: Path, run: Path, *extra: str) -> list[str]:
    return ["--domains", TASK, "--policy", str(agent), "--checkpoint", str(run), "--part", PART, "--noise", "0.3",
            "--train-episodes", str(EPISODES), "--test-episodes", "0", "--episode-steps", str(STEPS), "--seed", "5",
            "--workers", "1", *extra]  # fmt: skip


def run_collector(out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(COLLECTOR), "--out", str(out), *options]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def assert_refused(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit 2 with one error line; the only other line allowed is the world model's 'compute:' notice, printed
    when it is loaded (to identify it, before the settings can be compared)."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("compute: ")]
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}  # fmt: skip


def arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        return {name: file[name][...] for name in storage.DATASET_NAMES}


@pytest.fixture(scope="module")
def reference(tiny_dataset: Path, agent: Path, imagination_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny cartpole dataset with part agent-r01: 2 train episodes of the agent, noise 0.3, seed 5."""
    folder = dataset_copy(tiny_dataset, tmp_path_factory.mktemp("reference") / "data")
    collect_part(folder, agent, imagination_run)
    return folder


# --------------------------------------------------------------------------------------------------
# The part: layout, provenance, contents


def test_part_has_the_dataset_layout_and_its_provenance(reference: Path, agent: Path, imagination_run: Path) -> None:
    from worldmodel.checkpoint import load_world_model
    from worldmodel.fingerprint import model_fingerprint

    path = storage.dataset_path(reference, TASK, "train", PART)
    assert path.name == f"{TASK}_train.{PART}.h5"
    assert not storage.dataset_path(reference, TASK, "test", PART).exists()  # --test-episodes 0
    assert not (reference / ".partial").exists()
    info = storage.validate_dataset(path)
    main = storage.read_info(storage.dataset_path(reference, TASK, "train"))
    assert (info.num_episodes, info.episode_steps, info.action_dim, info.state_dim) == (
        EPISODES, STEPS, main.action_dim, main.state_dim
    )
    assert storage.part_differences(main.attrs, info.attrs) == []
    attrs = info.attrs
    loaded = load_world_model(imagination_run, "cpu")
    provenance = {
        "part": PART,
        "policy": str(agent.resolve()),
        "policy_sha256": hashlib.sha256(agent.read_bytes()).hexdigest(),
        "policy_algorithm": "ppo",
        "policy_noise": 0.3,
        "world_model_checkpoint": str(loaded.info.path.resolve()),
        "world_model_fingerprint": model_fingerprint(loaded.model),
        "warmup_steps": WARMUP_STEPS,
        "refilter": True,
    }
    assert {key: attrs[key] for key in provenance} == provenance
    settings = json.loads(attrs["collection_settings"])
    assert {key: settings[key] for key in ("policy", "policy_sha256", "world_model_fingerprint", "part")} == {
        key: provenance[key] for key in ("policy", "policy_sha256", "world_model_fingerprint", "part")
    }
    assert settings["noise"] == 0.3 and settings["seed"] == 5 and attrs["seed"] == 5
    data = arrays(path)
    assert np.abs(data["actions"]).max() <= 1.0
    # Agent episodes never start where the random episodes do; train seeds keep the split's lowest bit.
    main_seeds = arrays(storage.dataset_path(reference, TASK, "train"))["episode_seeds"]
    assert not set(data["episode_seeds"]) & set(main_seeds) and (data["episode_seeds"] % 2 == 0).all()
    assert len(set(data["episode_seeds"])) == EPISODES


def test_an_agent_that_sees_keypoints_is_recognised_and_collects(
    tiny_dataset: Path, imagination_run: Path, tmp_path: Path
) -> None:
    """downstream/loop.py --observe-keypoints: the agent's observations are the hidden state and the detected keypoints;
    the collector tells so from its observation space, records it, and the part replays like any other."""
    from worldmodel.checkpoint import load_world_model

    agent = train_agent(imagination_run, tmp_path, observe_keypoints=True)
    config = load_world_model(imagination_run, "cpu").model.config
    folder = dataset_copy(tiny_dataset, tmp_path / "data")
    path = collect_part(folder, agent, imagination_run)
    settings = json.loads(storage.read_info(path).attrs["collection_settings"])
    assert settings["observe_keypoints"] is True
    from stable_baselines3 import PPO

    assert PPO.load(agent, device="cpu").observation_space.shape == (config.rnn_size + config.num_keypoints * 3,)
    assert_replays(path)


def assert_replays(path: Path) -> None:
    """The stored actions are the applied ones: replaying them from the stored seed gives the stored states,
    rewards and frames (the warm-up's random steps included)."""
    data = arrays(path)
    simulator = Simulator(TASK)
    for episode in range(len(data["episode_seeds"])):
        frame, state = simulator.reset(int(data["episode_seeds"][episode]))
        np.testing.assert_array_equal(state, data["states"][episode, 0])
        assert np.abs(frame.astype(int) - data["frames"][episode, 0]).mean() < 0.1
        for t, action in enumerate(data["actions"][episode]):
            transition = simulator.step(action)
            np.testing.assert_allclose(transition.state, data["states"][episode, t + 1], rtol=0, atol=1e-6)
            assert transition.reward == pytest.approx(float(data["rewards"][episode, t]), abs=1e-5)
    simulator.close()


def test_a_planner_collects_deterministically_and_records_itself(
    tiny_dataset: Path, imagination_run: Path, tmp_path: Path
) -> None:
    """--policy planner.json: each action planned in the world model (worldmodel/planning.py) after a warm-up of
    zero actions; the part records the planner file and 'cem', replays like any other, and the same seed gives the same part (the planner's draws come
    from the episode's seeds, and differ between episodes)."""
    from worldmodel.planning import PlannerConfig, save_planner

    planner = tmp_path / "cartpole-cem.planner.json"
    save_planner(planner, PlannerConfig(horizon=3, candidates=8, elites=2, iterations=1))
    paths = [collect_part(dataset_copy(tiny_dataset, tmp_path / name), planner, imagination_run, noise=0.0)
             for name in ("first", "again")]  # fmt: skip
    attrs = storage.read_info(paths[0]).attrs
    assert attrs["policy_algorithm"] == "cem" and attrs["policy"] == str(planner.resolve())
    assert attrs["policy_sha256"] == hashlib.sha256(planner.read_bytes()).hexdigest()
    first, again = (arrays(path) for path in paths)
    for name in storage.DATASET_NAMES:
        np.testing.assert_array_equal(again[name], first[name], err_msg=name)
    planned = first["actions"][:, WARMUP_STEPS:]
    assert planned.std() > 0 and not np.array_equal(planned[0], planned[1])
    assert not np.any(first["actions"][:, :WARMUP_STEPS])  # the planner's warm-up holds still (its default)
    assert_replays(paths[0])


def test_a_file_that_is_no_planner_is_refused_in_one_line(imagination_run: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "settings.json"
    foreign.write_text('{"horizon": 3}')
    assert_refused(run_collector(tmp_path / "out", *cli_options(foreign, imagination_run)), "not a planner file")


def test_part_replays_through_the_simulator(reference: Path) -> None:
    assert_replays(storage.dataset_path(reference, TASK, "train", PART))


def test_same_seed_same_part_other_seed_or_noise_other_part(
    reference: Path, tiny_dataset: Path, agent: Path, imagination_run: Path, tmp_path: Path
) -> None:
    expected = arrays(storage.dataset_path(reference, TASK, "train", PART))
    again = arrays(collect_part(dataset_copy(tiny_dataset, tmp_path / "again"), agent, imagination_run))
    for name in storage.DATASET_NAMES:
        np.testing.assert_array_equal(again[name], expected[name], err_msg=name)
    other_seed = arrays(collect_part(dataset_copy(tiny_dataset, tmp_path / "seed"), agent, imagination_run, seed=6))
    assert not np.array_equal(other_seed["actions"], expected["actions"])
    assert not set(other_seed["episode_seeds"]) & set(expected["episode_seeds"])
    # Another noise, same seeds: the same starts and warm-up, other actions once the agent acts.
    quiet = arrays(collect_part(dataset_copy(tiny_dataset, tmp_path / "noise"), agent, imagination_run, noise=0.0))
    np.testing.assert_array_equal(quiet["episode_seeds"], expected["episode_seeds"])
    np.testing.assert_array_equal(quiet["actions"][:, :WARMUP_STEPS], expected["actions"][:, :WARMUP_STEPS])
    assert not np.array_equal(quiet["actions"][:, WARMUP_STEPS:], expected["actions"][:, WARMUP_STEPS:])


# --------------------------------------------------------------------------------------------------
# Readers take the part in


def test_readers_include_the_part(reference: Path, imagination_run: Path) -> None:
    from worldmodel.checkpoint import load_world_model
    from worldmodel.data import WindowDataset
    from worldmodel.training import detect_split

    main_episodes = storage.read_info(storage.dataset_path(reference, TASK, "train")).num_episodes
    files = storage.dataset_files(reference, TASK, "train")
    assert [path.name for path in files] == [f"{TASK}_train.h5", f"{TASK}_train.{PART}.h5"]
    total = main_episodes + EPISODES
    windows = WindowDataset(reference, TASK, "train", length=STEPS, stride=STEPS)  # one window per episode
    assert len(windows) == total
    assert [int(windows[i].episode) for i in range(total)] == list(range(total))
    part_actions = arrays(files[1])["actions"]
    np.testing.assert_array_equal(windows[main_episodes].actions[:, :1].numpy(), part_actions[0])
    windows.close()
    model = load_world_model(imagination_run, "cpu").model
    cache = detect_split(model, reference, [TASK], "train", model_device(model), "fp32")
    assert len(cache.episode_lengths) == total and (cache.episode_lengths == STEPS).all()
    np.testing.assert_array_equal(cache.actions[cache.episode_starts[main_episodes]][:1].numpy(), part_actions[0, 0])


def model_device(model: object) -> object:
    import torch

    assert isinstance(model, torch.nn.Module)
    return next(model.parameters()).device


def test_readers_refuse_a_part_of_other_settings(reference: Path, tmp_path: Path) -> None:
    from worldmodel.data import WindowDataset

    folder = tmp_path / "data"
    shutil.copytree(reference, folder)
    with h5py.File(storage.dataset_path(folder, TASK, "train", PART), "r+") as file:
        file.attrs["render_fast_render"] = False  # as if rendered with full-quality shadows
    with pytest.raises(InputError, match=rf"part .*{PART}.*render_fast_render=False") as error:
        WindowDataset(folder, TASK, "train", length=8)
    assert "\n" not in str(error.value)
    (folder / f"{TASK}_train.agent.r2.h5").write_bytes(b"")
    with pytest.raises(InputError, match="not a valid part name"):
        storage.dataset_files(folder, TASK, "train")


# --------------------------------------------------------------------------------------------------
# Refusals, resume, and random collection untouched


def test_other_settings_are_refused_in_one_line(reference: Path, agent: Path, imagination_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    shutil.copytree(reference, folder)
    before = snapshot(folder)
    options = cli_options(agent, imagination_run)
    noise_at = options.index("--noise") + 1
    other_noise = [*options[:noise_at], "0.1", *options[noise_at + 1 :]]
    assert_refused(run_collector(folder, *other_noise), f"{TASK}_train.{PART}.h5", "noise=0.3", "noise=0.1")
    assert_refused(run_collector(folder, *options, "--no-fast-render"), "render_fast_render=False", "main file")
    assert_refused(run_collector(folder, *options[:-2], "--part", "bad.name"), "part name 'bad.name'")
    assert_refused(run_collector(tmp_path / "empty", *options), "does not exist", "collect the main files first")
    assert_refused(run_collector(folder, "--domains", TASK, "--noise", "0.3"), "go with --policy")
    assert_refused(run_collector(folder, *options, "--test-episodes", "-1"), "--test-episodes must be >= 0")
    assert_refused(run_collector(folder, *options, "--domains", "all"), "--policy acts in one task")
    assert snapshot(folder) == before
    # A rerun with the same settings has nothing to do; a new part name is fine (checked in the resume test).
    assert run_collector(folder, *options).returncode == 0
    assert snapshot(folder) == before


def test_killed_collection_resumes_to_the_same_part(
    reference: Path, tiny_dataset: Path, agent: Path, imagination_run: Path, tmp_path: Path
) -> None:
    folder = dataset_copy(tiny_dataset, tmp_path / "data")
    command = [sys.executable, str(COLLECTOR), "--out", str(folder), *cli_options(agent, imagination_run)]
    process = start(command, REPO_ROOT)
    try:
        assert wait_for(lambda: any((folder / ".partial").glob("*/episode_00000.h5")), process), "collector failed"
    finally:
        kill_tree(process)
    part = storage.dataset_path(folder, TASK, "train", PART)
    assert not part.exists()
    result = run_collector(folder, *cli_options(agent, imagination_run))
    assert result.returncode == 0, result.stderr
    expected = arrays(storage.dataset_path(reference, TASK, "train", PART))
    for name, values in arrays(part).items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)
    assert not (folder / ".partial").exists()


def test_random_collection_does_not_load_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from collect import dmcs; "
        f"code = dmcs.main(['--out', {str(tmp_path / 'data')!r}, '--domains', 'cartpole', '--train-episodes', '1', "
        "'--test-episodes', '1', '--episode-steps', '10', '--workers', '1']); "
        "assert code == 0, code; assert 'torch' not in sys.modules and 'stable_baselines3' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [path.name for path in sorted((tmp_path / "data").glob("*.h5"))] == ["cartpole_test.h5", "cartpole_train.h5"]


def test_keypoint_cache_of_other_files_is_not_used(reference: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """A cache detected before a part was added (or taken from another run with --vision-from) is stale."""
    import torch

    from worldmodel.keypoint_cache import KeypointSplit, data_layout, load_keypoint_cache, save_keypoint_cache

    split = KeypointSplit.from_episodes([torch.zeros(STEPS, 2, 3)], [torch.zeros(STEPS, 6)], [STEPS], [1])
    with_part, without = data_layout(reference, [TASK]), data_layout(tiny_dataset, [TASK])
    assert [name for name, *_ in with_part["train"]] == [f"{TASK}_train.h5", f"{TASK}_train.{PART}.h5"]
    assert with_part["train"][1][1:] == [EPISODES, STEPS] and with_part["test"] == without["test"]
    path = tmp_path / "keypoints.pt"
    save_keypoint_cache(path, {"train": split}, "vision", without)
    assert load_keypoint_cache(path, "vision", without) is not None
    assert load_keypoint_cache(path, "vision", with_part) is None
    save_keypoint_cache(path, {"train": split}, "vision")  # as older versions wrote it: no layout
    assert load_keypoint_cache(path, "vision", without) is not None and load_keypoint_cache(path, "vision") is not None
    assert load_keypoint_cache(path, "vision", with_part) is None
