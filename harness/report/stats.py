"""Small statistics: seed-paired comparisons with verdicts whose error rates hold, and Pareto fronts.

A comparison of two configurations uses the seeds both have: d = a[seed] - b[seed]. Per row: the mean of d,
a 95% t-interval (df = n - 1), the two-sided paired-t p-value and an exact sign-flip permutation p-value.
Across the rows of one table the paired-t p-values are adjusted with Holm's step-down method, and a row's
verdict is ``better`` / ``worse`` when its adjusted p is below 0.05, ``undecided`` otherwise, and
``too few seeds`` below 3 common seeds. With a margin (a study's ``min_effect``), :func:`tost_p` is the
fixed-n equivalence test (two one-sided t-tests) that ``report/decisive.py`` adds to the rows.
docs/reading-reports.md explains how to read them.

The functions work on arrays along the last axis (seeds for differences, rows for Holm), so the tests'
calibration simulations run through the same code as the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
LEVEL = 0.95
MIN_SEEDS = 3
BETTER, WORSE, UNDECIDED, TOO_FEW = "better", "worse", "undecided", "too few seeds"
EXACT_SIGN_FLIP_MAX_N = 16  # 2^16 sign patterns; above that a seeded random sample of patterns
SIGN_FLIP_SAMPLES = 100_000
ZERO_SPREAD_RTOL = 1e-9  # float rounding of a - b is ~1e-16: below this the seeds agree exactly


@dataclass(frozen=True)
class TSummary:
    """Per-row results of :func:`t_summary` (arrays, or floats for one row)."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    p: np.ndarray
    n: int
    se: np.ndarray | None = None  # standard error of the mean; NaN where there is no p


def zero_spread(d: np.ndarray) -> np.ndarray:
    """True where all differences are equal (up to float rounding): the t statistic is undefined there."""
    d = np.asarray(d, float)
    scale = np.maximum(np.abs(d).max(axis=-1), 1.0)
    return np.ptp(d, axis=-1) <= ZERO_SPREAD_RTOL * scale


def t_summary(d, level: float = LEVEL) -> TSummary:
    """Mean, t-interval (df = n - 1) and two-sided one-sample t p-value of ``d`` along its last axis.

    With fewer than 2 values, or with zero spread (identical differences on every seed: t = c / 0), the
    interval and p are NaN: the data carry no estimate of seed noise, so no claim is made either way."""
    d = np.asarray(d, float)
    n = d.shape[-1]
    mean = d.mean(axis=-1) if n else np.full(d.shape[:-1], np.nan)
    nan = np.full(np.shape(mean), np.nan)
    if n < 2:
        return TSummary(mean, nan, nan.copy(), nan.copy(), n, nan.copy())
    se = d.std(axis=-1, ddof=1) / np.sqrt(n)
    flat = zero_spread(d)
    se = np.where(flat, np.nan, se)
    half = sps.t.ppf((1 + level) / 2, n - 1) * se
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2 * sps.t.sf(np.abs(mean / se), n - 1)
    return TSummary(mean, mean - half, mean + half, p, n, se)


