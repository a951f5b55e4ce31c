"""Selection statistics (orchestrator/selection_stats.py) on hand-made numbers, and the Optuna
sampler a sweep searches with (orchestrator/search_space.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.search_space import startup_trials, tpe_sampler
from orchestrator.selection_stats import (
    NoiseVerdict,
    bootstrap_tau_interval,
    is_saturated,
    kendall_tau_b,
    noise_verdict,
    pareto_front,
    regret_on_test,
)

# ---------------------------------------------------------------------------- Kendall's τ-b


def test_tau_without_ties_by_hand():
    # x rises throughout; y's 10 pairs: (1,2) (1,3) (4,5) discordant, the other 7 concordant.
    assert kendall_tau_b([1, 2, 3, 4, 5], [3, 1, 2, 5, 4]) == pytest.approx((7 - 3) / 10)
    assert kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0


def test_tau_b_with_ties_by_hand():
    # Pairs: (1,2) (1,3) (1,4) concordant, (2,4) discordant, (2,3) tied in x, (3,4) tied in y:
    # τ-b = (3 - 1) / √((6 - 1)(6 - 1)) = 0.4 (τ-a would divide by all 6 pairs: 0.33).
    assert kendall_tau_b([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(0.4)


def test_tau_b_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.integers(0, 4, 9).astype(float), rng.integers(0, 4, 9).astype(float)  # plenty of ties
        assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic)
    x = [0.91, 0.93, 0.88, 0.97]
    y = [0.80, 0.79, 0.85, 0.90]
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)


def test_tau_undefined_and_bad_input():
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))  # one sequence constant
    assert math.isnan(kendall_tau_b([1], [2]))
    with pytest.raises(ValueError, match="equal length"):
        kendall_tau_b([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        kendall_tau_b([1, float("nan")], [1, 2])


def test_bootstrap_interval_is_seeded_and_brackets_tau():
    x = [0.90, 0.92, 0.85, 0.97, 0.88, 0.95, 0.91]
    y = [0.80, 0.83, 0.78, 0.90, 0.79, 0.84, 0.86]
    interval = bootstrap_tau_interval(x, y, seed=3)
    assert interval == bootstrap_tau_interval(x, y, seed=3)
    assert interval != bootstrap_tau_interval(x, y, seed=4)
    low, high = interval
    assert -1 <= low <= kendall_tau_b(x, y) <= high <= 1
    # Perfect agreement stays perfect in every resample that has a defined τ.
    assert bootstrap_tau_interval([1, 2, 3, 4], [5, 6, 7, 8], seed=0) == (1.0, 1.0)
    assert bootstrap_tau_interval([1, 2], [1, 2], seed=0) is None  # fewer than 3 trials


# ---------------------------------------------------------------------------- regret, noise, saturation


def test_regret_on_test_max_and_min():
    val = [0.90, 0.95, 0.80]
    test = [0.85, 0.70, 0.88]
    # max: validation picks trial 1 (test 0.70); the test-best is 0.88.
    assert regret_on_test(val, test, "max") == pytest.approx(0.18)
    # min (e.g. a loss): validation picks trial 2 (test 0.88); the test-best (min) is 0.70.
    assert regret_on_test(val, test, "min") == pytest.approx(0.18)
    assert regret_on_test([0.5, 0.7], [0.6, 0.9], "max") == 0.0
    assert regret_on_test([0.9, 0.9], [0.6, 0.8], "max") == pytest.approx(0.2)  # a tie picks the first trial
    with pytest.raises(ValueError, match="max, min"):
        regret_on_test(val, test, "best")


def test_noise_verdict():
    # 2 √(0.01²/4 + 0.02²/4) = 2 √(0.000125) ≈ 0.02236
    assert noise_verdict(0.02, 0.01, 0.02, seeds=4) is NoiseVerdict.WITHIN_NOISE
    assert noise_verdict(-0.023, 0.01, 0.02, seeds=4) is NoiseVerdict.SIGNIFICANT
    assert noise_verdict(0.5, 0.0, 0.0, seeds=1) is NoiseVerdict.NOT_AVAILABLE
    assert noise_verdict(0.5, 0.0, 0.0, seeds=1) == "n/a"  # the strings reports print
    assert NoiseVerdict.WITHIN_NOISE == "within noise" and NoiseVerdict.SIGNIFICANT == "significant"


def test_saturation():
    # One seed: a spread under half a point (0.005 on the stored 0-1 scale) is saturated.
    assert is_saturated([1.0, 1.0, 0.998])
    assert not is_saturated([0.91, 0.93, 0.90])
    # Several seeds: compared with the mean std over rows instead.
    assert is_saturated([0.91, 0.93, 0.90], seed_stds=[0.03, 0.05])  # spread 0.03 < seed noise 0.04
    assert not is_saturated([0.91, 0.93, 0.90], seed_stds=[0.01, 0.02])


# ---------------------------------------------------------------------------- Pareto front


def test_pareto_front_by_hand():
    # (validation AUROC max, images/s max): b beats d on both; a, b, c trade one for the other.
    points = [[0.99, 2.0], [0.95, 5.0], [0.90, 9.0], [0.94, 4.0], [0.90, 9.0]]
    assert pareto_front(points, ["max", "max"]) == [0, 1, 2, 4]  # equal points are both kept
    # latency is minimised: 40 ms beats 50 ms at the same AUROC
    assert pareto_front([[0.9, 50.0], [0.9, 40.0], [0.8, 10.0]], ["max", "min"]) == [1, 2]
    assert pareto_front([[1.0, 1.0]], ["max", "min"]) == [0]


def test_pareto_front_bad_input():
    with pytest.raises(ValueError, match="one value per objective"):
        pareto_front([[1.0, 2.0]], ["max"])
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([[1.0, float("nan")]], ["max", "max"])
    with pytest.raises(ValueError, match="max or min"):
        pareto_front([[1.0, 2.0]], ["max", "up"])


# ---------------------------------------------------------------------------- the Optuna sampler


def test_tpe_sampler_for_a_12_trial_space():
    sampler = tpe_sampler(num_samples=12, seed=7)
    assert type(sampler).__name__ == "TPESampler"
    assert sampler._n_startup_trials == 4  # 8 of the 12 trials are proposed by TPE, not 2
    assert startup_trials(8) == 2 and startup_trials(2) == 2 and startup_trials(30) == 10


def test_tpe_sampler_is_seeded():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def proposals(seed: int) -> list[float]:
        study = optuna.create_study(sampler=tpe_sampler(num_samples=6, seed=seed))
        study.optimize(lambda trial: (trial.suggest_float("x", 0, 1) - 0.3) ** 2, n_trials=6)
        return [t.params["x"] for t in study.trials]

    assert proposals(1) == proposals(1)
    assert proposals(1) != proposals(2)


def test_stratified_tau_counts_pairs_within_seeds_only():
    from orchestrator.selection_stats import stratified_tau

    # within each seed validation and test agree perfectly; across seeds the levels differ
    # (seed 1's models are better on the test, worse on validation): only within-seed pairs count
    val = [[0.1, 0.2, 0.3], [0.0, 0.05, 0.06]]
    test = [[0.5, 0.6, 0.7], [0.9, 0.95, 0.99]]
    assert stratified_tau(val, test) == pytest.approx(1.0)
    # by hand: seed 0 has C=3, D=0; seed 1 (reversed test) C=0, D=3; 6 untied pairs each way
    assert stratified_tau(val, [[0.5, 0.6, 0.7], [0.99, 0.95, 0.9]]) == pytest.approx(0.0)
    # a tie in seed 0's validation: 2 untied validation pairs there
    tau = stratified_tau([[0.1, 0.1, 0.3], [0.0, 0.05, 0.06]], test)
    assert tau == pytest.approx((2 + 3) / math.sqrt((2 + 3) * (3 + 3)))
    assert math.isnan(stratified_tau([[1, 1], [2, 2]], [[0, 1], [0, 1]]))


def test_permutation_p_value_and_interval():
    from orchestrator.selection_stats import permutation_p_value, stratified_tau_interval

    val = [list(range(8)), list(range(8)), list(range(8))]
    agree = [[v + 0.1 * k for v in range(8)] for k in range(3)]
    p = permutation_p_value(val, agree, seed=0, permutations=2000)
    assert p < 0.001  # perfect agreement in three seeds of eight: chance almost never does that
    shuffled = [[3, 7, 0, 5, 1, 6, 2, 4], [6, 1, 4, 0, 7, 2, 5, 3], [2, 5, 7, 1, 0, 4, 6, 3]]
    assert permutation_p_value(val, shuffled, seed=0, permutations=2000) > 0.05
    low, high = stratified_tau_interval(val, agree, seed=0, resamples=500)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    low, high = stratified_tau_interval(val, shuffled, seed=0, resamples=500)
    assert low < 0 < high
