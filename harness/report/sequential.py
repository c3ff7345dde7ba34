"""Sequential seeding: seed-paired verdicts that stay valid when more seeds go to the rows still undecided.

A study's ``seeds: {first: 3, max: 20, step: 2}`` runs the first seeds for every row of a comparison
table, then, in rounds, ``step`` more seeds for each row :func:`decide` left running, until every row is
decided or has ``max``. Re-running the fixed-n paired t-test of ``report/stats.py`` after every round does
not keep its 5%: each look is another chance for noise to cross the line (tests/test_sequential.py
measures 19.5% for one row with first 3, step 2, max 20). This module's rule keeps it at any stopping time.

**The e-process.** For seed-paired differences d ~ N(mu, sigma^2), sigma unknown, testing mu = mu0 with
a N(0, g) prior on the standardised effect (mu - mu0) / sigma and the right-Haar prior 1/sigma under both
hypotheses, the Bayes factor after k seeds has a closed form in k, sum d and sum d^2 (:func:`log_e`;
the t-test's Bayes factor of Rouder et al. 2009 at fixed g). Being built from the scale-invariant part of
the data it is a test martingale under mu = mu0 whatever sigma (Perez-Ortiz, Lardy, de Heide, Grunwald
2024, "E-statistics, group invariance and anytime-valid testing"), so by Ville's inequality
p_k = min(1, 1 / max_{i<=k} E_i) is below x with probability at most x at ANY time, including a time
chosen by looking at this or other rows. No new dependency: numpy and scipy only. g = PRIOR_VAR = 2
(prior sd 1.4 paired SDs) was picked by simulation over g = 0.5-10 for effects of 1-3 paired SDs and
max = 20: larger g decides huge effects a seed earlier and loses power at 1 SD. E is 1 (no evidence) at
one seed and wherever all differences so far are equal (no estimate of seed noise, as in stats.py).

**Verdicts.** ``better`` / ``worse`` test mu = 0 (the sign is the mean's at the seed count where the
evidence peaked: if mu is on the other side, E of the true mu is at least as large there, so a wrong sign
is as rare as a false call). With a margin ``min_effect``, ``equivalent`` is two one-sided tests: mu >= +m
is rejected by E(+m) counted only while the mean is below +m (it is then at most E of any true mu >= +m),
likewise mu <= -m, and p_equivalent = max of the two. The level-alpha confidence sequence (the running
intersection of {mu0: E(mu0) < 1/alpha}) lies above 0, below 0 or inside +-m exactly when the
unadjusted p's are below alpha. An empty intersection (low > high) has probability below alpha: the seeds
disagree more than normal noise allows.

**Holm across rows.** Without a margin: Holm (stats.holm) on the anytime p's. It is valid with rows
stopping at different rounds: the first true null Holm rejects, at any round, has p <= alpha / m0 (all m0
true nulls were still open), and P(some true null's anytime p ever <= alpha / m0) <= m0 * alpha / m0.
With a margin each row has two hypotheses, mu = 0 and |mu| >= m, of which at most one is true, so the
step-down multiplier is the number of rows with a hypothesis still open (Shaffer 1986): a row decided
``better`` still counts until its equivalence null falls too. Both step-downs give more rejections for
smaller p's, and a row's anytime p never rises (a stopped row's data are frozen, a running row's p is a
running minimum), so a decided row stays decided. Every row passed counts in m from the first call
(fewer than 3 seeds: p = 1, never called), so the multiplier cannot grow between rounds. A stopped
``equivalent`` row can later read ``better`` / ``worse`` when the others' decisions lower its multiplier
enough to reject mu = 0 too (its interval then lies between 0 and the margin): a stronger claim, still
covered by the same error bound.

**Seeds needed.** Each undecided row gets the n a fixed-n two-sided paired t-test at level alpha needs for
80% power at its current mean (and at ``min_effect``), from its observed paired sd (:func:`seeds_needed`;
equal to statsmodels' TTestPower, which tests check).

``python -m harness.report.sequential`` prints the power tables of docs/reading-reports.md.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from harness.errors import ConfigError
from harness.report.stats import (
    ALPHA,
    BETTER,
    MIN_SEEDS,
    TOO_FEW,
    UNDECIDED,
    WORSE,
    ZERO_SPREAD_RTOL,
    holm,
    judge,
    t_summary,
)

PRIOR_VAR = 2.0  # g: prior variance of the standardised effect (mu - mu0) / sigma
EQUIVALENT = "equivalent"
DECIDED, MAX_REACHED = "decided", "max reached"
POWER = 0.8


def looks(first: int, step: int, max_seeds: int) -> list[int]:
    """Seed counts at which decide() is called: first, first + step, ..., and max_seeds itself."""
    if not 3 <= first <= max_seeds or step < 1:
        raise ConfigError(
            f"seeds schedule first={first}, step={step}, max={max_seeds} is invalid; "
            "use 3 <= first <= max and step >= 1"
        )
    return [*range(first, max_seeds, step), max_seeds]


@dataclass(frozen=True)
class Prefixes:
    """Statistics of the first k differences, k = 1..n along the last axis."""

    k: np.ndarray
    mean: np.ndarray
    ss: np.ndarray  # sum of squared deviations from the prefix mean
    flat: np.ndarray  # fewer than 2 values or all equal: no estimate of seed noise


def prefixes(d) -> Prefixes:
    d = np.asarray(d, float)
    k = np.arange(1, d.shape[-1] + 1)
    x = d - d[..., :1]  # shifted by the first value: the sums of squares lose no precision
    s1, s2 = np.cumsum(x, -1), np.cumsum(x * x, -1)
    spread = np.maximum.accumulate(x, -1) - np.minimum.accumulate(x, -1)
    scale = np.maximum(np.maximum.accumulate(np.abs(d), -1), 1.0)
    flat = (k < 2) | (spread <= ZERO_SPREAD_RTOL * scale)  # stats.zero_spread, per prefix
    return Prefixes(k, s1 / k + d[..., :1], np.maximum(s2 - s1 * s1 / k, 0.0), flat)


def log_e(k, diff, ss, g: float = PRIOR_VAR) -> np.ndarray:
    """log E after k seeds against mean = mu0, with diff = mean - mu0 and ss = sum (d - mean)^2:
    E = (1 + k g)^(-1/2) * [(ss + k diff^2) / (ss + k diff^2 / (1 + k g))]^(k / 2)."""
    big = 1 + np.asarray(k, float) * g
    between = k * np.square(diff)  # k (mean - mu0)^2
    with np.errstate(divide="ignore", invalid="ignore"):
        return -0.5 * np.log(big) + k / 2 * np.log((ss + between) / (ss + between / big))


def log_evidence(pre: Prefixes, mu0: float = 0.0, side: int = 0, g: float = PRIOR_VAR) -> np.ndarray:
    """log E_k against mean = mu0 for every prefix; side -1 (+1) counts only prefixes whose mean is below
    (above) mu0, which makes it evidence against mean >= mu0 (<= mu0). 0 where the prefix is flat."""
    ok = ~pre.flat
    if side:
        ok &= np.sign(pre.mean - mu0) == side
    return np.where(ok, log_e(pre.k, pre.mean - mu0, pre.ss, g), 0.0)


def anytime_p(log_ev: np.ndarray) -> np.ndarray:
    """p_k = min(1, 1 / max_{i<=k} E_i) along the last axis: valid at any stopping time."""
    return np.exp(-np.maximum(np.maximum.accumulate(log_ev, -1), 0.0))


def sign_at_peak(log_ev: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The sign of the mean at the prefix where the evidence peaked so far, for each k."""
    peak = np.maximum.accumulate(log_ev, -1)
    new = np.concatenate([np.ones_like(peak[..., :1], bool), peak[..., 1:] > peak[..., :-1]], -1)
    at = np.maximum.accumulate(np.where(new, np.arange(log_ev.shape[-1]), 0), -1)
    return np.sign(np.take_along_axis(mean, at, -1))


