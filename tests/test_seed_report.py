"""Comparing kinds of world model over training seeds (worldmodel/seed_report.py): Welch's t-test by hand,
which runs count as independent seeds, and the report's section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from worldmodel.config import ModelConfig
from worldmodel.fingerprint import model_fingerprint
from worldmodel.keypoint_cache import vision_fingerprint
from worldmodel.model import WorldModel
from worldmodel.reward_report import InputResult, summarize, write_json
from worldmodel.seed_report import (
    RunKind,
    comparable_pairs,
    compare_over_seeds,
    seed_comparisons,
    seed_groups,
    seed_json,
    seed_table,
    seed_verdict,
)


def _scores(predicted: float) -> InputResult:
    """One fold whose ratio over the predicted frames is ``predicted`` (null-model error 1)."""
    nan = float("nan")
    return summarize(np.array([[[nan, 0.5, predicted], [nan, 1.0, 1.0]]]), num_observed=2)


def test_welch_test_over_seeds_matches_the_hand_computation() -> None:
    """Two runs each: struct 0.5, 0.7 and cnn 1.0, 1.2. Difference -0.5; each variance 0.02 over 2 runs, so the
    standard error is sqrt(0.01 + 0.01) = 0.1414, t = -3.536 with 0.02^2 / (2 * 0.01^2) = 2 degrees of freedom,
    and for 2 degrees of freedom the two-sided p is 1 - |t| / sqrt(t^2 + 2) = 0.0715: not separable at 0.05."""
    results = {"cheetah": {"a": _scores(0.5), "b": _scores(0.7), "c": _scores(1.0), "d": _scores(1.2)}}
    comparison = compare_over_seeds(results, ["a", "b"], ["c", "d"])["cheetah"]
    t = -0.5 / np.sqrt(0.02)
    assert np.isclose(comparison.difference, -0.5) and np.isclose(comparison.standard_error, np.sqrt(0.02))
    assert np.isclose(comparison.degrees_of_freedom, 2.0)
    assert np.isclose(comparison.p_value, 1 - abs(t) / np.sqrt(t**2 + 2))
    assert np.isclose(comparison.first_std, np.sqrt(0.02)) and comparison.first_runs == 2
    assert seed_verdict(comparison) == "not separable"
    # a third run of each close to its kind's mean: the same gap now stands out of the seed spread
    results["cheetah"] |= {"e": _scores(0.6), "f": _scores(1.1)}
    tighter = compare_over_seeds(results, ["a", "b", "e"], ["c", "d", "f"])["cheetah"]
    assert tighter.p_value < 0.05 and seed_verdict(tighter) == "lower"
    assert seed_verdict(compare_over_seeds(results, ["c", "d", "f"], ["a", "b", "e"])["cheetah"]) == "higher"


def test_runs_sharing_a_perception_are_not_independent_seeds() -> None:
    groups = seed_groups([
        RunKind("struct", "struct-vrnn / vrnn", "detector-1"),
        RunKind("cnn", "cnn-vrnn / vrnn", "encoder-1"),
        RunKind("struct (dynamics reseeded)", "struct-vrnn / vrnn", "detector-1"),  # --vision-from struct
        RunKind("struct (seed 2)", "struct-vrnn / vrnn", "detector-2"),
        RunKind("struct srvp", "struct-vrnn / srvp", "detector-3"),
    ])  # fmt: skip
    assert groups.samples == {
        "struct-vrnn / vrnn": ["struct", "struct (seed 2)"],
        "cnn-vrnn / vrnn": ["cnn"],
        "struct-vrnn / srvp": ["struct srvp"],
    }
    assert groups.left_out == {"struct (dynamics reseeded)": "struct"}
    assert comparable_pairs(groups) == []  # only one kind has two runs


def test_seed_table_compares_kinds_with_two_runs_each(tmp_path: Path) -> None:
    results = {
        task: {"struct": _scores(0.5 + shift), "cnn": _scores(1.0 + shift), "struct (s2)": _scores(0.7 + shift),
               "cnn (s2)": _scores(1.2 + shift)}
        for task, shift in (("cartpole", 0.0), ("cheetah", 0.1))
    }  # fmt: skip
    groups = seed_groups([
        RunKind("struct", "struct-vrnn / vrnn", "d1"), RunKind("cnn", "cnn-vrnn / vrnn", "e1"),
        RunKind("struct (s2)", "struct-vrnn / vrnn", "d2"), RunKind("cnn (s2)", "cnn-vrnn / vrnn", "e2"),
    ])  # fmt: skip
    comparisons = seed_comparisons(results, groups)
    table = seed_table(groups, comparisons)
    assert "- struct-vrnn / vrnn: 2 independent runs (struct, struct (s2))" in table
    assert "| cartpole | 0.600 ± 0.141 | 1.100 ± 0.141 | -0.500 ± 0.141 | 0.072 | not separable |" in table
    assert "struct-vrnn / vrnn lower over seeds on 0 of 2 tasks (2 and 2 runs)." in table
    payload = seed_json(groups, comparisons)
    cheetah = payload["comparisons"]["struct-vrnn / vrnn - cnn-vrnn / vrnn"]["cheetah"]
    assert np.isclose(cheetah["first_mean"], 0.7) and cheetah["verdict"] == "not separable"
    # identical runs within each kind: no spread, so any gap is a difference (and JSON gets null, not Infinity)
    flat = {"cartpole": {"struct": _scores(0.5), "cnn": _scores(1.0), "struct (s2)": _scores(0.5), "cnn (s2)": _scores(1.0)}}
    flat_seeds = seed_json(groups, seed_comparisons(flat, groups))
    flat_json = flat_seeds["comparisons"]["struct-vrnn / vrnn - cnn-vrnn / vrnn"]["cartpole"]
    assert flat_json["degrees_of_freedom"] is None and flat_json["verdict"] == "lower"
    write_json(tmp_path / "results.json", flat, {}, seeds=flat_seeds)
    assert json.loads((tmp_path / "results.json").read_text())["seeds"]["samples"] == groups.samples
    assert "Infinity" not in (tmp_path / "results.json").read_text()
    # one run per kind: no section at all
    single = seed_groups([RunKind("struct", "s", "d1"), RunKind("cnn", "c", "e1")])
    assert seed_table(single, seed_comparisons(results, single)) == ""


def test_the_perception_fingerprint_ignores_the_dynamics_core_only() -> None:
    """A reseeded dynamics stage on the same detector (--vision-from) shares the perception fingerprint; a
    detector trained apart does not."""
    torch.manual_seed(0)
    model = WorldModel(ModelConfig.smoke(variant="struct-vrnn"))
    perception, whole = vision_fingerprint(model), model_fingerprint(model)
    with torch.no_grad():
        next(model.dynamics.parameters()).add_(1.0)
    assert vision_fingerprint(model) == perception and model_fingerprint(model) != whole
    with torch.no_grad():
        next(model.detector.parameters()).add_(1.0)
    assert vision_fingerprint(model) != perception
