"""Uncertainty of metric differences: over seeds (Student t) and over val images (paired bootstrap).

Pure numpy/scipy over :mod:`detector.evaluate`'s matching; no MLflow (``lab.tables`` and
``lab.tables.compare`` fetch the runs). Metrics are in **percent**, like everywhere in detlab.

Questions and the functions that answer them:

* :func:`seed_paired_ci` — does the gain survive a different training seed? Paired over seeds,
  Student t on the per-seed differences.
* :func:`two_level_bootstrap` — does it survive a different seed *and* a different draw of val
  images? Seed pairs are resampled, then val images (with replacement), and *both* runs of a pair
  are re-scored on the *same* image resample, so image difficulty cancels out of the difference.
  :func:`paired_bootstrap` is the same for one pair of runs (images only).
* :func:`prob_better` — P(B > A): how often a run of B beats the paired run of A.
* :func:`mde` / :func:`seeds_needed` — the smallest delta this design detects (80% power), and the
  seeds needed to detect a given one.
* :func:`verdict` — replicated / contradicted / not replicated / underpowered, for a paper's delta.

The bootstrap matches detections to ground truth once per run and re-scores image resamples by
weighting: :mod:`lab.tables.resampling`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sstats
from scipy.optimize import brentq

from lab.tables.resampling import (
    BOOTSTRAP_SEED, N_RESAMPLES, Matches, check_pairable, full_metric, resample_counts, resampled_metric,
)


__all__ = [
    "CONTRADICTED",
    "NOT_REPLICATED",
    "REPLICATED",
    "UNDERPOWERED",
    "UNDERPOWERED_ONE_SEED",
    "SeedsNeeded",
    "Stat",
    "TwoLevelCI",
    "mde",
    "paired_bootstrap",
    "prob_better",
    "seed_paired_ci",
    "seeds_needed",
    "summarize",
    "two_level_bootstrap",
    "verdict",
]

#: replicates of the two-level (seeds x images) bootstrap
N_TWO_LEVEL = 10_000


# --------------------------------------------------------------------------------------------
# over seeds


@dataclass(frozen=True)
class Stat:
    """Mean and CI half-width of one quantity over seeds (``ci95`` None when n < 2).

    ``ci95`` is the half-width at the level asked for (95% unless a caller says otherwise).
    """

    mean: float
    ci95: float | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        """True when the CI ``mean ± ci95`` lies strictly on one side of 0."""
        return self.ci95 is not None and math.isfinite(self.ci95) and abs(self.mean) > self.ci95


def summarize(values: Sequence[float], level: float = 0.95) -> Stat | None:
    """Mean ± Student-t CI half-width (n−1 dof) of ``values`` ``[n]``; None for no values."""
    n = len(values)
    if n == 0:
        return None
    mean = math.fsum(values) / n
    if n == 1:
        return Stat(mean, None, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Stat(mean, float(sstats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n), n)


def seed_paired_ci(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Stat | None:
    """Mean over the seeds both have of ``b[s] − a[s]``, with a Student-t CI of those differences.

    ``a``/``b``: seed → metric (percent). The CI half-width is ``t(0.5 + level/2, n−1) · sd / √n``
    of the n paired differences; None when n < 2 (a single pair says nothing about seed noise).
    Returns None when no seed is shared.
    """
    shared = sorted(set(a) & set(b))
    return summarize([b[s] - a[s] for s in shared], level)


# --------------------------------------------------------------------------------------------
# matching once per run


# --------------------------------------------------------------------------------------------
# metric of weighted (resampled) image sets


# --------------------------------------------------------------------------------------------
# two-level (seeds x val images) bootstrap of a delta, and P(B > A)


@dataclass(frozen=True)
class TwoLevelCI:
    """``metric(B) − metric(A)`` (percent points) over n seed pairs, from :func:`two_level_bootstrap`.

    ``delta``: mean over the pairs of the full-set deltas; ``lo``/``hi``: percentile interval at
    ``level`` of the two-level replicates, ``se`` their SD (``n_boot`` replicates, NaN ones left out);
    ``n_resamples``: image resamples per pair (J); ``seed_variance_known``: n_pairs >= 2 (with one
    pair the interval is the image-only one); ``p_better``: P(B > A) (:func:`prob_better`);
    ``s_seed``: SD (n−1 dof) of the pairs' full-set deltas, None for one pair; ``s_img``: SD over the
    image resamples of the pair-mean delta; ``mde``: :func:`mde` of those at alpha = 1 − level, power 0.8.
    """

    delta: float
    lo: float
    hi: float
    se: float
    n_pairs: int
    n_resamples: int
    level: float
    seed_variance_known: bool
    p_better: float
    s_seed: float | None
    s_img: float
    mde: float | None
    n_boot: int

    @property
    def interval_excludes_zero(self) -> bool:
        """The interval lies strictly on one side of 0 (with one pair: image sampling only)."""
        return self.lo > 0.0 or self.hi < 0.0

    @property
    def excludes_zero(self) -> bool:
        """The tables' †: the interval excludes 0 *and* covers seed noise (n_pairs >= 2)."""
        return self.seed_variance_known and self.interval_excludes_zero