@dataclass(frozen=True)
class Evidence:
    """Per prefix k (last axis): the p's a row would carry after k seeds."""

    p: np.ndarray  # anytime p of mean = 0
    sign: np.ndarray  # direction of a better/worse call
    p_eq: np.ndarray | None  # anytime TOST p of |mean| >= margin; None without a margin


def evidence(d, margin: float | None = None) -> Evidence:
    pre = prefixes(d)
    zero = log_evidence(pre)
    p_eq = None
    if margin is not None:
        p_eq = np.maximum(anytime_p(log_evidence(pre, margin, -1)), anytime_p(log_evidence(pre, -margin, +1)))
    return Evidence(anytime_p(zero), sign_at_peak(zero, pre.mean), p_eq)


def confidence_sequence(d, alpha: float = ALPHA, g: float = PRIOR_VAR) -> tuple[np.ndarray, np.ndarray]:
    """Level 1 - alpha anytime-valid interval after each prefix: the running intersection of the sets
    {mu0: E_k(mu0) < 1 / alpha}, each mean_k +- h_k; infinite while E could not reach 1 / alpha."""
    pre = prefixes(d)
    big = 1 + pre.k * g
    log_r = (np.log(big) - 2 * math.log(alpha)) / pre.k  # E = 1/alpha at u* = (R - 1) / (1 - R / G)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        u = np.where(log_r < np.log(big), np.expm1(log_r) / (1 - np.exp(log_r) / big), np.inf)
        half = np.where(pre.flat, np.inf, np.sqrt(u * pre.ss / pre.k))
    low = np.maximum.accumulate(np.where(np.isfinite(half), pre.mean - half, -np.inf), -1)
    high = np.minimum.accumulate(np.where(np.isfinite(half), pre.mean + half, np.inf), -1)
    return low, high


