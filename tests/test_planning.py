"""worldmodel/planning.py and downstream/plan.py: the cross-entropy method finds a known optimum, imagined returns
read rewards as the imagination envs do, determinism under a seed, the real-task filter's context, the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch import Tensor

from envs.imagination_batch import prior_step
from worldmodel.errors import InputError
from worldmodel.planning import CEMPlanner, PlannerConfig, imagined_returns, load_planner_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = "cartpole"


# ---- a world model whose best actions are known: a point on a line that must reach 3 -------------------
class PointCarry(NamedTuple):
    position: Tensor  # (B, 1)


class PointStep(NamedTuple):
    carry: PointCarry


class PointCore:
    """Moves by the first action component; the noise moves it too, scaled by ``noise_scale``."""

    noise_size = 1

    def __init__(self, noise_scale: float = 0.0) -> None:
        self.noise_scale = noise_scale

    def imagine_step(self, carry: PointCarry, action: Tensor, noise: Tensor) -> PointStep:
        return PointStep(PointCarry(carry.position + action[:, :1] + self.noise_scale * noise[0]))

    def hidden_state(self, carry: PointCarry) -> Tensor:
        return carry.position


class PointModel:
    config = SimpleNamespace(dynamics_width=1)  # narrow: the planner's rollouts stay float32

    def __init__(self, noise_scale: float = 0.0) -> None:
        self.dynamics = PointCore(noise_scale)


def distance_reward(hidden: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reward -(position - 3)^2 per step; a state that only counts the steps read."""
    state = torch.zeros(2, hidden.shape[0], 1) if state is None else state
    return -((hidden[..., 0] - 3.0) ** 2), state + hidden.shape[1]


def point_planner(seed: int = 0, **config: Any) -> CEMPlanner:
    settings = {"horizon": 4, "candidates": 256, "elites": 32, "iterations": 6, **config}
    return CEMPlanner(PointModel(), distance_reward, 1, PlannerConfig(**settings), seed=seed)  # type: ignore[arg-type]


def test_cem_finds_the_known_best_sequence() -> None:
    """From 0 with steps in [-1, 1], reaching 3 takes (1, 1, 1) and then holding still: rewards -4, -1, 0, 0.
    Near the end the return is flat (a third step of 1 - e costs e^2), so there: close, and ending at 3."""
    plan = point_planner().plan(PointCarry(torch.zeros(1, 1)), torch.zeros(8, 1))
    np.testing.assert_allclose(plan.sequence[:2, 0], [1.0, 1.0], atol=0.05)
    assert plan.sequence[2, 0] > 0.7 and plan.sequence[2:, 0].sum() == pytest.approx(1.0, abs=0.15)
    assert plan.action.shape == (1,) and plan.action.dtype == np.float32 and plan.action[0] == plan.sequence[0, 0]
    assert plan.imagined_return == pytest.approx(-5.0, abs=0.5)


def test_next_step_starts_from_the_shifted_plan_and_reset_forgets_it() -> None:
    planner = point_planner(iterations=1, candidates=2, elites=1, min_std=0.0)
    first = planner.plan(PointCarry(torch.zeros(1, 1)), torch.zeros(8, 1))
    # With one refit to the better of (mean, one draw), a zero std would keep the mean: check the warm start.
    assert planner._mean.shape == (4, 1) and planner._mean[-1, 0] == 0.0
    np.testing.assert_allclose(planner._mean[:3, 0].numpy(), first.sequence[1:, 0])
    planner.reset()
    assert (planner._mean == 0).all()


def test_planning_is_deterministic_under_a_seed() -> None:
    carry, context = PointCarry(torch.zeros(1, 1)), torch.zeros(8, 1)
    noisy = {"horizon": 4, "candidates": 16, "elites": 4, "iterations": 2}

    def planned(seed: int) -> np.ndarray:
        model: Any = PointModel(0.5)
        planner = CEMPlanner(model, distance_reward, 1, PlannerConfig(**noisy), seed=seed)  # type: ignore[arg-type]
        return np.stack([planner.plan(carry, context).sequence for _ in range(3)])

    np.testing.assert_array_equal(planned(1), planned(1))
    assert not np.array_equal(planned(1), planned(2))


def test_every_candidate_sees_the_same_prior_draws() -> None:
    """Common random numbers: equal sequences get equal returns, and the return depends on the draws."""
    sequences = torch.tensor([[[0.5], [0.5]], [[0.5], [0.5]], [[1.0], [0.0]]])  # (3, 2, 1)
    carry, context = PointCarry(torch.zeros(1, 1)), torch.zeros(8, 1)
    noise = torch.tensor([[[1.0], [-2.0]]])  # (S=1, H=2, 1)
    model: Any = PointModel(1.0)
    returns = imagined_returns(model, distance_reward, carry, context, sequences, noise)  # type: ignore[arg-type]
    # positions 0.5 + 1 = 1.5, then 1.5 + 0.5 - 2 = 0: rewards -2.25 and -9; the third: 2 then 0, -1 and -9
    assert returns.tolist() == pytest.approx([-11.25, -11.25, -1.0 - 9.0])
    two = torch.cat([noise, -noise])  # averaged over two samples: positions (1.5, 0) and (-0.5, 2)
    averaged = imagined_returns(model, distance_reward, carry, context, sequences[:1], two)  # type: ignore[arg-type]
    assert averaged.tolist() == pytest.approx([(-11.25 + (-12.25 - 1.0)) / 2])


