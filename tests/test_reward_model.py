"""Reward predictor (S2.3): learns a known function, stays at chance on noise, normalization, splits."""

from __future__ import annotations

import numpy as np
import torch

from worldmodel.reward import (
    RewardTrainConfig,
    align_rewards,
    episode_folds,
    evaluate_mse,
    fit_reward_predictor,
    null_model_mse,
)


def synthetic_windows(num_windows: int, length: int, features: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_windows, length, features, generator=generator)
    episodes = np.arange(num_windows) // 10  # 10 windows per episode
    return inputs, episodes


def normalized_test_mse(inputs: torch.Tensor, rewards: torch.Tensor, episodes: np.ndarray) -> float:
    train, test = episode_folds(episodes, num_folds=5, seed=0)[0]
    config = RewardTrainConfig(epochs=30, batch_size=64, patience=5, seed=0)
    fit = fit_reward_predictor(inputs[train], rewards[train], episodes[train], config)
    mse = evaluate_mse(fit.predictor, inputs[test], rewards[test])
    null = null_model_mse(rewards[train], rewards[test])
    return float(np.nanmean((mse / null).numpy()))


def test_learns_a_known_reward_function_far_below_null() -> None:
    inputs, episodes = synthetic_windows(600, 12, 8, seed=1)
    # The reward of step t -> t+1 is a function of the features of frame t+1 (the alignment we assume).
    next_features = torch.roll(inputs, shifts=-1, dims=1)
    rewards = torch.sigmoid(2 * next_features[..., 0]) + 0.5 * next_features[..., 1].clamp(min=0)
    assert normalized_test_mse(inputs, rewards, episodes) < 0.2


def test_reward_independent_of_inputs_stays_near_one() -> None:
    inputs, episodes = synthetic_windows(600, 12, 8, seed=2)
    rewards = torch.rand(600, 12, generator=torch.Generator().manual_seed(3))
    assert 0.9 < normalized_test_mse(inputs, rewards, episodes) < 1.2


def test_an_untrained_predictor_is_the_null_model_and_is_kept_when_nothing_beats_it() -> None:
    inputs, episodes = synthetic_windows(200, 12, 8, seed=4)
    rewards = 0.003 + 0.02 * torch.rand(200, 12, generator=torch.Generator().manual_seed(5))  # acrobot-sized
    # Zero epochs: the predictor outputs the mean training target at every step, exactly the null model
    # (the mean over the windows it trains on: those outside its validation episodes).
    fit = fit_reward_predictor(inputs, rewards, episodes, RewardTrainConfig(epochs=0))
    targets, mask = align_rewards(rewards)
    assert fit.best_epoch == -1
    predicted, _ = fit.predictor(inputs)
    assert torch.equal(predicted, fit.predictor.reward_mean.expand_as(predicted))
    assert abs(float(fit.predictor.reward_mean) - float(targets[:, mask].mean())) < 1e-3
    # A wild learning rate on rewards that are noise: the one epoch is worse than the null model on the
    # validation episodes, so the null model is what the fit returns.
    noise = torch.rand(200, 12, generator=torch.Generator().manual_seed(6))
    fit = fit_reward_predictor(inputs, noise, episodes, RewardTrainConfig(epochs=1, lr_start=10.0, lr_end=10.0))
    assert fit.best_epoch == -1 and len(fit.validation_losses) == 1
    predicted, _ = fit.predictor(inputs)
    assert torch.equal(predicted, fit.predictor.reward_mean.expand_as(predicted))


def test_null_model_matches_hand_computation() -> None:
    train = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # targets at frames 1,2: [1,2],[3,4] -> mean 2.5
    test = torch.tensor([[0.0, 1.0, 9.0]])  # targets at frames 1,2: 0 and 1
    mse = null_model_mse(train, test)
    assert torch.isnan(mse[0])
    assert torch.allclose(mse[1:], torch.tensor([2.5**2, 1.5**2]))


def test_alignment_shifts_rewards_to_the_frame_they_lead_to() -> None:
    targets, mask = align_rewards(torch.tensor([[10.0, 20.0, 30.0]]))
    assert targets[0, 1:].tolist() == [10.0, 20.0]
    assert mask.tolist() == [False, True, True]


def test_folds_are_disjoint_by_episode_cover_everything_and_reproducible() -> None:
    episodes = np.repeat(np.arange(23), 7)
    folds = episode_folds(episodes, num_folds=5, seed=4)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(len(episodes)))  # every window tested exactly once
    for train, test in folds:
        assert not set(episodes[train]) & set(episodes[test])
        assert len(test) / len(episodes) < 0.3
    again = episode_folds(episodes, num_folds=5, seed=4)
    other = episode_folds(episodes, num_folds=5, seed=5)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_recurrent_state_continues_a_sequence_exactly() -> None:
    from worldmodel.reward import RewardPredictor

    torch.manual_seed(0)
    predictor = RewardPredictor(5)
    inputs = torch.randn(3, 9, 5)
    whole, _ = predictor(inputs)
    first, state = predictor(inputs[:, :4])
    rest, _ = predictor(inputs[:, 4:], state)
    assert torch.allclose(whole, torch.cat([first, rest], 1), atol=1e-6)


