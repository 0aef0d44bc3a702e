"""Planning in the world model: the cross-entropy method over action sequences (PlaNet's planner).

An agent trained in imagination has to learn from the model's rewards what the actions do; a planner asks
the model directly, at every real step. From the filter's state after the current real frame, ``candidates``
action sequences of ``horizon`` steps are imagined with the prior (one batch), scored by the task's reward
predictor, and the sampling distribution (a diagonal Gaussian per step, clipped to [-1, 1]) is refitted to the
best ``elites``; after ``iterations`` refits the first action of the mean is taken, and the rest of the mean
starts the next step's search (shifted by one).

What a candidate's return is, exactly as the imagination envs compute it (``envs.imagination_batch.ImaginationBatch``):
the reward predictor is warmed up from its zero state on the hidden states of the last ``CONTEXT_LENGTH`` real
frames (those that predicted them, as the posterior gave them), then reads the hidden state after each imagined
frame; the reward of step t is read from the state that predicts frame t+1. The predictor was fitted on windows
of that length, so it always sees one (a state carried over a whole episode would not be).

Every candidate of one ``plan`` call shares the same prior draws (common random numbers): the ranking then
compares the actions, not the luck of their samples. All draws come from the planner's own generator.

The planner starts from the state the real task's filter hands it (``envs.through_model.RealTaskThroughModel``: by
default the last 8 real frames filtered afresh). Its ``warmup`` setting (default ``"zero"``) is what the filter's
7 warm-up steps act before the first plan: zero actions hold the task still where random ones start it falling
(docs/DECISIONS.md).

The imagined rollouts are nearly all of a plan's time (a GRU of 512 over 256 x 12 steps, 4 times per real step).
Their ``precision`` (default ``"auto"``) follows the rule of the dynamics' training (``worldmodel.precision``):
bf16 products where the hardware runs them natively and the core is wide, float32 elsewhere. Measured
(docs/PERFORMANCE.md, "Planning"): 1.4-1.7x faster plans on a CPU with native bf16, nearly the same elites, the
same real returns within their spread. Planner files written before the setting existed plan in float32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import torch
from torch import Tensor

from worldmodel.atomic import atomic_write_text
from worldmodel.config import WARMUP_ACTIONS
from worldmodel.dynamics_core import CoreCarry
from worldmodel.errors import InputError
from worldmodel.model import WorldModel
from worldmodel.precision import DynamicsPrecision, choose_compute
from worldmodel.reward import RewardPredictor
from worldmodel.tasks import MAX_ACTION_DIM


@dataclass(frozen=True)
class PlannerConfig:
    horizon: int = 12
    """Imagined agent steps per candidate sequence (12: what the reward predictor is fitted and tested on)."""
    candidates: int = 256
    """Action sequences imagined per refit, as one batch."""
    elites: int = 32
    """The best candidates the sampling distribution is refitted to."""
    iterations: int = 4
    """Refits per real step."""
    min_std: float = 0.05
    """Floor of the sampling std, so that the search never collapses onto one sequence."""
    samples: int = 1
    """Prior samples per candidate, averaged (shared by all candidates)."""
    warmup: Literal["random", "zero"] = "zero"
    """The actions of the 7 real warm-up steps before the first plan: 'zero' (hold still) or 'random'."""
    precision: DynamicsPrecision = "auto"
    """Number format of the imagined rollouts: 'auto' (bf16 where the hardware runs it natively and the core's
    products are >= 256 wide, as the dynamics' training decides; else fp32), 'fp32' or 'bf16'."""

    def check(self) -> None:
        """InputError for settings that cannot plan, naming the field (``--planner.<field>`` on the command line)."""
        for name in ("horizon", "candidates", "elites", "iterations", "samples"):
            if getattr(self, name) < 1:
                raise InputError(f"the planner's {name} must be >= 1, got {getattr(self, name)}")
        if self.elites > self.candidates:
            raise InputError(f"the planner's elites ({self.elites}) must be <= its candidates ({self.candidates})")
        if not 0.0 <= self.min_std <= 1.0:  # also refuses nan
            raise InputError(f"the planner's min_std must be in [0, 1], got {self.min_std}")
        if self.warmup not in WARMUP_ACTIONS:
            raise InputError(f"the planner's warmup must be one of {', '.join(WARMUP_ACTIONS)}, got {self.warmup!r}")
        if self.precision not in PLANNING_PRECISIONS:
            raise InputError(f"the planner's precision must be one of {', '.join(PLANNING_PRECISIONS)}, got {self.precision!r}")


PLANNING_PRECISIONS: tuple[str, ...] = get_args(DynamicsPrecision)  # ("auto", "fp32", "bf16")
PLANNER_FORMAT = "structvrnn-cem-planner"  # the "format" of a planner file
# Files written before a setting existed keep meaning what they meant: random warm-ups, float32 rollouts.
FIELDS_BEFORE_THEY_EXISTED: dict[str, Any] = {"warmup": "random", "precision": "fp32"}


def save_planner(path: str | Path, config: PlannerConfig) -> None:
    """Write a planner file (JSON, atomically): what ``collect/dmcs.py --policy`` and the RL loop act with."""
    config.check()
    atomic_write_text(Path(path), json.dumps({"format": PLANNER_FORMAT, **asdict(config)}, indent=1) + "\n")


def load_planner_config(path: str | Path) -> PlannerConfig:
    """The settings of a planner file; InputError if it is not one (or its settings cannot plan)."""
    try:
        record: dict[str, Any] = json.loads(Path(path).read_text())
        ok = isinstance(record, dict) and record.get("format") == PLANNER_FORMAT
    except (OSError, UnicodeDecodeError, ValueError):
        ok = False
    names = {field.name for field in fields(PlannerConfig)}
    if not ok or not set(record) - {"format"} <= names:
        raise InputError(
            f"{path} is not a planner file of this package; write one with worldmodel.planning.save_planner"
        )
    settings = {name: value for name, value in record.items() if name in names}
    config = PlannerConfig(**{**FIELDS_BEFORE_THEY_EXISTED, **settings})
    config.check()
    return config


class PlanningPrecision(NamedTuple):
    dtype: str  # "fp32" or "bf16": what the imagined rollouts compute in
    reason: str  # one line, e.g. "cpu AMD EPYC (AVX512), native bf16 -> plans in bf16"


class Plan(NamedTuple):
    action: np.ndarray  # (A,) float32 in [-1, 1]: the first action of the final mean
    sequence: np.ndarray  # (H, A) the final mean
    imagined_return: float  # the mean imagined return of the last refit's elites


def repeat_carry(carry: CoreCarry, count: int) -> CoreCarry:
    """A carry of batch 1 -> the same state ``count`` times (a fresh tensor per part)."""
    return type(carry)(*(part.expand(count, *part.shape[1:]).contiguous() for part in carry))


@torch.inference_mode()
def imagined_returns(
    model: WorldModel,
    predictor: RewardPredictor,
    carry: CoreCarry,
    context_hidden: Tensor,
    sequences: Tensor,
    noise: Tensor,
    bf16: bool = False,
) -> Tensor:
    """(N,) imagined returns of ``sequences`` (N, H, A) from ``carry`` (batch 1, after the current frame).

    context_hidden (L, H'): the hidden states that predicted the last L real frames (the reward predictor's
    warm-up); noise (S, H, noise_size): the prior draws, shared by every sequence, returns averaged over S.
    bf16: the core's steps compute their products in bf16 (the narrow reward predictor stays float32).
    """
    count, horizon, action_dim = sequences.shape
    samples = noise.shape[0]
    device = context_hidden.device
    padded = torch.zeros(samples * count, horizon, MAX_ACTION_DIM, device=device)
    padded[..., :action_dim] = sequences.repeat(samples, 1, 1)  # rows: sample-major
    _, warm = predictor(context_hidden[None])  # (2, 1, U)
    state = warm.expand(-1, samples * count, -1).contiguous()
    state_carry = repeat_carry(carry, samples * count)
    draws = noise[:, None].expand(samples, count, *noise.shape[1:]).reshape(samples * count, horizon, -1)
    totals = torch.zeros(samples * count, device=device)
    core = model.dynamics
    core_autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for step in range(horizon):
        with core_autocast:
            state_carry = core.imagine_step(state_carry, padded[:, step], noise=draws[None, :, step]).carry
        with torch.autocast(device.type, enabled=False):
            rewards, state = predictor(core.hidden_state(state_carry)[:, None].float(), state)
        totals += rewards[:, 0].float()
    return totals.view(samples, count).mean(0)


class CEMPlanner:
    """The cross-entropy method in a world model (module docstring); one instance plans one episode at a time.

    Call ``reset()`` at each episode's start, then ``plan(carry, context_hidden)`` at each real step.
    """

    def __init__(
        self, model: WorldModel, predictor: RewardPredictor, action_dim: int, config: PlannerConfig, seed: int = 0
    ) -> None:
        config.check()
        self.model, self.predictor, self.config = model, predictor, config
        self.action_dim = action_dim
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: results do not depend on the device
        self._mean = torch.zeros(config.horizon, action_dim)
        self._precisions: dict[torch.device, PlanningPrecision] = {}

    def precision(self, device: torch.device) -> PlanningPrecision:
        """The rollouts' number format on ``device`` (``config.precision`` resolved for this machine, once)."""
        if device not in self._precisions:
            width = self.model.config.dynamics_width
            compute = choose_compute(
                device, dynamics_precision=self.config.precision, dynamics_width=width, dynamics_batch="planning"
            )
            found, _, chosen = compute.reason.partition(" -> ")
            reason = f"{found} -> plans in {chosen.partition('; dynamics trained in ')[2]}"
            self._precisions[device] = PlanningPrecision(compute.dynamics, reason)
        return self._precisions[device]

    def reset(self, seed: int | None = None) -> None:
        """Forget the previous step's plan (a new episode); with ``seed``, restart the draws from it."""
        self._mean = torch.zeros(self.config.horizon, self.action_dim)
        if seed is not None:
            self.generator.manual_seed(seed)

    def plan(self, carry: CoreCarry, context_hidden: Tensor) -> Plan:
        """The action to take at the frame ``carry`` stands at (batch 1), and the plan behind it."""
        config = self.config
        device = context_hidden.device
        noise = torch.randn(
            (config.samples, config.horizon, self.model.dynamics.noise_size), generator=self.generator
        ).to(device)
        bf16 = self.precision(device).dtype == "bf16"
        mean, std = self._mean.clone(), torch.ones(config.horizon, self.action_dim)
        elite_returns = torch.zeros(config.elites)
        for _ in range(config.iterations):
            draws = torch.randn((config.candidates, config.horizon, self.action_dim), generator=self.generator)
            sequences = (mean + std * draws).clamp(-1.0, 1.0)  # (N, H, A)
            sequences[0] = mean.clamp(-1.0, 1.0)  # the current mean always competes
            returns = imagined_returns(
                self.model, self.predictor, carry, context_hidden, sequences.to(device), noise, bf16
            ).cpu()
            elite_returns, best = returns.topk(config.elites)
            elites = sequences[best]  # (E, H, A)
            mean, std = elites.mean(0), elites.std(0, unbiased=False).clamp_min(config.min_std)
        self._mean = torch.cat([mean[1:], torch.zeros(1, self.action_dim)])  # warm start, shifted by one step
        sequence = mean.clamp(-1.0, 1.0)
        return Plan(sequence[0].numpy().astype(np.float32), sequence.numpy().astype(np.float32),
                    float(elite_returns.mean()))  # fmt: skip
