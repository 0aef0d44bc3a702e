"""Dynamics-stage training speed of every core, side by side: forward + backward + Adam step of
``WorldModel.dynamics_losses`` on cached-keypoint-sized batches (default 32 windows of 8 + 8 frames, the
``cpu`` profile's sizes), in steps per second.

    OMP_NUM_THREADS=2 python tests/bench/bench_dynamics.py [--threads 2] [--steps 60] [--profile cpu]

The trainer's automatic dynamics precision (``--dynamics-precision
auto``: bf16 where the CPU runs it natively without AMX and the core is wide enough) picks one of the two: each core is
timed in float32 and in bf16, in turns of ``--steps // 3`` steps, best of 3 turns each, and the pick is named.
Each core is also timed in fp32 through ``torch.compile`` (``--compile-dynamics``; the first step, which
compiles, is timed apart; ``--no-compile`` leaves it out), and in fp32 with its observed frames' read-out
(decoded keypoints, KL terms) computed frame by frame instead of after the loop (``deferred_readout``;
docs/DYNAMICS.md, "Speed"): the ratio is what the deferral buys.
``--bf32`` adds another candidate, not offered by the trainer: float32 tensors whose matrix products oneDNN
computes from bf16-rounded inputs (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, on CPUs with native
bf16; docs/PERFORMANCE.md, "A CPU with AMX").

Under each figure, the ceiling this CPU puts on it: the step's matrix products (forward and backward, recorded
with their shapes, strides and dtypes) replayed alone, one after the other, on fresh tensors. No change to the
element-wise work around them can make the step faster than that; only fewer or larger products can.
Measure on free cores: with other jobs on them, OpenMP threads wait for each other and every figure collapses.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from worldmodel.compilation import cxx_compiler, decide_compile
from worldmodel.config import DYNAMICS, ModelConfig
from worldmodel.model import Schedule, WorldModel
from worldmodel.precision import BF16_DYNAMICS_MIN_WIDTH, Compute, choose_compute, cpu_info
from worldmodel.train_config import cpu_profile
from worldmodel.training import make_optimizer


class Candidate(NamedTuple):
    """A way to run the dynamics' training step: the trainer's ``Compute``, for bf32 oneDNN's bf16 products, and
    whether the observed frames' read-out waits until after the loop (the trainer's way) or runs frame by frame."""

    compute: Compute
    bf16_products: bool = False
    deferred_readout: bool = True
    compiled: bool = False

    def context(self) -> contextlib.AbstractContextManager[None]:
        return bf16_products() if self.bf16_products else contextlib.nullcontext()


@contextlib.contextmanager
def bf16_products():  # type: ignore[no-untyped-def]
    """fp32 tensors, matrix products computed by oneDNN from bf16-rounded inputs with fp32 accumulation."""
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


def training_step(config: ModelConfig, batch: int, observed: int, predicted: int) -> Step:
    """One dynamics-stage training step of a fresh core (seed 0) on a fixed random batch, under a ``Compute``."""
    torch.manual_seed(0)
    model = WorldModel(config)
    parameters = list(model.dynamics.parameters())
    optimizer = make_optimizer(parameters, cpu_profile(), torch.device("cpu"))  # the trainer's Adam (fused on CPU)
    length = observed + predicted
    keypoints = torch.rand(batch, length, config.num_keypoints, 3) * 2 - 1
    actions = torch.rand(batch, length, config.action_dim) * 2 - 1
    schedule = Schedule(kl_scale=1.0, teacher_forcing_observed=0.5, teacher_forcing_predicted=0.75)

    def step(candidate: Candidate) -> None:
        optimizer.zero_grad(set_to_none=True)
        with candidate.compute.dynamics_training():
            loss = model.dynamics_losses(keypoints, actions, observed, schedule,
                                         deferred_readout=candidate.deferred_readout, compiled=candidate.compiled).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    return step


Step = Callable[[Candidate], None]


def steps_per_second(step: Step, steps: int, candidates: dict[str, Candidate]) -> dict[str, float]:
    """Training steps per second for each dynamics precision, timed in turns (best of 3)."""
    for candidate in candidates.values():
        with candidate.context():
            for _ in range(3):  # warm-up: allocator, autograd graph caches, oneDNN kernels
                step(candidate)
    best = {name: float("inf") for name in candidates}
    turn = max(1, steps // 3)
    for _ in range(3):
        for name, candidate in candidates.items():
            with candidate.context():
                start = time.perf_counter()
                for _ in range(turn):
                    step(candidate)
                best[name] = min(best[name], (time.perf_counter() - start) / turn)
    return {name: 1.0 / seconds for name, seconds in best.items()}


class Layout(NamedTuple):
    """What a replay needs of a tensor argument."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype


class Product(NamedTuple):
    """One matrix product of a step: the op and its arguments (tensors as their ``Layout``)."""

    op: torch._ops.OpOverload
    arguments: tuple[object, ...]

    def flops(self) -> int:
        shapes = [argument.shape for argument in self.arguments if isinstance(argument, Layout)]
        left, right = shapes[-2], shapes[-1]  # addmm's and baddbmm's added term comes first
        batch = left[0] if len(left) == 3 else 1
        return 2 * batch * left[-2] * left[-1] * right[-1]

    def inputs(self) -> list[object]:
        """Fresh tensors of the recorded layouts, the other arguments as they were."""
        return [torch.empty_strided(a.shape, a.stride, dtype=a.dtype).normal_() if isinstance(a, Layout) else a
                for a in self.arguments]


