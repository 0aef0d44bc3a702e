"""The trainer: schedules, sampling, training steps, determinism, resume, DDP, the script end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tqdm.auto import tqdm

from train.world_model import main
from worldmodel.checkpoint import load_checkpoint, load_world_model
from worldmodel.config import VARIANTS, ModelConfig
from worldmodel.data import WindowDataset
from worldmodel.model import Losses, Schedule, WorldModel
from worldmodel.precision import Compute
from worldmodel import compilation, dynamics_core, train_config, training
from worldmodel.train_config import Stage, TrainConfig, paper_profile
from worldmodel.training import kl_scale_at, learning_rate_at, schedule_at, teacher_forcing_at

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train" / "world_model.py"
CPU = torch.device("cpu")
BF16_CPU = Compute("cpu", "bf16", channels_last=True, reason="the tests' choice")
# Values that legitimately differ between otherwise identical runs.
TIMING_FIELDS = {"time", "steps_per_s", "frames_per_s", "seconds"}


# ---- schedules ------------------------------------------------------------------------------------
def test_paper_schedules_known_answers() -> None:
    config = paper_profile()
    total = config.steps  # 1e5
    assert [kl_scale_at(step, total, config) for step in (0, 12_500, 25_000, 50_000, total)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert teacher_forcing_at(0, total, config) == (1.0, 1.0)
    assert teacher_forcing_at(50_000, total, config) == pytest.approx((0.5, 0.75))
    assert teacher_forcing_at(total, total, config) == pytest.approx((0.0, 0.5))
    rates = [learning_rate_at(step, total, config) for step in (0, 29_999, 30_000, 60_000, 90_000, 99_999)]
    assert rates == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4, 1.25e-4])
    schedule = schedule_at(50_000, total, config, Stage.JOINT)
    assert (schedule.kl_scale, schedule.teacher_forcing_observed, schedule.teacher_forcing_predicted) == pytest.approx(
        (1.0, 0.5, 0.75)
    )


def test_schedules_scale_with_short_runs() -> None:
    config = TrainConfig(dynamics_steps=1_000)
    assert kl_scale_at(125, 1_000, config) == pytest.approx(0.5)
    assert kl_scale_at(250, 1_000, config) == 1.0
    assert learning_rate_at(299, 1_000, config) == 1e-3
    assert learning_rate_at(300, 1_000, config) == 5e-4
    assert teacher_forcing_at(500, 1_000, config) == pytest.approx((0.5, 0.75))
    # Amplitude warm-up against keypoint collapse: fixed amplitude -> mu-scaled maps over the first 10%.
    warmup = TrainConfig(net=ModelConfig.cpu(initial_amplitude_mix=0.0, amplitude_warmup=0.1))
    assert [schedule_at(step, 1_000, warmup, Stage.VISION).amplitude_mix for step in (0, 50, 100, 900)] == [0.0, 0.5, 1.0, 1.0]
    assert schedule_at(10, 1_000, warmup, Stage.DYNAMICS).amplitude_mix is None  # left where the vision stage put it
    assert schedule_at(50, 1_000, warmup, Stage.JOINT) == Schedule(0.2, 0.95, 0.975, amplitude_mix=0.5)


# ---- stages and the training state -------------------------------------------------------------------
def test_observed_steps_of_each_stage() -> None:
    config = TrainConfig(num_observed=8, num_predicted=4, vision_window=6)
    assert [config.observed_steps(stage) for stage in (Stage.JOINT, Stage.VISION, Stage.DYNAMICS)] == [8, 6, 8]
    assert config.window == 12


def test_stages_know_their_steps_and_global_offsets() -> None:
    staged = TrainConfig(mode="staged", vision_steps=30, dynamics_steps=50)
    assert Stage.order(staged) == (Stage.VISION, Stage.KEYPOINTS, Stage.DYNAMICS, Stage.DONE)
    assert [stage.steps(staged) for stage in Stage.order(staged)] == [30, 0, 50, 0]
    assert [stage.offset(staged) for stage in Stage.order(staged)] == [0, 30, 30, 80]
    joint = TrainConfig(mode="joint", steps=70)
    assert [(stage.steps(joint), stage.offset(joint)) for stage in Stage.order(joint)] == [(70, 0), (0, 70)]
    assert Stage.JOINT.following(joint) == Stage.DONE and Stage.VISION.following(staged) == Stage.KEYPOINTS
    assert training.TrainState.first(dataclasses.replace(staged, vision_from=Path("run"))).stage == Stage.KEYPOINTS


def test_training_state_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    config = TrainConfig(mode="staged", vision_steps=30, dynamics_steps=50)
    state = training.TrainState(Stage.DYNAMICS, step=7, stage_seconds={"vision": 12.5, "keypoints": 1.0},
                       final_losses={"vision": {"total": 0.5}}, last_eval={"psnr": 20.0, "seconds": 0.1})  # fmt: skip
    assert state.global_step(config) == 37
    torch.save(state.to_dict(), tmp_path / "state.pt")
    assert training.TrainState.from_dict(torch.load(tmp_path / "state.pt", weights_only=True)) == state
    state.advance(config)
    assert (state.stage, state.step, state.global_step(config)) == (Stage.DONE, 0, 80)


def twin_models() -> tuple[TrainConfig, Compute, list[WorldModel]]:
    """A staged config (lr 1e-3), fp32 CPU compute, and two smoke models with the same weights."""
    config = TrainConfig(mode="staged", learning_rate=1e-3)
    compute = Compute("cpu", "fp32", channels_last=False, reason="the test's choice")
    models = [WorldModel(ModelConfig.smoke()) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    return config, compute, models


def test_the_trainers_adam_is_fused_on_cpu_and_makes_adams_first_step() -> None:
    config, compute, models = twin_models()
    fused = training.StageOptimizer.for_stage(models[0], Stage.DYNAMICS, config, compute)
    plain = training.StageOptimizer.for_stage(models[1], Stage.DYNAMICS, config, compute, fused=False)
    assert fused.optimizer.defaults["fused"] and not plain.optimizer.defaults["fused"]
    before = [p.detach().clone() for p in fused.parameters]
    for parameter, twin in zip(fused.parameters, plain.parameters):
        # |g| >= 5e-3 >> eps: Adam's first step is lr * sign(g) (to 1e-6 relative)
        gradient = torch.randn_like(parameter).sign() * (0.5 + torch.rand_like(parameter)) * 1e-2
        parameter.grad, twin.grad = gradient, gradient.clone()
    fused.optimizer.step()
    plain.optimizer.step()
    for start, parameter, twin in zip(before, fused.parameters, plain.parameters):
        assert torch.allclose(parameter - start, -1e-3 * parameter.grad.sign(), atol=1e-6)
        assert torch.allclose(parameter, twin, atol=1e-7)


def test_a_checkpoint_of_the_per_tensor_adam_resumes_with_the_fused_kernel() -> None:
    config, compute, models = twin_models()
    old = training.StageOptimizer.for_stage(models[0], Stage.DYNAMICS, config, compute, fused=False)
    for parameter in old.parameters:  # one step, so that the checkpoint holds moments and a step count
        parameter.grad = torch.full_like(parameter, 1e-2)
    old.optimizer.step()
    models[1].load_state_dict(models[0].state_dict())
    resumed = training.StageOptimizer.for_stage(models[1], Stage.DYNAMICS, config, compute)
    saved = copy.deepcopy(old.optimizer.state_dict())  # as from a file: no tensors shared with the old optimizer
    resumed.restore({"optimizer": saved, "extra": {}})
    assert all(group["fused"] for group in resumed.optimizer.param_groups)
    for optimizer in (old, resumed):  # the second step continues the first one's moments in both
        for parameter in optimizer.parameters:
            parameter.grad = torch.full_like(parameter, -1e-2)
        optimizer.optimizer.step()
    for parameter, twin in zip(old.parameters, resumed.parameters):
        assert torch.allclose(parameter, twin, atol=1e-7)

# ---- sampling -------------------------------------------------------------------------------------
def test_batch_sampler_resumes_and_splits_across_ranks() -> None:
    stream = iter(training.ResumableBatchSampler(10, 4, seed=3))
    batches = [next(stream) for _ in range(6)]  # 24 draws over 10 items: crosses epochs
    resumed = iter(training.ResumableBatchSampler(10, 4, seed=3, start_step=4))
    assert [next(resumed) for _ in range(2)] == batches[4:]
    assert sorted(batches[0] + batches[1] + batches[2][:2]) == list(range(10))  # epoch 0 is a permutation
    ranks = [training.ResumableBatchSampler(10, 4, seed=3, rank=rank, world_size=2).batch_at(5) for rank in (0, 1)]
    assert ranks[0] + ranks[1] == batches[5]
    assert training.ResumableBatchSampler(10, 4, seed=4).batch_at(0) != batches[0]
    with pytest.raises(ValueError, match="divisible"):
        training.ResumableBatchSampler(10, 5, seed=3, world_size=2)


# ---- training steps on real frames -----------------------------------------------------------------
def real_batch(tiny_dataset: Path, length: int = 16, count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = WindowDataset(tiny_dataset, "all", "train", length=length)
    step = len(dataset) // count
    windows = [dataset[index * step] for index in range(count)]  # spread over the tasks
    dataset.close()
    return torch.stack([w.frames for w in windows]), torch.stack([w.actions for w in windows])


def optimise(model: WorldModel, stage: Stage, steps: int, config: TrainConfig, batch: training.Batch) -> list[Losses]:
    optimizer = training.StageOptimizer.for_stage(model, stage, config, BF16_CPU)
    objective = training.Objective(model, stage, config.observed_steps(stage))
    history = []
    for step in range(steps):
        out = training.train_step(objective, optimizer, batch, schedule_at(step, steps, config, stage), BF16_CPU)
        history.append(out.losses)
    return history


def test_training_lowers_image_and_keypoint_losses(tiny_dataset: Path) -> None:
    frames, actions = real_batch(tiny_dataset)
    config = TrainConfig(net=ModelConfig.smoke())
    torch.manual_seed(0)
    model = WorldModel(config.model_config).to(memory_format=torch.channels_last)
    history = optimise(model, Stage.JOINT, 40, config, training.Batch(frames, actions))

    def mean(name: str, part: slice) -> float:
        return sum(float(getattr(losses, name)) for losses in history[part]) / len(history[part])

    assert all(torch.isfinite(losses.total) for losses in history)
    # The reconstructor starts as "copy the first frame" (zero-initialised output); it must beat that.
    assert mean("image", slice(-3, None)) < 0.95 * mean("image", slice(0, 3))
    assert mean("keypoint", slice(-3, None)) < mean("keypoint", slice(0, 3))
    assert mean("future", slice(-3, None)) < mean("future", slice(0, 3))


def test_no_gradient_from_the_dynamics_reaches_the_detector(tiny_dataset: Path) -> None:
    frames, actions = real_batch(tiny_dataset, count=2)
    torch.manual_seed(0)
    model = WorldModel(ModelConfig.smoke())
    config = TrainConfig()
    losses, _ = model.joint_losses(frames, actions, config.observed_steps(Stage.JOINT), schedule_at(0, 10, config, Stage.JOINT))
    dynamics_loss = losses.keypoint + losses.kl + losses.future
    detector = list(model.detector.parameters())  # type: ignore[union-attr]
    gradients = torch.autograd.grad(dynamics_loss, detector, allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in gradients)
    assert any(p.grad is None for p in detector)  # (nothing accumulated either)
    dynamics_gradients = torch.autograd.grad(dynamics_loss, list(model.dynamics.parameters()), allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 0 for g in dynamics_gradients)


def test_keypoint_detection_counts_episodes_on_its_progress_bar(
    tiny_dataset: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Detecting every frame takes minutes on the full dataset: the bar counts episodes, and stays off when
    asked (the smoke profile, and every rank but 0)."""

    class Shown(tqdm):  # a bar left to tqdm is shown whatever TQDM_DISABLE says here (the script test checks that)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("disable", False)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(training, "tqdm", Shown)
    model = WorldModel(ModelConfig.smoke()).eval()
    tasks = ["cartpole", "reacher"]  # one test episode each in the tiny dataset
    split = training.detect_split(model, tiny_dataset, tasks, "test", torch.device("cpu"), "fp32", progress=True)
    shown = capsys.readouterr().err
    assert "keypoints (test)" in shown and "2/2" in shown
    assert split.keypoints.shape[0] == int(split.episode_lengths.sum()) and len(split.task_ids) == 2
    training.detect_split(model, tiny_dataset, tasks, "test", torch.device("cpu"), "fp32", progress=False)
    assert "keypoints" not in capsys.readouterr().err


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_through_the_training_code(variant: str, tiny_dataset: Path) -> None:
    frames, actions = real_batch(tiny_dataset, count=2)
    config = TrainConfig(model=variant, net=ModelConfig.smoke())  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = WorldModel(config.model_config).to(memory_format=torch.channels_last)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    joint = optimise(model, Stage.JOINT, 1, config, training.Batch(frames, actions))[0]
    keypoints = model.detect(frames)
    dynamics = optimise(model, Stage.DYNAMICS, 1, config, training.Batch(keypoints, actions))[0]
    assert torch.isfinite(joint.total) and torch.isfinite(dynamics.total)
    assert (float(joint.kl) > 0) == (variant != "struct-rnn")  # struct-rnn has no latent, hence no KL
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert any(name.startswith("dynamics.") for name in changed)
    assert any(name.startswith("reconstructor.") for name in changed)


