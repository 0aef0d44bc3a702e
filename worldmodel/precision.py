"""Which number format and memory layout the convolutions use on a device: decided in one place, from what
the hardware runs natively, and used by training, keypoint and hidden-state extraction, the imagination
envs, the RL evaluation and the benchmarks.

Why it has to be decided by capability (docs/PERFORMANCE.md has the measurements): bf16 autocast with
channels_last convolutions is ~4.7x faster than fp32 on a CPU with native bf16 (AVX512-BF16 or AMX), but
on an AVX2-only CPU every bf16 operation is emulated and the same training step is ~10x *slower* than
fp32 with channels_last. channels_last itself pays in fp32 on every CPU measured (2.5x on AVX2) and on
GPUs, so it is on by default everywhere.

    compute = choose_compute(torch.device("cpu"))          # precision "auto"
    compute.precision, compute.channels_last, compute.reason
    # ('fp32', True, 'cpu Intel Xeon (AVX2), no native bf16 -> fp32, channels_last')
    with compute.autocast():
        keypoints = model.detect(frames)

The dynamics' *training* has its own choice (``dynamics_precision``, training only): bf16 where the hardware
runs it natively, except on a CPU with AMX, *and* the core's products are wide
(``ModelConfig.dynamics_width`` >= 256). Measured (docs/PERFORMANCE.md, "Dynamics on cached keypoints"): on
AMD EPYC Zen 4 and Zen 5 (AVX512-BF16, no AMX) the VRNN with a GRU of 512 trains 1.1-1.9x faster in bf16 and as
accurately, the hierarchical VRNN 1.2x; SRVP, whose widest products are 128, 0.89x, and the smoke sizes (32)
0.3-0.6x: narrow products cost more in conversions than they gain. On a Xeon with AMX the training steps of 32
rows are 0.88-0.96x in bf16 with 2 threads (its element-wise work slows down more than its products speed
up), so training stays fp32 there, while its planner's rollouts of 256 candidates are 1.33x faster in bf16. The
trainer enters ``compute.dynamics_training()``; ``dynamics_autocast`` is what the dynamics' unroll runs under:
bf16 autocast inside that context, float32 everywhere else (inference, evaluation, the envs). The KL and
every loss stay float32. The planner's imagined rollouts (worldmodel/planning.py) follow the same rule less
the AMX exception (``choose_compute(..., dynamics_precision=..., dynamics_batch="planning").dynamics``): thousands of candidate steps per real step, where
bf16 ranks the candidates as float32 does (docs/PERFORMANCE.md, "Planning").
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
ResolvedPrecision = Literal["fp32", "bf16", "fp16"]
DynamicsPrecision = Literal["auto", "fp32", "bf16"]
BF16_DYNAMICS_MIN_WIDTH = 256  # below it bf16 slows the dynamics' training down (see the module docstring)
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
"""A zero-argument factory of the autocast context (``Compute.autocast``; ``contextlib.nullcontext`` for none)."""


class CpuInfo(NamedTuple):
    name: str  # model name, e.g. "AMD EPYC 7B13"
    capability: str  # the widest vector ISA torch dispatches to: "AVX2", "AVX512", "DEFAULT", ...
    native_bf16: bool  # bf16 matrix/vector instructions in hardware (AVX512-BF16 or AMX-BF16)
    amx_bf16: bool = False  # AMX tiles with bf16, and oneDNN allowed to use them (ONEDNN_MAX_CPU_ISA)


class Compute(NamedTuple):
    """The decision for one device. ``reason`` is the one line printed and stored in summary.json."""

    device_type: str  # "cpu" or "cuda"
    precision: ResolvedPrecision  # the autocast dtype of the convolutions ("fp32": no autocast)
    channels_last: bool  # conv weights and activations in channels_last memory format
    reason: str
    dynamics: ResolvedPrecision = "fp32"  # the products of the dynamics' training steps ("fp32" or "bf16")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the convolutions (a no-op for fp32)."""
        return autocast(torch.device(self.device_type), self.precision)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with its conv weights in the chosen memory format (activations follow the weights)."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        # A 1x1 kernel is the same in both layouts, but .to() gives it channels_last strides that its gradients
        # do not have, and DistributedDataParallel warns about every such mismatch ("Grad strides do not match
        # bucket view strides"): plain strides for those weights are the same data, and nothing to warn about.
        for parameter in model.parameters():
            if parameter.dim() == 4 and parameter.shape[-2:] == (1, 1):
                parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)
        return model

    def dynamics_training(self) -> contextlib.AbstractContextManager[Any]:
        """The context of a training step: inside it the dynamics' unroll computes in ``self.dynamics``."""
        return _dynamics_dtype_set(torch.bfloat16 if self.dynamics == "bf16" else None)


_DYNAMICS_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("dynamics_dtype", default=None)


@contextlib.contextmanager
def _dynamics_dtype_set(dtype: torch.dtype | None) -> Any:
    token = _DYNAMICS_DTYPE.set(dtype)
    try:
        yield
    finally:
        _DYNAMICS_DTYPE.reset(token)


def dynamics_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """What a dynamics unroll runs under: bf16 autocast inside ``Compute.dynamics_training`` of a bf16
    decision, else autocast off (float32, also when the caller's convolutions run under autocast)."""
    dtype = _DYNAMICS_DTYPE.get()
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """What this CPU can do, as torch sees it (read once per process)."""
    capabilities: dict[str, Any] = {}
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        with contextlib.suppress(Exception):
            capabilities = dict(get_capabilities())
    name = _cpu_model_name() or str(capabilities.get("cpu_name", "unknown CPU"))
    capability = torch.backends.cpu.get_cpu_capability()
    native = _native_bf16(capabilities, capability)
    return CpuInfo(name=name, capability=capability, native_bf16=native, amx_bf16=native and _amx_bf16(capabilities))


