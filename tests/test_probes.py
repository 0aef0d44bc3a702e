"""Probes from features to true states (worldmodel/probes.py): known answers for both readouts."""

from __future__ import annotations

import math

import pytest
import torch

from worldmodel.probes import fit_probe, fit_ridge, predict_ridge, r_squared, r_squared_per_dim


def test_ridge_probe_recovers_a_linear_state_and_scores_noise_near_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(500, 6, generator=generator)
    mixing = torch.randn(6, 3, generator=generator)
    states = features @ mixing + 0.5
    weights, scaling = fit_ridge(features[:400], states[:400], ridge=1e-8)
    assert r_squared(predict_ridge(features[400:], weights, scaling), states[400:]) > 0.999
    noise = torch.randn(500, 3, generator=generator)
    weights, scaling = fit_ridge(features[:400], noise[:400])
    assert r_squared(predict_ridge(features[400:], weights, scaling), noise[400:]) < 0.05
    constant = torch.cat([states, torch.ones(500, 1)], 1)  # a constant dimension is left out, not 0/0
    weights, scaling = fit_ridge(features[:400], constant[:400], ridge=1e-8)
    assert r_squared(predict_ridge(features[400:], weights, scaling), constant[400:]) > 0.999


def angle_states(points: torch.Tensor) -> torch.Tensor:
    """A pole's state from two points on it, as dm_control gives it: the cosine and sine of its angle (nonlinear
    in the points), and the base's position (linear)."""
    angle = torch.atan2(points[:, 1] - points[:, 3], points[:, 0] - points[:, 2])
    return torch.stack([angle.cos(), angle.sin(), points[:, 0]], 1)




def test_mlp_probe_reads_what_a_linear_one_cannot_and_follows_its_seed() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(3000, 4, generator=generator) * 2 - 1
    states = angle_states(points)
    linear = fit_probe(points[:2000], states[:2000], "linear")
    mlp = fit_probe(points[:2000], states[:2000], "mlp", seed=0, mlp_steps=800)
    linear_r2 = r_squared_per_dim(linear.predict(points[2000:]), states[2000:])
    mlp_r2 = r_squared_per_dim(mlp.predict(points[2000:]), states[2000:])
    assert linear_r2[2] > 0.999 and mlp_r2[2] > 0.95  # the position: linear in the points
    assert (linear_r2[:2] < 0.9).all() and (mlp_r2[:2] > 0.95).all()  # the angle: only the MLP reads it
    again = fit_probe(points[:2000], states[:2000], "mlp", seed=0, mlp_steps=800)
    assert torch.equal(again.predict(points[2000:]), mlp.predict(points[2000:]))
    other = fit_probe(points[:2000], states[:2000], "mlp", seed=1, mlp_steps=800)
    assert not torch.equal(other.predict(points[2000:]), mlp.predict(points[2000:]))


def test_fitting_an_mlp_probe_leaves_the_global_random_stream_alone() -> None:
    features, targets = torch.rand(50, 2), torch.rand(50, 1)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fit_probe(features, targets, "mlp", seed=0, mlp_steps=2)
    # The probe's draws came from its own generator and a forked stream: the caller's next draw is unchanged.
    assert torch.equal(torch.rand(3), expected)


def test_r_squared_per_dim_by_hand_and_a_constant_dimension() -> None:
    targets = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    predicted = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    per_dim = r_squared_per_dim(predicted, targets)
    assert per_dim[0].item() == pytest.approx(1 - 2 / 8)  # residual 1 + 0 + 1, total 4 + 0 + 4
    assert math.isnan(per_dim[1].item())  # constant: nothing to explain
    assert r_squared(predicted, targets) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown probe readout"):
        fit_probe(targets, targets, "kernel")  # type: ignore[arg-type]
