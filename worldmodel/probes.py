"""Probes: how much of the true low-dimensional state a representation holds (docs/DYNAMICS.md, "Probes").

A probe is fit on the features (keypoints, or RNN hidden states) of one set of frames to their true states
and scored on another set, as R^2 per state dimension. Two readouts:

- ``linear``: ridge regression on standardised features (the paper's "keypoints track objects", its
  section 5.2). It understates what keypoints hold whenever the state is a nonlinear function of them: a
  pole's angle enters the state as its cosine and sine, which are ratios of keypoint differences.
- ``mlp``: two hidden layers of ``MLP_UNITS`` ReLU units trained by Adam on standardised inputs and targets
  for ``MLP_STEPS`` minibatches; deterministic under its seed. Measured on cartpole's test frames: the pole
  angle's sine from one frame's keypoints has R^2 0.43 linearly and 0.96 through the MLP.

Velocities are not visible in one frame: a probe from one frame's keypoints scores ~0 on them whatever the
detector, so look at the position dimensions (``r_squared_per_dim``), or probe a hidden state, which has
seen earlier frames.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

Readout = Literal["linear", "mlp"]
READOUTS: tuple[Readout, ...] = ("linear", "mlp")
MLP_UNITS = 256
MLP_STEPS = 2000
MLP_BATCH = 256
MLP_LEARNING_RATE = 1e-3


def fit_ridge(features: Tensor, targets: Tensor, ridge: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Least squares with a small ridge on standardised features: returns (weights (F+1, D), feature mean
    and std stacked (2, F)) so that ``predict_ridge`` can apply it."""
    features, targets = features.double(), targets.double()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = torch.cat([(features - mean) / std, torch.ones(len(features), 1, dtype=features.dtype)], 1)
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(gram, x.T @ targets)
    return weights, torch.stack([mean, std])


def predict_ridge(features: Tensor, weights: Tensor, scaling: Tensor) -> Tensor:
    x = (features.double() - scaling[0]) / scaling[1]
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ weights


class MLPProbe(nn.Module):
    """features (N, F) -> states (N, D): standardise, dense ReLU, dense ReLU, dense, unstandardise."""

    def __init__(self, features: Tensor, targets: Tensor) -> None:
        super().__init__()
        self.register_buffer("feature_scaling", torch.stack([features.mean(0), features.std(0).clamp_min(1e-6)]))
        self.register_buffer("target_scaling", torch.stack([targets.mean(0), targets.std(0).clamp_min(1e-6)]))
        self.layers = nn.Sequential(
            nn.Linear(features.shape[1], MLP_UNITS), nn.ReLU(),
            nn.Linear(MLP_UNITS, MLP_UNITS), nn.ReLU(),
            nn.Linear(MLP_UNITS, targets.shape[1]),
        )  # fmt: skip

    def standardized(self, features: Tensor) -> Tensor:
        return self.layers((features - self.feature_scaling[0]) / self.feature_scaling[1])

    def forward(self, features: Tensor) -> Tensor:
        return self.standardized(features.float()) * self.target_scaling[1] + self.target_scaling[0]


def fit_mlp(features: Tensor, targets: Tensor, seed: int = 0, steps: int = MLP_STEPS) -> MLPProbe:
    """Train an ``MLPProbe`` on (N, F) features and (N, D) targets; the same seed gives the same probe."""
    features, targets = features.float(), targets.float()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the layers' initialisation, without touching the caller's stream
        torch.manual_seed(seed)
        probe = MLPProbe(features, targets)
    optimizer = torch.optim.Adam(probe.parameters(), lr=MLP_LEARNING_RATE)
    goal = (targets - probe.target_scaling[0]) / probe.target_scaling[1]
    for _ in range(steps):
        rows = torch.randint(0, len(features), (min(MLP_BATCH, len(features)),), generator=generator)
        loss = (probe.standardized(features[rows]) - goal[rows]).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()


class FittedProbe(NamedTuple):
    """A probe of either readout; ``predict`` applies it."""

    readout: Readout
    ridge: tuple[Tensor, Tensor] | None
    mlp: MLPProbe | None

    def predict(self, features: Tensor) -> Tensor:
        """(N, F) -> (N, D) float64 predicted states."""
        if self.ridge is not None:
            return predict_ridge(features, *self.ridge)
        assert self.mlp is not None
        with torch.no_grad():
            return self.mlp(features).double()


def fit_probe(
    features: Tensor, targets: Tensor, readout: Readout = "linear", seed: int = 0, mlp_steps: int = MLP_STEPS
) -> FittedProbe:
    """Fit the named readout from features (N, F) to true states (N, D)."""
    if readout == "linear":
        return FittedProbe(readout, fit_ridge(features, targets), None)
    if readout == "mlp":
        return FittedProbe(readout, None, fit_mlp(features, targets, seed, mlp_steps))
    raise ValueError(f"unknown probe readout {readout!r}; use one of {', '.join(READOUTS)}")


def r_squared_per_dim(predicted: Tensor, targets: Tensor) -> Tensor:
    """(D,) float64 R^2 of each state dimension; NaN for a constant dimension (nothing to explain)."""
    targets = targets.double()
    residual = (predicted.double() - targets).pow(2).sum(0)
    total = (targets - targets.mean(0)).pow(2).sum(0)
    return torch.where(total > 1e-12, 1 - residual / total.clamp_min(1e-12), torch.full_like(total, float("nan")))


def r_squared(predicted: Tensor, targets: Tensor) -> float:
    """R^2 averaged over the state's dimensions (constant dimensions are left out)."""
    per_dim = r_squared_per_dim(predicted, targets)
    return float(per_dim[~per_dim.isnan()].mean())
