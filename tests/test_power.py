"""lab.tables.stats.mde / seeds_needed against simulated experiments whose answer is known.

Each simulation runs 20000 experiments with a fixed numpy seed (about a second). The Monte Carlo
standard error of an empirical power near 0.8 is sqrt(0.8 · 0.2 / 20000) = 0.0028.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from lab.tables import stats

REPS = 20_000
ALPHA, POWER = 0.05, 0.8


@pytest.mark.parametrize("n", [3, 5, 10])
def test_mde_gives_80_percent_power_to_the_paired_t_test(n: int) -> None:
    """Seed noise only (s_img = 0): n seed pairs, B − A ~ N(MDE, sigma²) per pair, paired t-test at 5%.

    MDE uses the exact noncentral-t root, so the power is 0.8 up to Monte Carlo noise: tolerance
    0.012 (4 standard errors). The textbook (t_{1−α/2} + t_{1−β}) · sigma / sqrt(n) is measurably
    low at n = 3 (0.766 analytically), which is why mde solves with scipy.stats.nct.
    """
    rng = np.random.default_rng(n)
    sigma = 1.3
    delta = stats.mde(sigma, 0.0, n)
    assert delta is not None

    def power(true_delta: float) -> float:
        a = rng.normal(40.0, 2.0, (REPS, n))  # the seed moves both rows (paired), plus its own noise on B − A
        b = a + true_delta + rng.normal(0.0, sigma, (REPS, n))
        return float(np.mean(sps.ttest_rel(b, a, axis=1).pvalue < ALPHA))

    assert power(delta) == pytest.approx(POWER, abs=0.012)
    textbook = (sps.t.ppf(1 - ALPHA / 2, n - 1) + sps.t.ppf(POWER, n - 1)) * sigma / math.sqrt(n)
    assert textbook < delta
    if n == 3:
        assert power(textbook) < 0.78


@pytest.mark.parametrize(("n", "s_seed", "s_img", "tol"), [
    (3, 1.0, 0.5, 0.04), (5, 1.0, 0.5, 0.015), (10, 1.0, 0.5, 0.015), (3, 0.3, 1.0, 0.015),
])
def test_mde_with_a_shared_image_component(n: int, s_seed: float, s_img: float, tol: float) -> None:
    """Every seed is scored on the same val images: d_s = delta + e_s + v, e_s ~ N(0, s_seed²) per pair,
    v ~ N(0, s_img²) once per experiment (shared), s_img known (the image bootstrap's SD).

    Test: T = mean(d) / sqrt(sd(d)² / n + s_img²) against t with the Welch–Satterthwaite dof
    ν = (n − 1) · (sd²/n + s_img²)² / (sd²/n)², the test whose power :func:`lab.tables.stats.mde` solves for.
    Tolerance: Monte Carlo (0.0028) plus the Satterthwaite approximation, which under-powers by up
    to 0.035 at n = 3 with comparable seed and image parts and is within 0.01 from n = 5 or when
    either part dominates.
    """
    rng = np.random.default_rng(100 + n)
    delta = stats.mde(s_seed, s_img, n)
    assert delta is not None
    d = delta + rng.normal(0.0, s_seed, (REPS, n)) + rng.normal(0.0, s_img, (REPS, 1))
    seed_var = d.var(axis=1, ddof=1) / n
    dof = (n - 1) * (seed_var + s_img**2) ** 2 / seed_var**2
    t = d.mean(axis=1) / np.sqrt(seed_var + s_img**2)
    assert float(np.mean(np.abs(t) > sps.t.ppf(1 - ALPHA / 2, dof))) == pytest.approx(POWER, abs=tol)
    # the image part does not shrink with seeds: MDE(n) > its infinite-seed limit λ(∞) · s_img
    limit = stats.seeds_needed(1.0, s_seed, s_img).mde_limit
    assert limit == pytest.approx((sps.norm.ppf(1 - ALPHA / 2) + sps.norm.ppf(POWER)) * s_img, rel=1e-3)
    assert delta > limit


def test_mde_unknown_with_one_seed_and_formula_limits() -> None:
    assert stats.mde(None, 0.3, 1) is None and stats.mde(1.0, 0.3, 1) is None
    assert stats.mde(0.0, 0.0, 3) == 0.0  # no noise at all: any effect is detectable
    assert stats.mde(0.0, 0.5, 3) == pytest.approx(stats.mde(0.0, 0.5, 30))  # no seed noise: seeds do not help
    assert stats.mde(1.0, 0.5, 10**6) == pytest.approx(2.8016 * 0.5, rel=1e-3)
    values = [stats.mde(1.0, 0.2, n) for n in range(2, 40)]
    assert all(x > y for x, y in zip(values, values[1:]))  # more seeds, smaller MDE


def test_seeds_needed() -> None:
    s_seed, s_img = 1.2, 0.15
    got = stats.seeds_needed(-0.6, s_seed, s_img)  # the sign of the target does not matter
    assert got.n is not None and got.reason == ""
    assert stats.mde(s_seed, s_img, got.n) <= 0.6 < stats.mde(s_seed, s_img, got.n - 1)
    # image sampling alone hides 0.4: MDE >= 2.80 · 0.15 = 0.42 with any number of seeds
    hopeless = stats.seeds_needed(0.4, s_seed, s_img)
    assert hopeless.n is None and hopeless.reason.startswith("val set too small") and hopeless.mde_limit > 0.4
    capped = stats.seeds_needed(0.6, s_seed, s_img, cap=got.n - 1)
    assert capped.n is None and capped.reason == f"more than {got.n - 1} seeds"
    assert stats.seeds_needed(0.6, None, s_img).n is None  # one seed: unknown
    assert stats.seeds_needed(0.6, 0.0, 0.1).n == 2  # no seed noise: the smallest n with a known variance


@pytest.mark.medium
@pytest.mark.parametrize("n, s_seed, s_img", [(3, 1.0, 0.1), (3, 0.3, 1.0), (5, 1.0, 0.5)])
def test_the_two_level_interval_covers_the_true_delta(n: int, s_seed: float, s_img: float) -> None:
    """Simulated tables: the val set's image error e (shared by every seed) and each seed's own error;
    the image resamples scatter around the observed deltas with SD s_img. The 95% interval must
    contain the true delta about 95% of the time (a percentile interval over 3 seeds: ~78%)."""
    rng = np.random.default_rng(11)
    delta, hits, trials = 0.5, 0, 1000
    for _ in range(trials):
        d = delta + rng.normal(0, s_img) + rng.normal(0, s_seed, n)
        big = d[:, None] + rng.normal(0, s_img, 200)[None, :]
        ci = stats.two_level_bootstrap(d, big, n_boot=200)
        hits += ci.lo <= delta <= ci.hi
    assert 0.93 <= hits / trials <= 1.0, hits / trials