class ProductRecorder(TorchDispatchMode):
    """Records every matrix product (forward and backward) that runs under it."""

    OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default)

    def __init__(self) -> None:
        super().__init__()
        self.products: list[Product] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in self.OPS:
            layouts = tuple(Layout(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
            self.products.append(Product(func, layouts))
        return func(*args, **(kwargs or {}))


def products_alone(step: Step, candidate: Candidate, repeats: int = 5) -> tuple[int, int, float]:
    """The matrix products of one step replayed alone, on fresh tensors of the same shapes, strides and dtypes:
    -> (number of products, FLOPs, best seconds for all of them). No step can run faster than that on this
    machine's BLAS, whatever the element-wise work around the products costs."""
    with candidate.context():
        with ProductRecorder() as recorder:
            step(candidate)
        calls = [(product.op, product.inputs()) for product in recorder.products]
        for op, inputs in calls:  # warm-up: the BLAS's first calls at each shape
            op(*inputs)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for op, inputs in calls:
                op(*inputs)
            best = min(best, time.perf_counter() - start)
    return len(calls), sum(product.flops() for product in recorder.products), best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--observed", type=int, default=8)
    parser.add_argument("--predicted", type=int, default=8)
    parser.add_argument("--profile", choices=("cpu", "paper", "smoke"), default="cpu")
    parser.add_argument("--cores", nargs="+", choices=DYNAMICS, default=list(DYNAMICS), help="the cores to time "
                        "(default: all)")
    parser.add_argument("--bf32", action="store_true", help="also time fp32 tensors with oneDNN's bf16 products")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled fp32 step (its compile takes "
                        "1-2 minutes per core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    factory = {"cpu": ModelConfig.cpu, "paper": ModelConfig.paper, "smoke": ModelConfig.smoke}[args.profile]
    info = cpu_info()
    print(f"{info.name} ({info.capability}), torch {torch.__version__}, {args.threads} threads, "
          f"{args.profile} sizes, batch {args.batch} x ({args.observed} + {args.predicted})")
    native = "yes" if info.native_bf16 else "no"
    amx = "yes" if info.amx_bf16 else "no"
    print(f"--dynamics-precision auto: bf16 where the CPU runs it natively ({native} here) and has no AMX (AMX: {amx} here), "
          f"if the core's width is >= {BF16_DYNAMICS_MIN_WIDTH}; else fp32")
    candidates = {precision: Candidate(choose_compute("cpu", dynamics_precision=precision)) for precision in ("fp32", "bf16")}
    if args.bf32:
        candidates["bf32"] = Candidate(candidates["fp32"].compute, bf16_products=True)
    frame_by_frame = Candidate(candidates["fp32"].compute, deferred_readout=False)
    compiled = Candidate(candidates["fp32"].compute, compiled=True)
    for name in args.cores:
        config = factory(dynamics=name)
        auto = choose_compute("cpu", dynamics_precision="auto", dynamics_width=config.dynamics_width)
        step = training_step(config, args.batch, args.observed, args.predicted)
        core = WorldModel(config).dynamics
        defers = core.defers_readout()
        extra = {"fp32, read-out frame by frame": frame_by_frame} if defers else {}
        if not args.no_compile:
            torch._dynamo.reset()  # each core compiled afresh: the cores share their loop's code, and its cache limit
            started = time.perf_counter()
            step(compiled)  # the compile, timed apart
            compile_seconds = time.perf_counter() - started
            extra["fp32, compiled"] = compiled
        rates = steps_per_second(step, args.steps, {**candidates, **extra})
        by_frame = rates.pop("fp32, read-out frame by frame", None)
        compiled_rate = rates.pop("fp32, compiled", None)
        size = sum(p.numel() for p in core.parameters())
        figures = ", ".join(f"{label} {rate:5.1f}" for label, rate in rates.items())
        print(f"  {name:6s} steps/s: {figures} (bf16/fp32 {rates['bf16'] / rates['fp32']:.2f}x; auto: {auto.dynamics}, "
              f"{rates[auto.dynamics]:.1f})   (width {config.dynamics_width}, hidden {core.hidden_size}, "
              f"noise {core.noise_size}, best of {core.best_of}, {size / 1e3:.0f}k parameters)")
        print(f"         auto: {max(rates.values()) / rates[auto.dynamics]:.2f}x the fastest's time (target <= 1.10)")
        if by_frame is not None:
            print(f"         fp32 with the observed frames' read-out frame by frame: {by_frame:5.1f} steps/s "
                  f"(read-out after the loop: {rates['fp32'] / by_frame:.2f}x)")
        else:
            print("         (this core reads its observed frames out frame by frame)")
        if compiled_rate is not None:
            decision = decide_compile("auto", "cpu", auto.dynamics, cpu_profile().dynamics_steps, cxx_compiler())
            print(f"         fp32 compiled (torch.compile, first step {compile_seconds:.0f} s): "
                  f"{compiled_rate:5.1f} steps/s "
                  f"({compiled_rate / rates['fp32']:.2f}x fp32 uncompiled); the trainer's cpu profile: "
                  f"{'compiled' if decision.compiled else 'uncompiled'}")
        for label, candidate in candidates.items():
            count, flops, seconds = products_alone(step, candidate)
            print(f"         {label}: its {count} matrix products ({flops / 1e9:.2f} GFLOP a step) alone take "
                  f"{seconds * 1e3:.0f} ms ({flops / seconds / 1e9:.0f} GFLOP/s): at most {1 / seconds:.1f} steps/s here "
                  f"(the step runs at {rates[label] * seconds:.0%} of that)")


if __name__ == "__main__":
    main()
