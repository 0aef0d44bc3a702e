"""The precision decision (worldmodel/precision.py): known answers for both answers of the capability check,
and, through the public entry points, that nothing computes in bf16 on a CPU without native bf16."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import envs  # noqa: F401  (registers the ids)
from envs.imagination_models import load_imagination_models
from envs.real import RealPixelEnv
from envs.through_model import RealTaskThroughModel
from train.world_model import main as train_main
from worldmodel import precision
from worldmodel.checkpoint import load_world_model
from worldmodel.config import ModelConfig
from worldmodel.fingerprint import model_fingerprint
from worldmodel.hidden_states import extract_window_features
from worldmodel.model import Schedule, WorldModel
from worldmodel.planning import CEMPlanner, PlannerConfig
from worldmodel.precision import Compute, CpuInfo, choose_compute
from worldmodel.reward import RewardPredictor, RewardTrainConfig, fit_reward_predictor, save_reward_predictor

AVX2 = CpuInfo(name="AMD EPYC 7B13", capability="AVX2", native_bf16=False)
AMX = CpuInfo(name="Intel Xeon", capability="AVX512", native_bf16=True, amx_bf16=True)
ZEN4 = CpuInfo(name="AMD EPYC 9B14", capability="AVX512", native_bf16=True)  # AVX512-BF16 without AMX


@pytest.fixture
def cpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_info", lambda: AVX2)


@pytest.fixture
def cpu_with_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_info", lambda: AMX)


def test_auto_is_fp32_without_native_bf16(cpu_without_bf16: None) -> None:
    assert choose_compute("cpu") == Compute(
        "cpu", "fp32", True, "cpu AMD EPYC 7B13 (AVX2), no native bf16 -> fp32, channels_last"
    )


def test_auto_is_bf16_with_native_bf16(cpu_with_bf16: None) -> None:
    assert choose_compute("cpu") == Compute("cpu", "bf16", True, "cpu Intel Xeon (AVX512), native bf16 -> bf16, channels_last")


def test_an_explicit_precision_wins(cpu_without_bf16: None) -> None:
    compute = choose_compute(torch.device("cpu"), "bf16", channels_last=False)
    assert (compute.precision, compute.channels_last) == ("bf16", False)
    assert compute.reason.endswith("-> bf16 (asked for), NCHW")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        choose_compute("cpu", "fp16")


def test_autocast_and_layout_follow_the_decision(cpu_without_bf16: None) -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    compute = choose_compute("cpu")
    with compute.autocast():
        assert conv(torch.zeros(1, 3, 8, 8)).dtype == torch.float32
    assert compute.prepare(conv).weight.is_contiguous(memory_format=torch.channels_last)
    bf16 = choose_compute("cpu", "bf16")
    with bf16.autocast():
        assert conv(torch.zeros(1, 3, 8, 8)).dtype == torch.bfloat16


def test_dynamics_training_follows_the_same_rule(cpu_without_bf16: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fp32 = choose_compute("cpu", dynamics_precision="auto")
    assert fp32.dynamics == "fp32" and fp32.reason.endswith("channels_last; dynamics trained in fp32")
    assert choose_compute("cpu").dynamics == "fp32" and "dynamics" not in choose_compute("cpu").reason  # inference
    asked = choose_compute("cpu", dynamics_precision="bf16")
    assert asked.dynamics == "bf16" and asked.reason.endswith("dynamics trained in bf16 (asked for)")
    with pytest.raises(ValueError, match="--dynamics-precision must be auto, fp32 or bf16"):
        choose_compute("cpu", dynamics_precision="fp16")  # type: ignore[arg-type]
    monkeypatch.setattr(precision, "cpu_info", lambda: ZEN4)
    assert choose_compute("cpu", dynamics_precision="auto", dynamics_width=512).dynamics == "bf16"
    assert choose_compute("cpu", dynamics_precision="auto", dynamics_width=256).dynamics == "bf16"
    narrow = choose_compute("cpu", dynamics_precision="auto", dynamics_width=128)  # srvp at the cpu sizes
    assert narrow.dynamics == "fp32" and narrow.reason.endswith("dynamics trained in fp32 (width 128 < 256: bf16 does not pay)")
    assert choose_compute("cpu", dynamics_precision="fp32", dynamics_width=512).dynamics == "fp32"
    # With AMX the training steps stay fp32 (and the convolutions bf16); planning's wide batches use bf16
    monkeypatch.setattr(precision, "cpu_info", lambda: AMX)
    amx = choose_compute("cpu", dynamics_precision="auto", dynamics_width=512)
    assert (amx.precision, amx.dynamics) == ("bf16", "fp32")
    assert amx.reason.endswith("dynamics trained in fp32 (AMX: training steps of 32 rows run faster in fp32)")
    assert choose_compute("cpu", dynamics_precision="auto", dynamics_width=512, dynamics_batch="planning").dynamics == "bf16"
    assert choose_compute("cpu", dynamics_precision="bf16", dynamics_width=512).dynamics == "bf16"  # asked for


def test_dynamics_compute_in_bf16_only_inside_a_bf16_training_step(spy: Bf16Spy) -> None:
    """The dynamics' products follow ``Compute.dynamics_training``; the outputs and losses stay float32, the
    gradients reach the float32 parameters, and the predictions stay close to the float32 ones."""
    torch.manual_seed(0)
    model = WorldModel(ModelConfig.smoke())
    g = torch.Generator().manual_seed(1)
    keypoints = torch.rand(4, 8, model.config.num_keypoints, 3, generator=g) * 2 - 1
    actions = torch.rand(4, 8, 6, generator=g) * 2 - 1

    def observe() -> Tensor:
        torch.manual_seed(2)
        return model.observe(keypoints, actions).keypoints

    with choose_compute("cpu", "bf16", dynamics_precision="fp32").autocast():  # the convs' autocast alone
        reference = observe()
    assert spy.operators == set()
    with choose_compute("cpu", "fp32", dynamics_precision="bf16").dynamics_training():
        in_bf16 = observe()
        losses = model.dynamics_losses(keypoints, actions, 4, Schedule())
    assert any("mm" in name for name in spy.operators)  # the GRU and MLP products
    assert in_bf16.dtype == torch.float32 and losses.total.dtype == torch.float32
    losses.total.backward()
    gradients = [p.grad for p in model.dynamics.parameters() if p.grad is not None]
    assert gradients and all(grad.dtype == torch.float32 and grad.isfinite().all() for grad in gradients)
    # bf16 keeps 8 bits of mantissa: the typical keypoint agrees with float32's to well under a percent (a few
    # can differ more: a near tie between best-of-many samples may be decided the other way)
    assert (in_bf16 - reference).abs().median() < 0.01 * reference.abs().mean()
    spy.operators.clear()
    observe()  # after the context: float32 again
    assert spy.operators == set()


def test_this_machine_is_described() -> None:
    info = precision.cpu_info()
    assert info.name and info.capability
    assert choose_compute("cpu").precision == ("bf16" if info.native_bf16 else "fp32")


# ---- through the entry points ------------------------------------------------------------------------


class Bf16Spy(TorchDispatchMode):
    """Records every operator that produces a bf16 tensor (after autocast has chosen the dtypes)."""

    def __init__(self) -> None:
        super().__init__()
        self.operators: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(isinstance(leaf, torch.Tensor) and leaf.dtype == torch.bfloat16 for leaf in tree_leaves(out)):
            self.operators.add(str(func))
        return out


@pytest.fixture
def spy() -> Iterator[Bf16Spy]:
    with Bf16Spy() as recorder:
        yield recorder


def smoke_training(data: Path, out: Path) -> list[str]:
    return ["--profile", "smoke", "--data", str(data), "--out", str(out), "--vision-steps", "2",
            "--dynamics-steps", "2", "--eval-every", "100", "--device", "cpu"]  # fmt: skip


def test_training_without_native_bf16_computes_nothing_in_bf16(
    cpu_without_bf16: None, tiny_dataset: Path, tmp_path: Path, spy: Bf16Spy
) -> None:
    assert train_main(smoke_training(tiny_dataset, tmp_path / "run")) == 0
    assert spy.operators == set()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["compute"] == "cpu AMD EPYC 7B13 (AVX2), no native bf16 -> fp32, channels_last; dynamics trained in fp32"


def test_training_with_native_bf16_uses_it(
    monkeypatch: pytest.MonkeyPatch, tiny_dataset: Path, tmp_path: Path, spy: Bf16Spy
) -> None:
    """The other answer, so that the spy above is known to see bf16 when there is some: the convs, and, on a
    CPU with AVX512-BF16 and no AMX, the dynamics too once their GRU is wide enough for bf16 to pay."""
    monkeypatch.setattr(precision, "cpu_info", lambda: ZEN4)
    assert train_main(smoke_training(tiny_dataset, tmp_path / "run")) == 0
    assert any("convolution" in name for name in spy.operators)
    assert not any("mm" in name for name in spy.operators)  # the smoke GRU (32) stays in fp32
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["compute"].endswith(
        "-> bf16, channels_last; dynamics trained in fp32 (width 32 < 256: bf16 does not pay)"
    )
    spy.operators.clear()
    assert train_main([*smoke_training(tiny_dataset, tmp_path / "wide"), "--net.rnn-size", "256"]) == 0
    assert any("mm" in name for name in spy.operators)
    assert json.loads((tmp_path / "wide" / "summary.json").read_text())["compute"].endswith("; dynamics trained in bf16")


def test_inference_without_native_bf16_computes_nothing_in_bf16(
    cpu_without_bf16: None, smoke_run: Path, tiny_dataset: Path, tmp_path: Path, spy: Bf16Spy
) -> None:
    """Hidden-state extraction (the reward experiment), an imagined env with rendering, and the real task
    seen through the model (the RL evaluation's env)."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    model = load_world_model(run, "cpu").model
    features = extract_window_features(model, tiny_dataset, "cartpole", num_sequences=4, batch_size=4)
    assert features.hidden.dtype == torch.float32
    fit = fit_reward_predictor(features.hidden, features.rewards, features.episodes, RewardTrainConfig(epochs=1, batch_size=4))
    save_reward_predictor(run / "reward_predictors" / "cartpole.pt", fit.predictor, "cartpole", model_fingerprint(model))

    env = gym.make("StructVRNN-Imagined-cartpole", checkpoint=run, render_mode="rgb_array")
    env.reset(seed=0)
    for _ in range(3):
        env.step(np.zeros(env.action_space.shape, np.float32))
    assert env.render() is not None
    env.close()
    through = RealTaskThroughModel(RealPixelEnv("cartpole"), load_imagination_models("cartpole", run, device="cpu"))
    through.reset(seed=0)
    through.step(np.zeros(through.action_space.shape, np.float32))
    through.close()
    assert spy.operators == set()


def test_a_cpu_limited_to_avx2_has_no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """How a bf16 CPU is made to run like an AVX2-only one (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)."""
    hardware = {"avx512_bf16": True, "amx_bf16": True}
    assert precision._native_bf16(hardware, "AVX512")
    assert not precision._native_bf16(hardware, "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not precision._native_bf16(hardware, "AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert precision._native_bf16(hardware, "AVX512") and precision._amx_bf16(hardware)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # AVX512-BF16 kept, AMX turned off
    assert precision._native_bf16(hardware, "AVX512") and not precision._amx_bf16(hardware)
    assert not precision._native_bf16({"avx512_bf16": False, "amx_bf16": False}, "AVX512")


def wide_or_narrow_planner(rnn_size: int, precision_setting: str = "auto") -> tuple[CEMPlanner, Any, Tensor]:
    """A planner on an untrained model whose GRU is ``rnn_size`` wide, with a reward head that is not zero."""
    torch.manual_seed(0)
    model = WorldModel(ModelConfig.smoke(rnn_size=rnn_size)).eval()
    predictor = RewardPredictor(model.dynamics.hidden_size).eval()
    torch.nn.init.normal_(predictor.dense_out.weight)
    config = PlannerConfig(candidates=32, elites=4, iterations=1, precision=precision_setting)  # type: ignore[arg-type]
    planner = CEMPlanner(model, predictor, 6, config, seed=0)
    return planner, model.dynamics.initial_carry(1, torch.device("cpu")), torch.zeros(8, model.dynamics.hidden_size)


def test_planning_without_native_bf16_computes_nothing_in_bf16(cpu_without_bf16: None, spy: Bf16Spy) -> None:
    planner, carry, context = wide_or_narrow_planner(256)
    assert planner.precision(torch.device("cpu")) == ("fp32", "cpu AMD EPYC 7B13 (AVX2), no native bf16 -> plans in fp32")
    assert np.isfinite(planner.plan(carry, context).action).all()
    assert spy.operators == set()


def test_planning_with_native_bf16_uses_it_where_the_core_is_wide(cpu_with_bf16: None, spy: Bf16Spy) -> None:
    """The width rule of the dynamics' training (not its AMX exception: planning's batches are wide): bf16
    products for a GRU of 256 on this AMX CPU, float32 for the smoke GRU (32) or when asked."""
    narrow, carry, context = wide_or_narrow_planner(32)
    assert narrow.precision(torch.device("cpu")).reason.endswith("plans in fp32 (width 32 < 256: bf16 does not pay)")
    narrow.plan(carry, context)
    explicit, carry, context = wide_or_narrow_planner(256, "fp32")
    explicit.plan(carry, context)
    assert spy.operators == set()
    wide, carry, context = wide_or_narrow_planner(256)
    assert wide.precision(torch.device("cpu")).dtype == "bf16"
    plan = wide.plan(carry, context)
    # the core's products: linear under inference mode (the planner's), addmm/mm where autograd decomposes it
    assert any("mm" in name or "linear" in name for name in spy.operators) and np.isfinite(plan.action).all()


def test_bf16_plans_score_their_candidates_as_float32_does() -> None:
    """Same draws, same candidates: the elites' mean imagined return agrees with float32's to a percent (bf16
    keeps 8 bits of mantissa), and the elites are mostly the same sequences."""
    plans = {}
    for setting in ("fp32", "bf16"):
        planner, carry, context = wide_or_narrow_planner(256, setting)
        plans[setting] = planner.plan(carry, context)
    fp32, bf16 = plans["fp32"].imagined_return, plans["bf16"].imagined_return
    assert fp32 != bf16 and abs(bf16 - fp32) < 0.01 * abs(fp32) + 1e-3