def holm_with_margin(p0, p_eq) -> tuple[np.ndarray, np.ndarray]:
    """Adjusted p's of the 2m hypotheses mu_j = 0 and |mu_j| >= margin (rows along the last axis): Holm's
    step-down over all of them, multiplying each by the number of rows with a hypothesis still open."""
    p0, p_eq = np.broadcast_arrays(np.asarray(p0, float), np.asarray(p_eq, float))
    m = p0.shape[-1]
    p = np.concatenate([p0, p_eq], -1)
    order = np.argsort(p, -1, kind="stable")
    rank = np.argsort(order, -1)
    zero_last = rank[..., :m] > rank[..., m:]  # the row's mu = 0 sorts after its equivalence null
    closes = np.take_along_axis(np.concatenate([zero_last, ~zero_last], -1), order, -1)
    still_open = m - (np.cumsum(closes, -1) - closes)
    stepped = np.minimum(np.maximum.accumulate(np.take_along_axis(p, order, -1) * still_open, -1), 1.0)
    out = np.empty_like(stepped)
    np.put_along_axis(out, order, stepped, -1)
    return out[..., :m], out[..., m:]


def judge_rows(p0, sign, p_eq, n, maximize: bool = True, alpha: float = ALPHA):
    """Adjusted p's and verdicts for one table's rows (last axis): returns (p_holm, p_holm_eq, verdict)."""
    n = np.broadcast_to(np.asarray(n), np.shape(p0))
    p0 = np.where(n >= MIN_SEEDS, p0, 1.0)
    if p_eq is None:
        adj0, adj_eq = holm(p0), np.full(np.shape(p0), np.nan)
    else:
        adj0, adj_eq = holm_with_margin(p0, np.where(n >= MIN_SEEDS, p_eq, 1.0))
    up = (np.asarray(sign) > 0) == maximize
    verdict = np.where(adj_eq < alpha, EQUIVALENT, UNDECIDED).astype(object)
    verdict[adj0 < alpha] = np.where(up, BETTER, WORSE)[adj0 < alpha]
    verdict[n < MIN_SEEDS] = TOO_FEW
    return adj0, adj_eq, verdict