# ---- the script ------------------------------------------------------------------------------------
def smoke_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--profile", "smoke", "--data", str(data), "--out", str(out), "--log-every", "1",
            "--eval-every", "100", *extra]  # fmt: skip


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {key: value for key, value in record.items() if key not in TIMING_FIELDS}
        for record in map(json.loads, lines)
        if record["kind"] == kind
    ]


@pytest.fixture(scope="module")
def reference_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted smoke run (staged: 6 vision + 6 dynamics steps), every step logged."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(smoke_args(tiny_dataset, out)) == 0
    return out


def test_same_seed_gives_the_same_losses(reference_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    assert main(smoke_args(tiny_dataset, tmp_path / "again")) == 0
    expected = records(reference_run, "train")
    assert len(expected) == 12 and {r["stage"] for r in expected} == {"vision", "dynamics"}
    assert records(tmp_path / "again", "train") == expected
    assert records(tmp_path / "again", "eval") == records(reference_run, "eval")
    assert main(smoke_args(tiny_dataset, tmp_path / "other", "--seed", "2")) == 0
    assert records(tmp_path / "other", "train")[0]["total"] != expected[0]["total"]


def test_resume_continues_with_the_same_losses(reference_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(smoke_args(tiny_dataset, out, "--halt-after", "3")) == 0  # killed mid vision stage
    checkpoint = load_checkpoint(out)
    assert (checkpoint["stage"], checkpoint["step"], checkpoint["complete"]) == ("vision", 3, False)
    assert main(smoke_args(tiny_dataset, out, "--resume", "--learning-rate", "0.01")) == 2  # other config
    assert main(smoke_args(tiny_dataset, out, "--resume", "--halt-after", "5")) == 0  # now mid dynamics
    assert (load_checkpoint(out)["stage"], load_checkpoint(out)["step"]) == ("dynamics", 2)
    (out / "keypoints.pt").unlink()  # a lost cache is rebuilt: detection is deterministic
    assert main(smoke_args(tiny_dataset, out, "--resume")) == 0
    assert records(out, "train") == records(reference_run, "train")
    assert records(out, "eval") == records(reference_run, "eval")
    assert load_checkpoint(out)["complete"]


def test_script_end_to_end_writes_a_loadable_model(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *smoke_args(tiny_dataset, out, "--eval-every", "4", "--progress")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # --progress asks for bars, and TQDM_DISABLE=1 hides every one of them
    assert "episode/s" not in result.stderr and "step/s" not in result.stderr
    for name in ("checkpoint.pt", "metrics.jsonl", "keypoints.png", "prediction.gif", "summary.json", "keypoints.pt"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    assert len(list((out / "pictures").glob("*.png"))) == 4  # steps 4 and 6 of each stage
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and set(summary["stage_seconds"]) == {"vision", "keypoints", "dynamics"}
    for name in ("keypoint_mse_best", "keypoint_distance_best", "psnr", "ssim"):
        assert isinstance(summary["final_eval"][name], float)
    benchmark = summary["dynamics_benchmark"]  # open loop on the cached test keypoints
    assert set(benchmark["ratio_to_hold_last"]) == {"single", "mean_of_n", "best_of_n", "hold_last", "constant_velocity"}
    assert benchmark["ratio_to_hold_last"]["hold_last"] == 1.0 and len(benchmark["per_horizon"]["single"]) == 8
    assert set(benchmark["jump_free_ratio_to_hold_last"]) == {"single", "mean_of_n", "best_of_n", "tracks_kept", "jump_floor"}
    assert 0.0 <= benchmark["jump_free_ratio_to_hold_last"]["jump_floor"] <= 1.0
    assert "->" in summary["compute"]
    assert summary["heap"].startswith("heap: freed memory kept in the process (glibc")  # the default, on glibc
    evals = records(out, "eval")
    assert [(r["stage"], r["step"]) for r in evals] == [("vision", 4), ("vision", 6), ("dynamics", 4), ("dynamics", 6)]
    model, config, info = load_world_model(out, "cpu")
    assert info.complete and config == ModelConfig.smoke() and info.dataset["action_repeats"]["cartpole"] == 8
    assert float(model.normalizer.std.min()) >= config.keypoint_std_floor  # staged mode fitted it


def test_torchrun_two_processes(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
               *smoke_args(tiny_dataset, out, "--mode", "joint", "--steps", "4")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # rank 0 alone writes the log
    assert all(r["total"] == r["total"] for r in train)  # finite, not NaN
    assert load_checkpoint(out)["complete"]


def test_channels_last_model_trains_under_ddp_without_a_gradient_layout_warning(tmp_path: Path) -> None:
    """The prepared (channels_last) model's 1x1 kernels keep plain strides, so DistributedDataParallel's gradient
    buckets match its gradients: no "Grad strides do not match bucket view strides" on every torchrun start."""
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    config = train_config.profile_config("smoke")
    compute = Compute("cpu", "fp32", channels_last=True, reason="the tests' choice")
    model = compute.prepare(WorldModel(config.model_config))
    one_by_one = [p for p in model.parameters() if p.dim() == 4 and p.shape[-2:] == (1, 1)]
    assert one_by_one and all(p.stride() == torch.empty(p.shape).stride() for p in one_by_one)
    stage = Stage.VISION
    optimizer = training.StageOptimizer.for_stage(model, stage, config, compute)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    objective = None
    try:
        objective = DistributedDataParallel(training.Objective(model, stage, config.observed_steps(stage)))
        frames = torch.randint(0, 256, (2, config.vision_window, 64, 64, 3), dtype=torch.uint8)
        batch = training.Batch(frames, torch.zeros(2, config.vision_window, 6))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            training.train_step(objective, optimizer, batch, schedule_at(1, 10, config, stage), compute)
    finally:
        # DDP's reducer holds the gloo group: drop it while the group exists (as the trainer does, whose stage
        # returns before distributed.cleanup). Freed after destroy_process_group, the group's destructor hung
        # once in a full suite run, in pthread_mutex_lock (py-spy, 2026-12-05).
        objective = None
        dist.destroy_process_group()
    assert [str(w.message) for w in caught if "strides" in str(w.message)] == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_under_torchrun_rank_0_alone_detects_the_keypoints_with_every_core(
    reference_run: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keypoint stage of a staged torchrun run: rank 0 detects (with all the machine's cores while the others
    wait) and caches; another rank reads that cache and never detects, and without it says so in one line."""
    import train.world_model as trainer

    config, tasks = trainer.prepare(trainer.parse_config(smoke_args(tiny_dataset, tmp_path / "run")))
    config.out.mkdir(parents=True)
    model = WorldModel(config.model_config)
    model.load_state_dict(load_checkpoint(reference_run)["model"])  # the vision weights of a finished run
    detecting_threads: list[int] = []
    real_detect = trainer.detect_split

    def spy(*args: Any, **kwargs: Any) -> Any:
        detecting_threads.append(torch.get_num_threads())
        return real_detect(*args, **kwargs)

    monkeypatch.setattr(trainer, "detect_split", spy)
    monkeypatch.setattr(trainer.distributed, "barrier", lambda: None)  # one process plays each rank in turn

    def run_as(rank: int) -> trainer.Run:
        dist = trainer.distributed.DistInfo(rank, 2, rank, 2, CPU)
        logger = trainer.RunLogger(config.out, rank == 0, None)
        return trainer.Run(config, tasks, dist, Compute("cpu", "fp32", True, "test"), model, logger, None, {})

    state = training.TrainState.first(config)
    with pytest.raises(trainer.InputError, match="shared file system"):  # rank 1 before rank 0 cached them
        trainer.keypoint_splits(run_as(1), state)
    assert detecting_threads == []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun's share of the cores per process
    try:
        ours = trainer.keypoint_splits(run_as(0), state)
        assert detecting_threads == [2, 2] and torch.get_num_threads() == 1  # one call per split, then restored
        theirs = trainer.keypoint_splits(run_as(1), state)
    finally:
        torch.set_num_threads(threads)
    assert len(detecting_threads) == 2  # rank 1 read the cache
    for split, keypoints in ours.items():
        assert torch.equal(keypoints.keypoints, theirs[split].keypoints)


# ---- bad input --------------------------------------------------------------------------------------
def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_missing_data_and_unknown_variant_exit_2(tmp_path: Path) -> None:
    missing = run_script("--profile", "smoke", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"))
    assert missing.returncode == 2
    assert "collect/dmcs.py" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    assert run_script("--profile", "smoke", "--model", "transformer").returncode == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vision-steps", "0"], "positive"),
        (["--batch-size", "-1"], "positive"),
        (["--net.variant", "cnn-vrnn"], "--model"),
        (["--precision", "fp16", "--device", "cpu"], "fp16"),
        (["--tasks", "pong"], "unknown task"),
        (["--resume"], "no checkpoint"),
    ],
)
def test_bad_options_exit_2(
    extra: list[str], message: str, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(smoke_args(tiny_dataset, tmp_path / "run", *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_compile_dynamics_on_without_a_cpp_compiler_exits_2(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(compilation, "cxx_compiler", lambda: None)
    assert main(smoke_args(tiny_dataset, tmp_path / "run", "--compile-dynamics", "on")) == 2
    error = capsys.readouterr().err.strip()
    assert "needs a C++ compiler" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_compile_that_fails_on_the_first_dynamics_step_leaves_the_run_uncompiled_and_unchanged(
    reference_run: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A C++ toolchain torch.compile cannot use fails inside the first compiled step: the trainer says so in one
    line, puts the random state back and trains uncompiled, so the run is the uncompiled reference run."""
    calls: list[int] = []

    def broken_compile(core: object) -> object:
        calls.append(1)
        raise RuntimeError("C++ compile error: cannot find Python.h\n(and 200 more lines)")

    monkeypatch.setattr(compilation, "cxx_compiler", lambda: "g++")
    monkeypatch.setattr(dynamics_core, "compiled_loop", broken_compile)
    out = tmp_path / "run"
    assert main(smoke_args(tiny_dataset, out, "--compile-dynamics", "on")) == 0
    assert len(calls) == 1  # tried once, then never again
    error = capsys.readouterr().err
    assert "torch.compile of the dynamics failed (RuntimeError: C++ compile error: cannot find Python.h)" in error
    assert records(out, "train") == records(reference_run, "train")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dynamics_compile"].startswith("dynamics compiled")  # the plan; the log above says what happened
    assert json.loads((reference_run / "summary.json").read_text())["dynamics_compile"].startswith("dynamics uncompiled")


def test_a_finished_run_is_never_rewritten(reference_run: Path, tiny_dataset: Path) -> None:
    before = {path: path.read_bytes() for path in reference_run.rglob("*") if path.is_file()}
    assert main(smoke_args(tiny_dataset, reference_run)) == 0  # the same command again: nothing to do
    assert main(smoke_args(tiny_dataset, reference_run, "--resume")) == 0
    assert main(smoke_args(tiny_dataset, reference_run, "--seed", "5")) == 2  # other options: refused
    assert main(smoke_args(tiny_dataset, reference_run, "--seed", "5", "--resume")) == 2
    assert {path: path.read_bytes() for path in reference_run.rglob("*") if path.is_file()} == before


def test_vision_from_a_finished_run_trains_only_a_new_dynamics_core(
    reference_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "srvp"
    assert main(smoke_args(tiny_dataset, out, "--vision-from", str(reference_run), "--dynamics", "srvp")) == 0
    theirs, mine = load_checkpoint(reference_run)["model"], load_checkpoint(out)["model"]
    vision = [key for key in theirs if not key.startswith(("dynamics.", "normalizer."))]
    assert vision and all(torch.equal(theirs[key], mine[key]) for key in vision)  # the detector is theirs
    assert {record["stage"] for record in records(out, "train")} == {"dynamics"}  # no vision stage ran
    assert load_world_model(out, "cpu").config.dynamics == "srvp"
    assert (out / "keypoints.pt").read_bytes() == (reference_run / "keypoints.pt").read_bytes()

    other = smoke_args(tiny_dataset, tmp_path / "other", "--vision-from", str(reference_run), "--net.base-filters", "8")
    assert main(other) == 2  # another vision network
    scale = smoke_args(tiny_dataset, tmp_path / "scale", "--vision-from", str(reference_run), "--net.heatmap-logit-scale", "3")
    assert main(scale) == 2  # the same shapes, but the weights would detect other keypoints
    assert not (tmp_path / "scale" / "keypoints.pt").exists()
    assert main(smoke_args(tiny_dataset, tmp_path / "none", "--vision-from", str(tmp_path / "missing"))) == 2


def test_init_from_a_finished_run_fine_tunes_its_core_on_another_folder(
    reference_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """--init-from takes every weight, the keypoint normalisation included, and trains only the dynamics, on a
    folder of some of the run's tasks. With a vanishing learning rate the tuned core is the source's."""
    from worldmodel import storage

    data = tmp_path / "cartpole"  # another folder, one of the run's six tasks
    data.mkdir()
    for split in storage.SPLITS:
        (data / f"cartpole_{split}.h5").symlink_to(storage.dataset_path(tiny_dataset, "cartpole", split))
    tuned = smoke_args(data, tmp_path / "tuned", "--tasks", "cartpole", "--init-from", str(reference_run))
    assert main([*tuned, "--learning-rate", "1e-30"]) == 0
    theirs, mine = load_checkpoint(reference_run)["model"], load_checkpoint(tmp_path / "tuned")["model"]
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[key], mine[key]) for key in theirs)
    assert {record["stage"] for record in records(tmp_path / "tuned", "train")} == {"dynamics"}
    assert load_checkpoint(tmp_path / "tuned")["dataset"]["tasks"] == ["cartpole"]  # keypoints of its own data

    assert main(smoke_args(data, tmp_path / "moved", "--tasks", "cartpole", "--init-from", str(reference_run))) == 0
    moved = load_checkpoint(tmp_path / "moved")["model"]  # the default learning rate: the core moves, nothing else
    changed = {key for key in theirs if not torch.equal(theirs[key], moved[key])}
    assert changed and all(key.startswith("dynamics.") for key in changed)

    assert main([*tuned[:-2], "--init-from", str(tmp_path / "missing")]) == 2
    assert main([*smoke_args(data, tmp_path / "other", "--tasks", "cartpole", "--init-from", str(reference_run)),
                 "--net.base-filters", "8"]) == 2  # another network
    assert main([*smoke_args(data, tmp_path / "scale", "--tasks", "cartpole", "--init-from", str(reference_run)),
                 "--net.heatmap-logit-scale", "3"]) == 2  # the same weights would detect other keypoints
    assert main([*smoke_args(data, tmp_path / "both", "--tasks", "cartpole", "--init-from", str(reference_run)),
                 "--vision-from", str(reference_run)]) == 2


def test_a_checkpoint_from_before_new_options_still_resumes(reference_run: Path, tiny_dataset: Path) -> None:
    """Options added later (the dynamics core, --vision-from, ...) count as their defaults for old runs."""
    from worldmodel.train_config import config_differences, profile_config

    saved = load_checkpoint(reference_run)["train_config"]
    for name in ("dynamics", "vision_from", "init_from"):
        del saved[name]
    for name in ("dynamics", "srvp_units", "residual_keypoints", "hvrnn_levels"):
        del saved["net"][name]
    config = dataclasses.replace(profile_config("smoke"), data=tiny_dataset, out=reference_run, log_every=1, eval_every=100)
    assert config_differences(saved, config) == []
    assert config_differences(saved, dataclasses.replace(config, dynamics="srvp")) == ["dynamics"]


@pytest.mark.parametrize("halt_after", [3, 8])  # mid vision stage (no evaluation yet); mid dynamics stage
def test_a_checkpoint_in_the_layout_of_earlier_versions_resumes(
    halt_after: int, reference_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """The checkpoint layout every earlier version of the trainer wrote (format 1: the training state's stage,
    step, global step and completeness at the top, its timings, last losses and evaluation under "extra"
    beside the gradient scaler's state), built here key by key: a run saved so continues exactly."""
    out = tmp_path / "run"
    assert main(smoke_args(tiny_dataset, out, "--halt-after", str(halt_after))) == 0
    saved = load_checkpoint(out)
    earlier = {
        "format": 1, "version": "0.1.0", "model": saved["model"], "model_config": saved["model_config"],
        "train_config": saved["train_config"], "dataset": saved["dataset"], "stage": saved["stage"],
        "step": saved["step"], "global_step": saved["global_step"], "optimizer": saved["optimizer"],
        "rng": saved["rng_ranks"][0], "rng_ranks": saved["rng_ranks"], "complete": False,
        "extra": {"scaler": None, "stage_seconds": dict(saved["extra"]["stage_seconds"]),
                  "final_losses": dict(saved["extra"]["final_losses"]), "last_eval": dict(saved["extra"]["last_eval"])},
    }  # fmt: skip
    assert (earlier["stage"], earlier["step"]) == (("vision", 3) if halt_after == 3 else ("dynamics", 2))
    assert bool(earlier["extra"]["last_eval"]) == (halt_after == 8)  # the vision stage's final evaluation
    torch.save(earlier, out / "checkpoint.pt")
    assert main(smoke_args(tiny_dataset, out, "--resume")) == 0
    assert records(out, "train") == records(reference_run, "train")
    assert records(out, "eval") == records(reference_run, "eval")
    assert_same_weights(load_checkpoint(out)["model"], load_checkpoint(reference_run)["model"])
    summaries = [json.loads((run / "summary.json").read_text()) for run in (out, reference_run)]
    assert summaries[0]["final_losses"] == summaries[1]["final_losses"]
    assert set(summaries[0]["stage_seconds"]) == {"vision", "keypoints", "dynamics"}


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def test_quick_profile_has_the_cpu_detector_and_smaller_dynamics() -> None:
    """The quick profile is the cpu profile's detector with the smaller, 2x faster dynamics: a quick run's
    vision weights load into a cpu-profile model as they are (``--vision-from``), only the dynamics differ."""
    from worldmodel.model import vision_modules

    cpu, quick = train_config.cpu_profile().net, train_config.quick_profile().net
    torch.manual_seed(0)
    cpu_model, quick_model = WorldModel(cpu), WorldModel(quick)
    for cpu_part, quick_part in zip(vision_modules(cpu_model), vision_modules(quick_model), strict=True):
        cpu_part.load_state_dict(quick_part.state_dict())  # same shapes, same detector settings
    assert (cpu.heatmap_logit_scale, cpu.acceleration_weight) == (quick.heatmap_logit_scale, quick.acceleration_weight)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(quick_model.dynamics) < count(cpu_model.dynamics) / 2
