"""Does validation select what the test would? Pure statistics over a sweep's trials.

A sweep optimises a validation metric; the test split is only reported. These functions
say how far that choice can be trusted:

    kendall_tau_b(val, test)         rank agreement of validation and test over trials, ties handled
    bootstrap_tau_interval(...)      seeded 95 % percentile interval of τ, trials resampled
    stratified_tau(val, test)        τ pooled over seeds, counting only pairs within a seed
    permutation_p_value(val, test)   how often test values shuffled within seeds agree as well
    stratified_tau_interval(...)     percentile interval, configurations resampled within seeds
    regret_on_test(val, test, mode)  test points lost by taking the validation-best trial
    noise_verdict(Δ, s_row, s_def, n)  is an ablation row's Δ to the default row beyond seed noise?
    is_saturated(values, seed_stds)  does the selection metric separate the trials at all?
    pareto_front(points, modes)      the trials no other trial beats on every objective

Metrics are on the scale MLflow stores them (0-1; reports print points = 100 x).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Literal

import numpy as np

HALF_POINT = 0.005  # half a report point on the stored 0-1 scale: the smallest spread one seed can resolve


def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"expected two sequences of equal length, got shapes {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("the sequences contain NaN: leave out the trials without both values")
    return a, b


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b = (C - D) / √((n₀ - n₁)(n₀ - n₂)): C, D the concordant and discordant
    pairs, n₀ = n(n-1)/2 all pairs, n₁ and n₂ the pairs tied in x and in y. NaN when there
    are fewer than two values or one sequence is constant (τ is undefined)."""
    a, b = _paired(x, y)
    upper = np.triu_indices(len(a), k=1)  # every pair i < j once
    sign_x = np.sign(a[:, None] - a[None, :])[upper]
    sign_y = np.sign(b[:, None] - b[None, :])[upper]
    untied_x, untied_y = np.count_nonzero(sign_x), np.count_nonzero(sign_y)  # n₀ - n₁, n₀ - n₂
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    # A pair tied in either sequence has sign 0 and adds to neither C nor D.
    return float(np.sum(sign_x * sign_y) / np.sqrt(float(untied_x) * float(untied_y)))


def bootstrap_tau_interval(x: Sequence[float], y: Sequence[float], seed: int, resamples: int = 1000,
                           level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of τ-b over ``resamples`` bootstrap resamples of the trials
    (indices drawn with replacement, pairs kept together), seeded. None for fewer than 3
    trials, or when no resample has a defined τ."""
    a, b = _paired(x, y)
    if len(a) < 3:
        return None
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    taus = np.array([kendall_tau_b(a[i], b[i]) for i in rng.integers(0, len(a), size=(resamples, len(a)))])
    taus = taus[~np.isnan(taus)]  # resamples that drew one trial over and over
    if len(taus) == 0:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(taus, [tail, 100 - tail])
    return float(low), float(high)


def _pair_signs(x: np.ndarray) -> np.ndarray:
    upper = np.triu_indices(len(x), k=1)
    return np.sign(x[:, None] - x[None, :])[upper]


def stratified_tau(validation: Sequence[Sequence[float]], test: Sequence[Sequence[float]]) -> float:
    """Kendall's τ-b pooled over strata (one per training seed; in each, one value per
    configuration): concordant minus discordant pairs, and the untied pairs of each
    sequence, summed over the pairs *within* each seed, so that one seed's better models
    do not count as agreement. NaN when every stratum is constant in one sequence."""
    num = untied_x = untied_y = 0.0
    for x, y in zip(validation, test, strict=True):
        a, b = _paired(x, y)
        sx, sy = _pair_signs(a), _pair_signs(b)
        num += float(np.sum(sx * sy))
        untied_x += np.count_nonzero(sx)
        untied_y += np.count_nonzero(sy)
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    return num / float(np.sqrt(untied_x * untied_y))


def permutation_p_value(validation: Sequence[Sequence[float]], test: Sequence[Sequence[float]], seed: int,
                        permutations: int = 10_000) -> float:
    """One-sided p-value of :func:`stratified_tau`: the share of permutations (test values
    shuffled within each seed, seeded) whose τ is at least the observed one, counting the
    observed arrangement itself ((k + 1) / (permutations + 1)). Small: validation ranks the
    configurations as the test does more often than chance would."""
    observed = stratified_tau(validation, test)
    if np.isnan(observed):
        return float("nan")
    rng = np.random.default_rng(seed)
    strata = [np.asarray(t, dtype=np.float64) for t in test]
    hits = sum(stratified_tau(validation, [rng.permutation(t) for t in strata]) >= observed - 1e-12 for _ in range(permutations))
    return (hits + 1) / (permutations + 1)


def stratified_tau_interval(validation: Sequence[Sequence[float]], test: Sequence[Sequence[float]], seed: int,
                            resamples: int = 2000, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of :func:`stratified_tau` over bootstrap resamples of the
    configurations within each seed (indices drawn with replacement, pairs kept together),
    seeded; None when no resample has a defined τ."""
    vals = [np.asarray(v, dtype=np.float64) for v in validation]
    tests = [np.asarray(t, dtype=np.float64) for t in test]
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(resamples):
        picks = [rng.integers(0, len(v), size=len(v)) for v in vals]
        taus.append(stratified_tau([v[i] for v, i in zip(vals, picks)], [t[i] for t, i in zip(tests, picks)]))
    taus = np.asarray(taus)
    taus = taus[~np.isnan(taus)]
    if len(taus) == 0:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(taus, [tail, 100 - tail])
    return float(low), float(high)