def prob_better(resampled_deltas: np.ndarray) -> float:
    """P(B > A) (Bouthillier et al., MLSys 2021, arXiv 2103.03098): the probability that a run of B
    beats the paired run of A (same seed) on a random draw of the val set.

    ``resampled_deltas`` D ``[n, J]``: metric(B) − metric(A) of seed pair s on image resample j.
    Estimate: the share of outcomes D[s, j] > 0 over all s and j, a tie (D = 0) counting 1/2; NaN
    outcomes (no GT drawn) are left out. 0.5 = a coin flip; NaN when no outcome is finite.
    """
    d = np.asarray(resampled_deltas, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return math.nan
    return float((np.count_nonzero(d > 0) + 0.5 * np.count_nonzero(d == 0)) / d.size)


def two_level_bootstrap(full_deltas: Sequence[float], resampled_deltas: np.ndarray, level: float = 0.95,
                        n_boot: int = N_TWO_LEVEL, seed: int = BOOTSTRAP_SEED,
                        shared_images: bool = True) -> TwoLevelCI:
    """Bootstrap of the seed-mean delta over both seeds and val images.

    ``full_deltas`` ``[n]``: d_s = metric(B, seed s) − metric(A, seed s) on the full val set, one per
    seed pair (the seeds both rows have). ``resampled_deltas`` D ``[n, J]``: the same delta on image
    resample j, every pair on the *same* J resamples (one :func:`resample_counts` matrix), both runs
    of a pair re-scored on it.

    Replicate b: draw n seed pairs s_1..s_n with replacement, then an image resample for them;
    θ_b = mean_k D[s_k, j_b]. ``shared_images`` (default): one j_b for all drawn pairs, because every
    seed is evaluated on the same val images, so their image-sampling error is shared and does not
    average out over seeds (a crossed seeds x images design). ``shared_images=False``: an independent
    j_{b,k} per drawn pair (nested design, for when each seed has its own val draw); on our shared val
    sets it shrinks the image part by 1/n and under-covers. With one pair θ = D[0, :] (each resample
    once: the image-only bootstrap, which a random draw of j would only subsample).

    ``se`` = SD(θ), ``delta`` = mean(d_s), ``p_better`` from D (:func:`prob_better`).

    The interval (n >= 2) is ``delta ± t_{1−α/2,ν} · se_n`` with se_n = sqrt(s_seed²/n + s_img²) and
    ν the Welch–Satterthwaite dof of :func:`mde` (the same test the MDE is computed for), not the
    percentiles of θ: a bootstrap over n = 3 seed values has the plug-in (n−1)/n variance and normal
    tails instead of t_{n−1}'s, and its nominal 95% interval covered the true delta only ~78% of the
    time in simulation (85% at 5 seeds, 92% at 10) against 95-100% for this one
    (tests/test_power.py). With one pair (seed variance unknown) ``lo``/``hi`` are the percentiles
    of the image-only bootstrap.
    """
    d = np.asarray(full_deltas, dtype=np.float64)
    big = np.asarray(resampled_deltas, dtype=np.float64)
    if d.ndim != 1 or d.size < 1 or big.ndim != 2 or big.shape[0] != d.size or big.shape[1] < 1:
        raise ValueError(f"need full_deltas [n] and resampled_deltas [n, J] with n, J >= 1, got {d.shape} and "
                         f"{big.shape}")
    n, n_img = big.shape
    if n == 1:
        reps = big[0]
    else:
        rng = np.random.default_rng([seed, 1])  # a stream apart from resample_counts(seed)'s
        pairs = rng.integers(0, n, size=(n_boot, n))
        cols = rng.integers(0, n_img, size=(n_boot, 1) if shared_images else (n_boot, n))
        reps = big[pairs, cols].mean(axis=1)  # cols [B, 1] broadcasts over the n drawn pairs
    reps = reps[~np.isnan(reps)]
    alpha = (1.0 - level) / 2
    pooled = big.mean(axis=0)
    pooled = pooled[~np.isnan(pooled)]
    s_img = float(np.std(pooled, ddof=1)) if pooled.size > 1 else math.nan
    s_seed = float(np.std(d, ddof=1)) if n >= 2 else None
    if s_seed is not None and math.isfinite(s_img):
        half = _t_half_width(s_seed, s_img, n, level)
        lo, hi = float(np.mean(d)) - half, float(np.mean(d)) + half
    else:
        lo, hi = np.quantile(reps, [alpha, 1.0 - alpha]) if reps.size else (math.nan, math.nan)
    return TwoLevelCI(
        delta=float(np.mean(d)), lo=float(lo), hi=float(hi),
        se=float(np.std(reps, ddof=1)) if reps.size > 1 else math.nan,
        n_pairs=n, n_resamples=n_img, level=level, seed_variance_known=n >= 2, p_better=prob_better(big),
        s_seed=s_seed, s_img=s_img, mde=mde(s_seed, s_img, n, alpha=1.0 - level), n_boot=reps.size,
    )


def paired_bootstrap(a: Matches, b: Matches, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95) -> TwoLevelCI:
    """``metric(b) − metric(a)`` of one pair of runs with an image-level paired bootstrap CI.

    Both runs must be matched on the same val images (same ``image_ids``, same kind of metric).
    Each resample draws the images with replacement (seeded) and re-scores *both* runs on it. One
    pair: :func:`two_level_bootstrap` with n = 1, so ``seed_variance_known`` is False.
    """
    check_pairable(a, b)
    counts = resample_counts(a.image_ids.size, n_resamples, seed)
    delta_boot = resampled_metric(b, counts) - resampled_metric(a, counts)
    return two_level_bootstrap([full_metric(b) - full_metric(a)], delta_boot[None, :], level)


# --------------------------------------------------------------------------------------------
# power: minimum detectable effect, seeds needed


def _noncentrality(dof: float, alpha: float, power: float) -> float:
    """λ at which a two-sided level-``alpha`` t-test with ``dof`` degrees of freedom has ``power``:
    P(|T'| > t_{1−α/2, dof}) = power for T' ~ noncentral t(dof, λ) (normal for dof = ∞), by root finding."""
    if math.isinf(dof) or dof > 1e6:  # scipy's nct is within 1e-6 of the normal limit there
        z = float(sstats.norm.ppf(1.0 - alpha / 2))
        return float(brentq(lambda lam: sstats.norm.sf(z - lam) + sstats.norm.cdf(-z - lam) - power, 0.0, z + 10.0))
    tc = float(sstats.t.ppf(1.0 - alpha / 2, dof))

    def excess(lam: float) -> float:
        # the lower tail is < 1e-3 near the root; scipy's nct.cdf can return NaN there at dof = 1
        return float(sstats.nct.sf(tc, dof, lam) + np.nan_to_num(sstats.nct.cdf(-tc, dof, lam)) - power)

    return float(brentq(excess, 0.0, 2.0 * tc + 10.0))


def _satterthwaite(s_seed: float, s_img: float, n: int) -> tuple[float, float]:
    """(variance of the seed-mean delta, its Welch–Satterthwaite dof): var = s_seed²/n + s_img²,
    ν = (n − 1) · var² / (s_seed²/n)² (only the seed part is estimated, from n − 1 dof)."""
    seed_var = s_seed**2 / n
    var = seed_var + s_img**2
    return var, (math.inf if seed_var == 0.0 else (n - 1) * var**2 / seed_var**2)


def _t_half_width(s_seed: float, s_img: float, n: int, level: float) -> float:
    """Half-width t_{(1+level)/2, ν} · se_n of the two-level interval (ν, se_n as in :func:`mde`)."""
    var, dof = _satterthwaite(s_seed, s_img, n)
    return float(sstats.t.ppf(0.5 + level / 2, dof)) * math.sqrt(var)


def mde(s_seed: float | None, s_img: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Minimum detectable effect (percent points) of a seed-mean paired delta over ``n`` seed pairs.

    The mean delta has standard error se_n = sqrt(s_seed² / n + s_img²): ``s_seed`` = SD of the
    per-pair full-set deltas (shrinks with seeds), ``s_img`` = image-bootstrap SD of the pooled delta
    (does not: every seed is evaluated on the same val images). MDE = λ(ν) · se_n, the true delta
    that a two-sided level-``alpha`` test of delta / se_n against t_ν detects with probability ``power``:

    * ν = (n − 1) · se_n⁴ / (s_seed² / n)² (Welch–Satterthwaite: only the seed part is estimated,
      with n − 1 dof). ν = n − 1 when s_img = 0 (the paired t-test), ν → ∞ when s_seed = 0.
    * λ(ν): the noncentrality with P(|T'| > t_{1−α/2,ν}) = power, T' ~ noncentral t(ν, λ), solved
      exactly (scipy.stats.nct). The textbook λ ≈ t_{1−α/2,ν} + t_{power,ν} under-powers at small ν
      (power 0.73 at n = 2, 0.77 at n = 3, 0.79 at n = 5 instead of 0.80).

    n − 1 dof instead of ν would overstate the MDE when s_img > 0 (up to 2x at n = 3 with image noise
    dominating: the test against t_{n−1} then has a size of 0-2% at n = 3-5, not 5%); with ν the simulated
    power is 0.77-0.80 at n = 3 and within 0.01 of 0.80 from n = 5 (tests/test_power.py). None
    (unknown) when n < 2 or s_seed is None: one seed says nothing about seed noise. As n → ∞,
    MDE → λ(∞) · s_img ≈ 2.80 · s_img.
    """
    if n < 2 or s_seed is None or not (math.isfinite(s_seed) and math.isfinite(s_img)):
        return None
    var, dof = _satterthwaite(s_seed, s_img, n)
    return _noncentrality(dof, alpha, power) * math.sqrt(var)


@dataclass(frozen=True)
class SeedsNeeded:
    """:func:`seeds_needed`'s answer: ``n`` seed pairs (None: not reachable, ``reason`` says why) and
    ``mde_limit``, the MDE with infinitely many seeds (λ(∞) · s_img)."""

    n: int | None
    mde_limit: float
    reason: str = ""


def seeds_needed(target_delta: float, s_seed: float | None, s_img: float, alpha: float = 0.05, power: float = 0.8,
                 cap: int = 1000) -> SeedsNeeded:
    """The smallest n (2..``cap``) with :func:`mde` (n) <= |target_delta|.

    MDE(n) decreases with n towards λ(∞) · s_img (≈ 2.80 · s_img at alpha 0.05, power 0.8); when that
    limit is at least |target_delta|, no number of seeds is enough: the val set is too small (image
    sampling alone hides the effect). None too when ``s_seed`` is unknown (one seed) or beyond ``cap``.
    """
    target = abs(target_delta)
    limit = _noncentrality(math.inf, alpha, power) * s_img
    if s_seed is None:
        return SeedsNeeded(None, limit, "seed variance unknown (1 seed)")
    at_cap = mde(s_seed, s_img, cap, alpha, power)
    if at_cap is None or at_cap > target:
        if limit >= target:
            return SeedsNeeded(None, limit, f"val set too small: image sampling alone (SD {s_img:.2f}) gives an MDE "
                                            f"of {limit:.2f} >= {target:.2f} with any number of seeds")
        return SeedsNeeded(None, limit, f"more than {cap} seeds")
    lo, hi = 1, cap  # MDE(lo) > target (or unknown), MDE(hi) <= target; MDE(n) decreases with n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m = mde(s_seed, s_img, mid, alpha, power)
        if m is not None and m <= target:
            hi = mid
        else:
            lo = mid
    return SeedsNeeded(hi, limit)


# --------------------------------------------------------------------------------------------
# verdict of a paper claim

REPLICATED = "replicated"
CONTRADICTED = "contradicted"
NOT_REPLICATED = "not replicated"
UNDERPOWERED = "underpowered"
UNDERPOWERED_ONE_SEED = "underpowered (1 seed: seed variance unknown)"


def verdict(paper_delta: float, lo: float, hi: float, detectable: float | None) -> str:
    """What our interval [``lo``, ``hi``] of a delta says about the paper's ``paper_delta``.

    ``detectable``: our MDE (:func:`mde`), None when it is unknown (one seed). In order:

    * MDE unknown → "underpowered (1 seed: seed variance unknown)": the interval reflects image
      sampling only, so it cannot settle a claim about training;
    * the interval excludes 0 → "replicated" if its sign is the paper's, else "contradicted" (an
      interval that excludes 0 settles the sign whatever the power; a paper delta of 0 counts as no
      sign, so any such interval contradicts it);
    * it covers 0 and MDE <= |paper_delta| → "not replicated": an effect the size of the paper's
      would have been detected with 80% power;
    * it covers 0 and MDE > |paper_delta| → "underpowered".
    """
    if detectable is None:
        return UNDERPOWERED_ONE_SEED
    if lo > 0.0 or hi < 0.0:
        return REPLICATED if (lo > 0.0 and paper_delta > 0.0) or (hi < 0.0 and paper_delta < 0.0) else CONTRADICTED
    return NOT_REPLICATED if detectable <= abs(paper_delta) else UNDERPOWERED
