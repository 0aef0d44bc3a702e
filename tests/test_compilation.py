"""When the dynamics stage runs through torch.compile (worldmodel/compilation.py), and that it computes the same."""

from __future__ import annotations

import logging

import pytest
import torch

from worldmodel import dynamics_core
from worldmodel.compilation import MIN_COMPILED_STEPS, cxx_compiler, decide_compile
from worldmodel.config import ModelConfig
from worldmodel.model import Schedule, WorldModel

LONG = MIN_COMPILED_STEPS


class WarningRecorder(logging.Handler):
    """The messages of the warnings (and worse) logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_auto_compiles_float32_dynamics_on_a_cpu_with_a_compiler_for_long_stages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    decision = decide_compile("auto", "cpu", "fp32", 24_000, compiler="g++")
    assert decision.compiled and "g++" in decision.reason and "24,000 steps" in decision.reason
    assert decide_compile("auto", "cpu", "fp32", LONG, compiler="clang++").compiled
    refused = {
        "no compiler": decide_compile("auto", "cpu", "fp32", LONG, compiler=None),
        "short stage": decide_compile("auto", "cpu", "fp32", LONG - 1, compiler="g++"),
        "bf16": decide_compile("auto", "cpu", "bf16", LONG, compiler="g++"),
        "cuda": decide_compile("auto", "cuda", "fp32", LONG, compiler="g++"),
        "off": decide_compile("off", "cpu", "fp32", LONG, compiler="g++"),
    }
    assert not any(decision.compiled for decision in refused.values())
    assert "no C++ compiler" in refused["no compiler"].reason and "too few" in refused["short stage"].reason
    assert "bf16" in refused["bf16"].reason and "cuda" in refused["cuda"].reason and "off" in refused["off"].reason


def test_auto_leaves_a_capped_cpu_capability_uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's compile cache does not key kernels on ATEN_CPU_CAPABILITY (an AVX-512 kernel from the cache aborted
    a run capped at AVX2), so auto does not compile under the cap; 'on' still does."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    decision = decide_compile("auto", "cpu", "fp32", LONG, compiler="g++")
    assert not decision.compiled and "ATEN_CPU_CAPABILITY=avx2" in decision.reason
    assert decide_compile("on", "cpu", "fp32", LONG, compiler="g++").compiled


def test_on_compiles_at_any_precision_and_length_but_needs_a_compiler_on_a_cpu() -> None:
    assert decide_compile("on", "cpu", "bf16", 10, compiler="clang++").compiled
    assert decide_compile("on", "cuda", "fp32", 10, compiler=None).compiled
    with pytest.raises(ValueError, match="needs a C.. compiler.*--compile-dynamics auto or off"):
        decide_compile("on", "cpu", "fp32", LONG, compiler=None)


def compiled_against_eager(dynamics: str) -> list[str]:
    """A smoke-sized core's training losses and gradients through ``compiled_loop`` (whatever it is at the call)
    against the eager unroll, from the same generator: equal to float rounding. Returns the warnings logged while
    compiling (torch's loggers do not propagate to the root, so the recorder sits on them)."""
    torch.manual_seed(0)
    model = WorldModel(ModelConfig.smoke(dynamics=dynamics))
    g = torch.Generator().manual_seed(1)
    keypoints = torch.rand(3, 10, 8, 3, generator=g) * 2 - 1
    actions = torch.rand(3, 10, 6, generator=g) * 2 - 1
    parameters = list(model.dynamics.parameters())

    def losses_and_gradients(compiled: bool) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        losses = model.dynamics_losses(keypoints, actions, 5, Schedule(1.0, 0.6, 0.4), torch.Generator().manual_seed(3),
                                       compiled=compiled)
        stacked = torch.stack([losses.total, losses.keypoint, losses.kl, losses.future, losses.regulariser])
        return stacked, list(torch.autograd.grad(losses.total, parameters, allow_unused=True))

    warnings = WarningRecorder()
    loggers = [logging.getLogger(name) for name in ("torch", "torch._dynamo")]
    for logger in loggers:
        logger.addHandler(warnings)
    try:
        compiled, compiled_grads = losses_and_gradients(True)
    finally:
        for logger in loggers:
            logger.removeHandler(warnings)
    eager, eager_grads = losses_and_gradients(False)
    torch.testing.assert_close(compiled, eager)
    assert sum(g is not None for g in eager_grads) > len(parameters) // 2
    for a, b in zip(compiled_grads, eager_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return warnings.messages


@pytest.mark.skipif(cxx_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler (g++, c++, clang++)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own use of torch.jit internals
def test_a_compiled_training_step_gives_the_uncompiled_losses_and_gradients() -> None:
    """The compiled unroll as the trainer makes it (inductor's C++ kernels; its draws made first, from the same
    generator) against the eager one. The first call compiles (~45 s on 2 CPU cores)."""
    compiled_against_eager("vrnn")


@pytest.mark.parametrize("dynamics", ["vrnn", "srvp", "hvrnn"])
def test_every_core_compiled_gives_the_uncompiled_losses_and_gradients(
    dynamics: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each core's training unroll traced by dynamo and run without inductor's C++ code generation (``aot_eager``:
    seconds instead of a minute): the eager losses and gradients. The VRNN and the hierarchical VRNN must trace as
    one graph (``fullgraph=True`` makes a graph break an error; a break would cost the compiled stage its fusion).
    SRVP breaks once per warm-up frame, where it reads its rows' frame counts to skip the step no row needs
    (``srvp.warm_rows``, left out of the graph on purpose), and says nothing about it: dynamo's warnings on the
    breaks used to fill the trainer's log."""
    monkeypatch.setattr(dynamics_core, "compiled_loop",
                        lambda core: torch.compile(core._loop, backend="aot_eager", fullgraph=dynamics != "srvp"))
    torch._dynamo.reset()
    assert compiled_against_eager(dynamics) == []  # nothing logged into the trainer's output