def tost_p(d, margin: float) -> np.ndarray:
    """Fixed-n equivalence p of "the mean of d is at least ``margin`` from 0" along the last axis: twice the
    larger of the two one-sided t p's (mean >= +margin, mean <= -margin), capped at 1, so it is below
    0.05 exactly when the 95% t-interval lies inside +-margin. NaN where :func:`t_summary` gives no p."""
    t = t_summary(d)
    df = max(t.n - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        above = sps.t.cdf((t.mean - margin) / t.se, df)  # small when the mean is well below +margin
        below = sps.t.sf((t.mean + margin) / t.se, df)  # small when the mean is well above -margin
    return np.minimum(2 * np.maximum(above, below), 1.0)


def _sign_patterns(n: int) -> np.ndarray:
    """All 2^n rows of +-1 (n <= EXACT_SIGN_FLIP_MAX_N), or a seeded sample led by the identity."""
    if n <= EXACT_SIGN_FLIP_MAX_N:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    else:
        rng = np.random.default_rng(0)
        bits = np.vstack([np.zeros((1, n), int), rng.integers(0, 2, (SIGN_FLIP_SAMPLES, n))])
    return 1 - 2 * bits


def sign_flip_p(d) -> np.ndarray:
    """Two-sided sign-flip permutation p-value of mean(d) = 0 along the last axis: the share of sign
    patterns whose |mean| is at least the observed one. Exact for n <= 16. Its floor is 2 / 2^n (the
    observed pattern and its mirror), so below n = 6 it can never reach 0.05. NaN for no values."""
    d = np.asarray(d, float)
    n = d.shape[-1]
    if n == 0:
        return np.full(d.shape[:-1], np.nan)
    flipped = np.abs(d @ _sign_patterns(n).T.astype(float))  # (..., patterns); pattern 0 is the identity
    observed = flipped[..., :1]
    scale = np.maximum(np.abs(d).sum(axis=-1, keepdims=True), 1.0)
    return (flipped >= observed - 1e-12 * scale).mean(axis=-1)


def holm(p) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values along the last axis (monotone in the raw p, capped at 1).

    NaN entries are not hypotheses of the family: they stay NaN and do not count in m."""
    p = np.asarray(p, float)
    order = np.argsort(p, axis=-1)  # NaN sort last
    ranked = np.take_along_axis(p, order, axis=-1)
    m = np.isfinite(p).sum(axis=-1, keepdims=True)
    factor = m - np.arange(p.shape[-1])
    stepped = np.fmin(np.maximum.accumulate(np.where(np.isnan(ranked), -np.inf, ranked * factor), axis=-1), 1)
    stepped = np.where(np.isnan(ranked), np.nan, stepped)
    out = np.empty_like(stepped)
    np.put_along_axis(out, order, stepped, axis=-1)
    return out


def verdicts(mean, p_holm, n, maximize: bool = True, alpha: float = ALPHA) -> np.ndarray:
    """``better`` / ``worse`` where the Holm-adjusted p is below alpha (the sign of the mean difference,
    read through ``maximize``), ``too few seeds`` where n < 3, else ``undecided``."""
    mean, p_holm = np.asarray(mean, float), np.asarray(p_holm, float)
    n = np.broadcast_to(np.asarray(n), mean.shape)
    up = (mean > 0) if maximize else (mean < 0)
    called = np.isfinite(p_holm) & (p_holm < alpha) & (n >= MIN_SEEDS)
    out = np.where(called, np.where(up, BETTER, WORSE), UNDECIDED).astype(object)
    out[n < MIN_SEEDS] = TOO_FEW
    return out


def judge(mean, p, n, maximize: bool = True, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Holm-adjusted p-values and verdicts for the rows of one table (last axis = rows). Rows with fewer
    than 3 seeds or no p-value (zero spread) are left out of the family."""
    p = np.asarray(p, float)
    n = np.broadcast_to(np.asarray(n), p.shape)
    adjusted = holm(np.where(n >= MIN_SEEDS, p, np.nan))
    return adjusted, verdicts(mean, adjusted, n, maximize, alpha)


@dataclass(frozen=True)
class Comparison:
    """One row: a - b over the common seeds. ``p_holm`` and ``verdict`` depend on the whole table."""

    n: int  # seeds both sides have
    n_a: int
    n_b: int
    mean: float
    low: float
    high: float
    p_t: float
    p_sign: float
    p_holm: float = float("nan")  # filled in by adjust(): it depends on the other rows
    verdict: str = ""
    # filled in by report/decisive.py where they apply: equivalence (a min_effect), sequential stopping,
    # and for undecided rows the seeds a fixed-n t-test would need (80% power)
    p_equivalent: float = float("nan")
    p_holm_equivalent: float = float("nan")
    stopped: str | None = None
    seeds_needed: int | None = None
    seeds_needed_min_effect: int | None = None

    @property
    def zero_spread(self) -> bool:
        """Enough seeds, but the same difference on each: no t-test (see :func:`t_summary`)."""
        return self.n >= 2 and np.isfinite(self.mean) and not np.isfinite(self.p_t)


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> np.ndarray:
    """a[s] - b[s] over the seeds both maps have, in seed order."""
    return np.array([a[s] - b[s] for s in sorted(set(a) & set(b))], float)


def compare(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Comparison:
    """Seed-paired statistics of a - b for one row, before the table's Holm adjustment."""
    d = paired_differences(a, b)
    t = t_summary(d, level)
    return Comparison(
        len(d), len(a), len(b), float(t.mean), float(t.low), float(t.high), float(t.p), float(sign_flip_p(d))
    )


def compare_table(
    pairs: Sequence[tuple[Mapping[int, float], Mapping[int, float]]], maximize: bool = True
) -> list[Comparison]:
    """:func:`compare` for each (a, b) row of one table, then Holm across the rows and a verdict each."""
    rows = [compare(a, b) for a, b in pairs]
    return adjust(rows, maximize)


def adjust(rows: Sequence[Comparison], maximize: bool = True) -> list[Comparison]:
    """The table's Holm-adjusted p-values and verdicts filled into its rows."""
    if not rows:
        return []
    adjusted, verdict = judge([r.mean for r in rows], [r.p_t for r in rows], [r.n for r in rows], maximize)
    return [replace(r, p_holm=float(q), verdict=str(v)) for r, q, v in zip(rows, adjusted, verdict)]


def pareto_front(cost, quality, maximize: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point beats: cost no higher and quality no worse, one strictly.
    NaN points are never on the front."""
    cost = np.asarray(cost, float)
    q = np.asarray(quality, float) * (1 if maximize else -1)
    ok = np.isfinite(cost) & np.isfinite(q)
    front = np.zeros(len(cost), bool)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = others & (cost <= cost[i]) & (q >= q[i]) & ((cost < cost[i]) | (q > q[i]))
        front[i] = not dominated.any()
    return front