def _native_bf16(capabilities: dict[str, Any], capability: str) -> bool:
    """bf16 instructions in hardware, and torch and oneDNN allowed to use them: ``ATEN_CPU_CAPABILITY=avx2``
    and ``ONEDNN_MAX_CPU_ISA=AVX2`` (how to make a bf16 CPU run like an AVX2-only one) turn them off."""
    if capability in ("AVX2", "DEFAULT", "NO AVX"):
        return False
    # x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension
    return _onednn_allows("BF16", "AMX") and _has_flag(capabilities, "avx512_bf16", "amx_bf16", "bf16")


def _amx_bf16(capabilities: dict[str, Any]) -> bool:
    """AMX-BF16 tiles in hardware, and oneDNN allowed to use them (an ``ONEDNN_MAX_CPU_ISA`` cap below AMX
    leaves AVX512-BF16 alone)."""
    return _onednn_allows("AMX") and _has_flag(capabilities, "amx_bf16")


def _onednn_allows(*isa_names: str) -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA`` (unset: all) lets oneDNN use an ISA whose name holds one of ``isa_names``."""
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return isa_cap == "ALL" or any(name in isa_cap for name in isa_names)


def _has_flag(capabilities: dict[str, Any], *flags: str) -> bool:
    """Any of ``flags`` in torch's CPU capabilities, or else in /proc/cpuinfo's flags (x86) or Features (Arm)."""
    if capabilities:
        return any(capabilities.get(flag) for flag in flags)
    found = _cpuinfo_field("flags") or _cpuinfo_field("Features") or ""
    return bool(set(flags) & set(found.split()))


def _cpu_model_name() -> str | None:
    return _cpuinfo_field("model name")


def _cpuinfo_field(field: str) -> str | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int | None) -> tuple[str, bool]:
    """A CUDA device's name and whether it runs bf16 (asked once: the envs decide at every step)."""
    if not torch.cuda.is_available():
        return "CUDA", False
    device = torch.device("cuda", index) if index is not None else torch.device("cuda")
    return torch.cuda.get_device_name(device), torch.cuda.is_bf16_supported()


def choose_compute(
    device: torch.device | str,
    precision: Precision = "auto",
    channels_last: bool = True,
    dynamics_precision: DynamicsPrecision | None = None,
    dynamics_width: int = 0,
    dynamics_batch: Literal["training", "planning"] = "training",
) -> Compute:
    """The precision and memory format for ``device``. ``precision='auto'``: bf16 where the hardware runs
    it natively (a CPU with AVX512-BF16/AMX, a CUDA GPU with bf16), else fp32. An explicit precision wins;
    fp16 needs CUDA (ValueError otherwise, with the fix in the message). ``dynamics_precision`` (training
    and planning; None: fp32 and not mentioned in the reason): 'auto' is bf16 where the hardware runs it
    natively and ``dynamics_width`` (``ModelConfig.dynamics_width``) is at least ``BF16_DYNAMICS_MIN_WIDTH``,
    except for ``dynamics_batch='training'`` steps (32 rows) on a CPU with AMX, where fp32 is faster."""
    device = torch.device(device)
    layout = "channels_last" if channels_last else "NCHW"
    if device.type == "cuda":
        name, native = _cuda_info(device.index)
        found = f"cuda {name}, {'bf16' if native else 'no bf16'}"
    elif device.type == "cpu":
        info = cpu_info()
        native = info.native_bf16
        found = f"cpu {info.name} ({info.capability}), {'native bf16' if native else 'no native bf16'}"
    else:
        native, found = False, device.type
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA; use bf16 or fp32 (or auto) on this device")
    if precision == "auto":
        chosen: ResolvedPrecision = "bf16" if native else "fp32"
        reason = f"{found} -> {chosen}, {layout}"
    else:
        chosen = precision
        reason = f"{found} -> {chosen} (asked for), {layout}"
    dynamics: ResolvedPrecision = "fp32"
    if dynamics_precision is not None:
        if dynamics_precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--dynamics-precision must be auto, fp32 or bf16, got {dynamics_precision!r}")
        if dynamics_precision != "auto":
            dynamics, why = dynamics_precision, " (asked for)"
        elif native and dynamics_width < BF16_DYNAMICS_MIN_WIDTH:
            dynamics, why = "fp32", f" (width {dynamics_width} < {BF16_DYNAMICS_MIN_WIDTH}: bf16 does not pay)"
        elif native and dynamics_batch == "training" and device.type == "cpu" and cpu_info().amx_bf16:
            dynamics, why = "fp32", " (AMX: training steps of 32 rows run faster in fp32)"
        else:
            dynamics, why = ("bf16" if native else "fp32"), ""
        reason += f"; dynamics trained in {dynamics}{why}"
    return Compute(device.type, chosen, channels_last, reason, dynamics)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_ANNOUNCED: set[str] = set()


def announce(compute: Compute) -> None:
    """Print the decision once per process (to stderr, so that it never mixes with a script's output)."""
    if compute.reason not in _ANNOUNCED:
        _ANNOUNCED.add(compute.reason)
        print(f"compute: {compute.reason}", file=sys.stderr)


def inference_compute(device: torch.device) -> Compute:
    """The automatic choice for inference on ``device`` (detection and decoding in extraction, envs, RL
    evaluation), announced once."""
    compute = choose_compute(device)
    announce(compute)
    return compute