@pytest.mark.parametrize(
    ("settings", "phrase"),
    [({"elites": 300}, "elites"), ({"horizon": 0}, "horizon"), ({"min_std": 2.0}, "min_std"),
     ({"warmup": "still"}, "warmup must be one of random, zero")],
)
def test_bad_settings_are_refused(settings: dict[str, Any], phrase: str) -> None:
    with pytest.raises(InputError, match=phrase):
        point_planner(**settings)


# ---- on the smoke world model ----------------------------------------------------------------------------
def test_imagined_returns_read_rewards_as_the_imagination_envs(imagination_run: Path) -> None:
    """The predictor warmed up on the context and stepped on each imagined state (the planner) gives what one
    pass of it over the context's and the imagined frames' hidden states gives, with the envs' prior step."""
    from envs.imagination_models import load_imagination_models

    models = load_imagination_models(TASK, imagination_run, device="cpu")
    model, predictor = models.world_model, models.reward_predictor
    core = model.dynamics
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(1, 8, model.config.feature_size, generator=generator) * 0.3
    carry, context = None, []
    for t in range(8):
        action = torch.zeros(1, 6)
        noise = torch.randn(core.best_of, 1, core.noise_size, generator=generator)
        step = core.observe_step(carry, action, targets[:, t], num_samples=core.best_of, noise=noise)
        carry = step.carry
        context.append(step.hidden[0])
    context_hidden = torch.stack(context)  # (8, H)
    sequences = torch.rand(3, 5, 1, generator=generator) * 2 - 1
    noise = torch.randn(1, 5, core.noise_size, generator=generator)
    returns = imagined_returns(model, predictor, carry, context_hidden, sequences, noise)

    for row in range(3):
        rolled, hidden = carry, []
        for t in range(5):
            action = torch.zeros(1, 6)
            action[0, 0] = sequences[row, t, 0]
            rolled = prior_step(model, rolled, action, noise[:, t])
            hidden.append(core.hidden_state(rolled)[0])
        with torch.no_grad():
            rewards, _ = predictor(torch.cat([context_hidden, torch.stack(hidden)])[None])
        assert returns[row].item() == pytest.approx(rewards[0, 8:].sum().item(), rel=1e-5, abs=1e-5)


def test_real_task_filter_keeps_the_states_that_predicted_the_last_frames(imagination_run: Path) -> None:
    """After a real step, the newest context state is the new observation (h_t, the state that predicted the new
    frame, from the frames before it and the action), and the context holds the last 8 frames'."""
    from envs.imagination_models import load_imagination_models
    from envs.real import RealPixelEnv
    from envs.through_model import RealTaskThroughModel

    models = load_imagination_models(TASK, imagination_run, device="cpu")
    env = RealTaskThroughModel(RealPixelEnv(TASK, action_repeat=models.action_repeat), models, refilter=False)
    observation, _ = env.reset(seed=0)
    assert env.context_hidden.shape == (8, models.world_model.dynamics.hidden_size)
    np.testing.assert_allclose(env.context_hidden[-1].numpy(), observation, atol=1e-6)
    for _ in range(3):
        before = env.context_hidden
        observation, *_ = env.step(np.zeros(1, np.float32))
        np.testing.assert_allclose(env.context_hidden[-1].numpy(), observation, atol=1e-6)
        torch.testing.assert_close(env.context_hidden[:-1], before[1:])
    env.close()
    short = RealTaskThroughModel(RealPixelEnv(TASK, action_repeat=models.action_repeat), models, warmup_steps=2)
    short.reset(seed=0)
    for _ in range(6):
        short.step(np.zeros(1, np.float32))
    assert short.context_hidden.shape[0] == 8
    short.reset(seed=1)
    assert short.context_hidden.shape[0] == 3  # the new episode's frames only
    short.close()


