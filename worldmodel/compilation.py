"""Whether the dynamics stage runs its unroll through ``torch.compile`` (docs/PERFORMANCE.md, "Compiled dynamics").

A dynamics training step at the ``cpu`` sizes is some 5,000 small operations, each a few microseconds of
dispatch: its time hardly changes between 32 and 128 windows. ``torch.compile`` fuses the element-wise work of
the whole 16-frame unroll, forward and backward, into a few generated kernels (the random draws are made before
it, from the same generator in the same order: ``DynamicsCore.draw_randomness``). On a CPU that needs a C++
compiler and a compile of one to two minutes at the stage's start, which pays back on a long stage only.
"""

from __future__ import annotations

import os
import shutil
from typing import Literal, NamedTuple

CompileChoice = Literal["auto", "on", "off"]

MIN_COMPILED_STEPS = 5_000  # a compile of about a minute (2 cores) against 1.1-1.5x on the steps after it
CXX_COMPILERS = ("g++", "c++", "clang++")


class CompileDecision(NamedTuple):
    compiled: bool
    reason: str  # one line, printed at the stage's start and stored in summary.json


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU code generator would find, or None."""
    return next((name for name in CXX_COMPILERS if shutil.which(name)), None)


def decide_compile(choice: CompileChoice, device_type: str, dynamics_precision: str, steps: int,
                   compiler: str | None) -> CompileDecision:
    """The decision for a dynamics stage of ``steps`` steps on ``device_type`` whose products run in
    ``dynamics_precision`` ("fp32" or "bf16"). ``compiler``: the C++ compiler found (``cxx_compiler()``) or None.

    'auto' compiles on a CPU with a C++ compiler, in float32 (the draws made beforehand are float32), on stages of
    at least ``MIN_COMPILED_STEPS`` steps; 'on' compiles whatever the precision and length (ValueError without a
    compiler on a CPU); 'off' never. On CUDA only 'on' compiles (not measured on a GPU)."""
    if choice == "off":
        return CompileDecision(False, "dynamics uncompiled (--compile-dynamics off)")
    if device_type == "cpu" and compiler is None:
        if choice == "on":
            raise ValueError("--compile-dynamics on needs a C++ compiler (g++, c++ or clang++) on the PATH: "
                             "install one (e.g. apt-get install g++) or pass --compile-dynamics auto or off")
        return CompileDecision(False, "dynamics uncompiled: no C++ compiler for torch.compile (g++, c++, clang++)")
    if choice == "on":
        return CompileDecision(True, f"dynamics compiled with torch.compile (--compile-dynamics on, {device_type})")
    if device_type != "cpu":
        return CompileDecision(False, f"dynamics uncompiled on {device_type} (auto compiles on CPUs only; "
                                      "--compile-dynamics on)")
    capped = os.environ.get("ATEN_CPU_CAPABILITY")
    if capped:
        # torch's compile cache does not tell kernels built for different capabilities apart: on one machine, a
        # cached AVX-512 kernel aborted a run capped at AVX2 (a fresh cache, or a real AVX2 CPU, runs correctly).
        return CompileDecision(False, f"dynamics uncompiled: ATEN_CPU_CAPABILITY={capped} is set, and torch's compile "
                                      "cache may hold kernels built without it (--compile-dynamics on compiles anyway)")
    if dynamics_precision != "fp32":
        return CompileDecision(False, f"dynamics uncompiled: {dynamics_precision} products (auto compiles float32)")
    if steps < MIN_COMPILED_STEPS:
        return CompileDecision(False, f"dynamics uncompiled: {steps:,} steps, too few to repay a compile of about a "
                                      f"minute (auto compiles from {MIN_COMPILED_STEPS:,})")
    return CompileDecision(True, f"dynamics compiled with torch.compile ({compiler}; {steps:,} steps)")