def at_seeds(ev: Evidence, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The evidence after n seeds (an array with ev's leading shape)."""
    pick = lambda a: np.take_along_axis(a, np.asarray(n)[..., None] - 1, -1)[..., 0]  # noqa: E731
    return pick(ev.p), pick(ev.sign), None if ev.p_eq is None else pick(ev.p_eq)


def simulate(
    ev: Evidence, schedule: Sequence[int], maximize: bool = True, alpha: float = ALPHA
) -> tuple[np.ndarray, np.ndarray]:
    """Run the stopping rule on simulated tables: ev holds (..., rows, max) prefix evidence. Each round
    gives the undecided rows the next look's seeds and re-judges the table. Returns (verdict, n) per row."""
    n = np.full(ev.p.shape[:-1], schedule[0])
    running = np.ones(n.shape, bool)
    for look in schedule:
        n = np.where(running, look, n)
        verdict = judge_rows(*at_seeds(ev, n), n, maximize, alpha)[2]
        running &= ~np.isin(verdict, [BETTER, WORSE, EQUIVALENT])
    return verdict, n


def _t_power(es: float, n: np.ndarray, alpha: float) -> np.ndarray:
    """Power of the two-sided one-sample t-test at standardised effect es with n values."""
    crit = sps.t.ppf(1 - alpha / 2, n - 1)
    return sps.nct.sf(crit, n - 1, es * np.sqrt(n)) + sps.nct.cdf(-crit, n - 1, es * np.sqrt(n))


def seeds_needed(effect: float, sd: float, power: float = POWER, alpha: float = ALPHA) -> int | None:
    """Smallest n for which a fixed-n two-sided paired t-test at level alpha detects a true mean
    difference ``effect`` with probability ``power``, given the paired sd. None when effect / sd is 0 or
    not finite (no spread, or no estimate)."""
    es = abs(effect) / sd if sd else math.nan
    if not math.isfinite(es) or es == 0:
        return None
    low, high = 1, 2  # power(low) < power <= power(high)
    while _t_power(es, high, alpha) < power:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _t_power(es, mid, alpha) >= power else (mid, high)
    return high


@dataclass(frozen=True)
class SequentialResult:
    """One row after a round. ``stopped``: ``decided``, ``max reached``, or None (give it more seeds)."""

    verdict: str
    n: int
    mean: float
    low: float  # anytime-valid 95% interval, not adjusted for the other rows
    high: float
    p: float  # anytime p of mean = 0
    p_equivalent: float  # anytime TOST p of |mean| >= min_effect; NaN without one
    p_holm: float
    p_holm_equivalent: float
    stopped: str | None
    seeds_needed: int | None  # fixed-n t, 80% power, at the current mean (undecided rows only)
    seeds_needed_min_effect: int | None  # the same at min_effect


def _check(rows: Sequence[np.ndarray], min_effect: float | None, max_seeds: int, alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha} must be between 0 and 1; use 0.05")
    if min_effect is not None and not (math.isfinite(min_effect) and min_effect > 0):
        raise ConfigError(f"min_effect={min_effect} must be a positive margin (e.g. 0.01 mIoU) or unset")
    if max_seeds < MIN_SEEDS:
        raise ConfigError(f"seeds max={max_seeds} is below {MIN_SEEDS}; give max >= {MIN_SEEDS}")
    for i, d in enumerate(rows):
        if not np.isfinite(d).all():
            raise ConfigError(f"row {i} has a non-finite seed difference; pass finished seeds only")


def _row_result(d, p, sign, p_eq, adj0, adj_eq, verdict, min_effect, max_seeds, alpha) -> SequentialResult:
    n = len(d)
    t = t_summary(d)
    low, high = (v[-1] for v in confidence_sequence(d, alpha)) if n else (math.nan, math.nan)
    decided = verdict in (BETTER, WORSE, EQUIVALENT)
    stopped = DECIDED if decided else MAX_REACHED if n >= max_seeds else None
    sd = float(np.std(d, ddof=1)) if n >= 2 else math.nan
    needed = (None, None) if decided else (seeds_needed(float(t.mean), sd), seeds_needed(min_effect or 0, sd))
    return SequentialResult(
        str(verdict), n, float(t.mean), float(low), float(high), float(p), float(p_eq), float(adj0),
        float(adj_eq), stopped, *needed,
    )  # fmt: skip


def _last(d: np.ndarray, min_effect: float | None) -> tuple[float, float, float]:
    """(p, sign, p_equivalent) after all of a row's seeds; p's of 1 for a row with none."""
    if not len(d):
        return 1.0, 0.0, 1.0
    ev = evidence(d, min_effect)
    return ev.p[-1], ev.sign[-1], 1.0 if ev.p_eq is None else ev.p_eq[-1]


def decide(
    rows: Sequence[np.ndarray],
    maximize: bool = True,
    min_effect: float | None = None,
    max_seeds: int = 20,
    alpha: float = ALPHA,
) -> list[SequentialResult]:
    """Verdicts for one table's rows between seed rounds. ``rows``: each row's seed-paired differences
    (stats.paired_differences) in seed order, all seeds so far; a stopped row keeps its seeds. Give
    ``min(step, max_seeds - n)`` more seeds to each row whose ``stopped`` is None, then call again."""
    rows = [np.asarray(d, float) for d in rows]
    _check(rows, min_effect, max_seeds, alpha)
    if not rows:
        return []
    p0, sign, p_eq = np.array([_last(d, min_effect) for d in rows]).T
    n = np.array([len(d) for d in rows])
    adj0, adj_eq, verdict = judge_rows(p0, sign, None if min_effect is None else p_eq, n, maximize, alpha)
    p_eq = p_eq if min_effect is not None else np.full(len(rows), np.nan)
    return [
        _row_result(d, *vals, min_effect, max_seeds, alpha)
        for d, *vals in zip(rows, p0, sign, p_eq, adj0, adj_eq, verdict)
    ]


POWER_EFFECTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
SCHEDULE = (3, 2, 20)  # first, step, max: the example


def _normal(effect: float, tables: int, rows: int, seed: int) -> np.ndarray:
    """(tables, rows, max) paired differences with sd 1: effects are in paired SDs."""
    return np.random.default_rng(seed).normal(effect, 1.0, (tables, rows, SCHEDULE[2]))


def _sequential_row(effect: float, rows: int, tables: int, seed: int) -> str:
    d = _normal(effect, tables, rows, seed)
    verdict, n = simulate(evidence(d), looks(*SCHEDULE))
    called = np.isin(verdict, [BETTER, WORSE]).mean()
    fixed = []
    for k in (5, SCHEDULE[2]):
        t = t_summary(d[..., :k])
        fixed.append(np.isin(judge(t.mean, t.p, k)[1], [BETTER, WORSE]).mean())
    return f"| {effect:g} | {rows} | {called:.1%} | {n.mean():.1f} | {fixed[0]:.1%} | {fixed[1]:.1%} |"


def _equivalence_row(margin: float, tables: int, seed: int) -> str:
    cells = []
    for effect in (0.0, margin):
        verdict, n = simulate(evidence(_normal(effect, tables, 1, seed), margin), looks(*SCHEDULE))
        cells += [f"{(verdict == EQUIVALENT).mean():.1%}", f"{n.mean():.1f}"]
    return f"| {margin:g} | " + " | ".join(cells) + " |"


def power_tables(tables: int = 20_000, seed: int = 0) -> str:
    """The markdown tables of docs/reading-reports.md: share of rows called and mean seeds spent, per true
    effect, for the sequential rule (first 3, step 2, max 20) and fixed-n t-tests at n = 5 and 20."""
    first, step, top = SCHEDULE
    lines = [
        f"Sequential (first {first}, step {step}, max {top}) against fixed-n paired t-tests, no margin; "
        f"{tables} simulated tables per line, rows independent, Holm across rows:",
        "",
        f"| true effect (paired SDs) | rows | sequential: called within {top} | mean seeds spent "
        f"| fixed n=5: called | fixed n={top}: called |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_sequential_row(e, rows, tables, seed) for rows in (1, 5) for e in POWER_EFFECTS]
    lines += [
        "",
        "Equivalence, one row, margin in paired SDs:",
        "",
        "| margin | no effect: equivalent | mean seeds | effect = margin: equivalent | mean seeds |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [_equivalence_row(m, tables, seed) for m in (1.0, 2.0, 3.0)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(power_tables() + "\n")