def regret_on_test(validation: Sequence[float], test: Sequence[float], mode: Literal["max", "min"]) -> float:
    """How much worse, on the test metric, the trial with the best validation metric is
    than the test-best trial (>= 0; 0 = validation picked a test-best trial). ``mode``
    is the direction both metrics improve in. Ties in validation pick the first trial,
    as a searcher reporting its best trial would."""
    val, tst = _paired(validation, test)
    if len(val) == 0:
        raise ValueError("no trials")
    if mode == "max":
        return float(tst.max() - tst[np.argmax(val)])
    if mode == "min":
        return float(tst[np.argmin(val)] - tst.min())
    raise ValueError(f"mode must be one of max, min, got {mode!r}")


class NoiseVerdict(str, Enum):
    WITHIN_NOISE = "within noise"
    SIGNIFICANT = "significant"
    NOT_AVAILABLE = "n/a"  # one seed: no spread to compare with


def noise_verdict(delta: float, row_std: float, default_std: float, seeds: int) -> NoiseVerdict:
    """Whether a row's Δ to the default row exceeds twice the standard error of the
    difference of two means over ``seeds`` seeds each: |Δ| < 2 √(s²_row/n + s²_default/n)
    is "within noise". s are the per-row standard deviations over seeds."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if seeds == 1:
        return NoiseVerdict.NOT_AVAILABLE
    margin = 2 * np.sqrt(row_std**2 / seeds + default_std**2 / seeds)
    return NoiseVerdict.WITHIN_NOISE if abs(delta) < margin else NoiseVerdict.SIGNIFICANT


def is_saturated(values: Sequence[float], seed_stds: Sequence[float] | None = None, min_spread: float = HALF_POINT) -> bool:
    """Whether a selection metric fails to separate the trials: its spread across trials
    (max - min) is below the seed noise (the mean over rows of the std over seeds; pass
    ``seed_stds`` when there are several seeds), or, with one seed (``seed_stds`` None or
    empty), below ``min_spread``. A saturated metric (e.g. validation AUROC 1.0 for every
    trial) selects by accident."""
    spread_values = np.asarray(values, dtype=np.float64)
    if spread_values.size == 0:
        raise ValueError("no trials")
    spread = float(spread_values.max() - spread_values.min())
    if seed_stds is not None and len(seed_stds) > 0:
        return spread < float(np.mean(seed_stds))
    return spread < min_spread


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[Literal["max", "min"]]) -> list[int]:
    """Indices (ascending) of the non-dominated points of a multi-objective search: point
    a dominates b when a is at least as good on every objective and strictly better on
    one ("good" per objective by its mode). Equal points are all kept."""
    values = np.asarray(points, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(modes):
        raise ValueError(f"expected one value per objective ({len(modes)}) for each point, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("a point has NaN: leave out the trials without every objective")
    unknown = [m for m in modes if m not in ("max", "min")]
    if unknown:
        raise ValueError(f"mode must be max or min, got {unknown[0]!r}")
    gain = values * np.where(np.asarray(modes) == "max", 1.0, -1.0)  # larger is better everywhere
    front = []
    for i, row in enumerate(gain):
        dominated = ((gain >= row).all(axis=1) & (gain > row).any(axis=1)).any()
        if not dominated:
            front.append(i)
    return front