def test_refiltered_window_is_the_context_an_imagined_episode_starts_from(imagination_run: Path) -> None:
    """Mid-episode, the env's state is what the imagination envs' context filter gives for the last 8 frames and
    their actions with the same draws (a window from the core's initial state, its first action ignored), and
    ``refiltered`` gives it for any draws; one filter over the whole episode (``refilter=False``) is another state.
    Zero warm-up actions are zero."""
    from collect.agent import EpisodeRecorder
    from envs.context import detect_frames, filter_context, posterior_noise
    from envs.imagination_batch import observations_of
    from envs.imagination_models import load_imagination_models
    from envs.real import RealPixelEnv
    from envs.through_model import RealTaskThroughModel
    from worldmodel.tasks import pad_actions

    models = load_imagination_models(TASK, imagination_run, device="cpu")
    model = models.world_model
    recorder = EpisodeRecorder(RealPixelEnv(TASK, action_repeat=models.action_repeat))  # keeps frames, actions
    env = RealTaskThroughModel(recorder, models, warmup_actions="zero")
    running = RealTaskThroughModel(RealPixelEnv(TASK, action_repeat=models.action_repeat), models,
                                   warmup_actions="zero", refilter=False)  # fmt: skip
    env.reset(seed=3)
    running.reset(seed=3)
    assert len(recorder.actions) == 7 and not np.any(recorder.actions)
    rng = np.random.default_rng(0)
    for _ in range(11):
        action = rng.uniform(-1, 1, (1,)).astype(np.float32)
        env.step(action)
        running.step(action)
    draws = torch.Generator().set_state(env._generator.get_state())  # the draws the next frame's window takes
    observation, *_ = env.step(np.full(1, 0.25, np.float32))
    running.step(np.full(1, 0.25, np.float32))

    keypoints = detect_frames(model, torch.from_numpy(np.stack(recorder.frames[-8:])))[None]  # (1, 8, K, 3)
    actions = torch.from_numpy(pad_actions(np.stack(recorder.actions[-7:] + [np.zeros(1, np.float32)])))[None]
    for generator, window in ((draws, (env.carry, env.context_hidden[None])),
                              (torch.Generator().manual_seed(5), env.refiltered(torch.Generator().manual_seed(5)))):
        expected = filter_context(model, keypoints, actions, posterior_noise(generator, model)[None])
        torch.testing.assert_close(window[1], expected.hidden, atol=1e-4, rtol=1e-4)  # frames detected one by one
        for part, expected_part in zip(window[0], expected.carry):
            torch.testing.assert_close(part, expected_part, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(observation, observations_of(model, env.carry, False)[0], atol=1e-6)
    assert not torch.allclose(running.context_hidden, env.context_hidden, atol=1e-3)  # the long filter drifted
    env.close()
    running.close()
    with pytest.raises(InputError, match="warmup_actions must be one of random, zero"):
        RealTaskThroughModel(RealPixelEnv(TASK), models, warmup_actions="still")


def run_script(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO_ROOT / "downstream" / "plan.py"), *options],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_script_plans_real_episodes_and_repeats_them_under_a_seed(imagination_run: Path, tmp_path: Path) -> None:
    options = ["--run", str(imagination_run), "--task", TASK, "--episodes", "1", "--planner.candidates", "8",
               "--planner.elites", "2", "--planner.iterations", "1", "--planner.horizon", "3", "--threads", "1"]  # fmt: skip
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        result = run_script(*options, "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((first / f"{TASK}-cem.json").read_text())
    assert record["real_planner"] == json.loads((second / f"{TASK}-cem.json").read_text())["real_planner"]
    assert load_planner_config(first / f"{TASK}-cem.planner.json") == PlannerConfig(3, 8, 2, 1)
    assert len(record["real_planner"]["values"]) == 1 and len(record["real_random"]["values"]) == 1
    assert 0 <= record["real_random"]["mean"] <= 1000 and 0 <= record["real_planner"]["mean"] <= 1000
    assert record["seconds_per_step"] > 0 and np.isfinite(record["imagined_plan_return_mean"])
    assert record["precision"] == "fp32" and "-> plans in fp32" in record["precision_reason"]  # the smoke GRU: 32
    assert not (imagination_run / "planning").exists()  # --out was given


@pytest.mark.parametrize(
    ("options", "phrase"),
    [(["--planner.elites", "300"], "elites (300)"), (["--task", "pong"], "pong"), (["--episodes", "0"], "--episodes"),
     (["--planner.candidates", "0"], "candidates must be >= 1"), (["--planner.precision", "fp16"], "--planner.precision")],
)
def test_bad_options_end_in_one_line(imagination_run: Path, options: list[str], phrase: str) -> None:
    result = run_script("--run", str(imagination_run), *options)
    assert result.returncode != 0 and "Traceback" not in result.stderr and phrase in result.stderr, result.stderr


def test_planner_files_round_trip_and_others_are_refused(tmp_path: Path) -> None:
    from worldmodel.planning import save_planner

    config = PlannerConfig(horizon=5, candidates=64, elites=8, iterations=2, min_std=0.1, samples=2)
    save_planner(tmp_path / "p.json", config)
    assert load_planner_config(tmp_path / "p.json") == config
    old = tmp_path / "old.json"  # written before warmup and precision existed: random warm-ups, float32
    old.write_text('{"format": "structvrnn-cem-planner", "horizon": 5}')
    assert load_planner_config(old) == PlannerConfig(horizon=5, warmup="random", precision="fp32")
    for text in ('{"horizon": 5}', "not json", '{"format": "structvrnn-cem-planner", "depth": 3}'):
        (tmp_path / "q.json").write_text(text)
        with pytest.raises(InputError, match="not a planner file"):
            load_planner_config(tmp_path / "q.json")
    with pytest.raises(InputError, match="not a planner file"):
        load_planner_config(tmp_path / "absent.json")