def test_summary_is_the_ratio_of_summed_errors_per_fold() -> None:
    from worldmodel.reward_report import summarize

    nan = float("nan")
    errors = np.array([
        [[nan, 1.0, 2.0, 3.0], [nan, 2.0, 2.0, 6.0]],  # fold 0: predictor (row 0), null model (row 1)
        [[nan, 1.0, 0.0, 1.0], [nan, 1.0, 0.0, 4.0]],  # fold 1: a frame whose null error is 0
    ])
    result = summarize(errors, num_observed=2)
    np.testing.assert_allclose(result.normalized_mse[0], [nan, 0.5, 1.0, 0.5])
    np.testing.assert_allclose(result.normalized_mse[1], [nan, 1.0, nan, 0.25])
    # observed frames: frame 1 only -> 0.5 and 1.0; predicted: (2 + 3) / (2 + 6) and (0 + 1) / (0 + 4)
    assert np.isclose(result.observed_mean, 0.75) and np.isclose(result.observed_std, 0.25)
    assert np.isclose(result.predicted_mean, (0.625 + 0.25) / 2) and np.isclose(result.predicted_std, 0.1875)


def test_paired_difference_is_taken_fold_by_fold() -> None:
    """Two models whose errors move together over the folds: each alone spreads widely, their difference
    hardly at all, and the paired verdict sees what the unpaired spreads hide."""
    from worldmodel.reward_report import TRUE_STATES, paired_differences, paired_table, summarize, verdict

    nan = float("nan")

    def folds(predicted: list[float]) -> np.ndarray:  # null error 1 everywhere: the ratio is the error itself
        return np.array([[[nan, 0.5, value], [nan, 1.0, 1.0]] for value in predicted])

    struct = summarize(folds([0.2, 0.9, 0.5]), num_observed=2)
    cnn = summarize(folds([0.3, 1.0, 0.55]), num_observed=2)
    np.testing.assert_allclose(struct.predicted_folds, [0.2, 0.9, 0.5])
    results = {"cheetah": {"struct": struct, "cnn": cnn, TRUE_STATES: summarize(folds([0.0, 0.0, 0.0]), 2)}}
    # unpaired, the gap (0.083) is far inside either model's spread over folds (~0.29)
    assert abs(struct.predicted_mean - cnn.predicted_mean) < struct.predicted_std
    difference = paired_differences(results, "struct", "cnn")["cheetah"]
    deltas = np.array([-0.1, -0.1, -0.05])
    assert np.isclose(difference.mean, deltas.mean()) and np.isclose(difference.std, deltas.std())
    assert (difference.first_lower, difference.folds) == (3, 3)
    assert verdict(difference) == "lower"
    assert verdict(paired_differences(results, "cnn", "struct")["cheetah"]) == "higher"
    table = paired_table(results)
    assert "| cheetah | -0.083 ± 0.024 | 3 of 3 | lower |" in table
    assert "struct lower beyond the paired spread on 1 of 1 tasks." in table
    assert paired_table({"cheetah": {"struct": struct, TRUE_STATES: cnn}}) == ""  # one world model: no pairs


def test_a_fit_job_runs_on_one_thread_whatever_the_caller_set_and_gives_the_same_result(tmp_path, monkeypatch) -> None:
    # The thread count changes the order of floating-point sums, which moved an acrobot fold 2x: a fit's
    # result must not depend on how many threads the machine (or the caller) uses.
    from worldmodel import reward_jobs
    from worldmodel.hidden_states import WindowFeatures, save_features

    inputs, episodes = synthetic_windows(200, 12, 8, seed=4)
    rewards = torch.sigmoid(torch.roll(inputs, shifts=-1, dims=1)[..., 0])
    features = WindowFeatures(inputs, rewards, torch.zeros(200, 12, 6), torch.zeros(200, 12, 2), episodes)
    save_features(tmp_path / "task.npz", features)
    train, test = episode_folds(episodes, num_folds=5, seed=0)[0]
    config = RewardTrainConfig(epochs=3, batch_size=64, patience=5, seed=0)
    threads_in_fit: list[int] = []
    real_fit = reward_jobs.fit_reward_predictor

    def recording_fit(*args, **kwargs):
        threads_in_fit.append(torch.get_num_threads())
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(reward_jobs, "fit_reward_predictor", recording_fit)
    caller_threads = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            job = reward_jobs.FitJob("task", "model", tmp_path / "task.npz", "hidden", 0, train, test,
                                     tmp_path / f"result-{threads}.npy")  # fmt: skip
            results.append(reward_jobs.run_fit_job(job, config))
            assert torch.get_num_threads() == threads  # the caller's setting is restored
            np.testing.assert_array_equal(np.load(job.result), results[-1])
    finally:
        torch.set_num_threads(caller_threads)
    assert threads_in_fit == [reward_jobs.FIT_THREADS] * 2 == [1, 1]
    np.testing.assert_array_equal(results[0], results[1])


def test_a_fit_runs_on_one_thread_for_every_caller_and_its_weights_do_not_depend_on_the_callers_count(
    monkeypatch,
) -> None:
    # Not only the reward experiment's jobs: downstream/loop.py fits in its own process with the machine's
    # thread count, so the pin has to live in the fit itself.
    from worldmodel import reward

    inputs, episodes = synthetic_windows(120, 10, 6, seed=5)
    rewards = torch.sigmoid(torch.roll(inputs, shifts=-1, dims=1)[..., 1])
    config = RewardTrainConfig(epochs=3, batch_size=32, patience=5, seed=0)
    threads_in_fit: list[int] = []
    real_evaluate = reward.evaluate_mse

    def recording_evaluate(*args, **kwargs):  # called once before and once per epoch, inside the fit
        threads_in_fit.append(torch.get_num_threads())
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(reward, "evaluate_mse", recording_evaluate)
    caller_threads = torch.get_num_threads()
    weights = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            fit = reward.fit_reward_predictor(inputs, rewards, episodes, config)
            assert torch.get_num_threads() == threads  # the caller's setting is restored
            weights.append(fit.predictor.state_dict())
    finally:
        torch.set_num_threads(caller_threads)
    assert len(threads_in_fit) == 2 * (1 + 3) and set(threads_in_fit) == {reward.FIT_THREADS} == {1}
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)
