"""report/sequential.py: the stopping rule's error rates and power by simulation, with the rule in the loop.

The simulations run the same vectorised functions decide() calls (evidence, judge_rows) on arrays of
simulated tables (tables, rows, seeds), through the schedule first 3, step 2, max 20."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy import stats as sps
from statsmodels.stats.power import TTestPower

from harness.errors import ConfigError
from harness.report.sequential import (
    DECIDED,
    EQUIVALENT,
    MAX_REACHED,
    PRIOR_VAR,
    Evidence,
    confidence_sequence,
    decide,
    evidence,
    holm_with_margin,
    judge_rows,
    log_e,
    looks,
    prefixes,
    seeds_needed,
    simulate,
)
from harness.report.stats import BETTER, TOO_FEW, UNDECIDED, WORSE, holm, t_summary

TABLES = 4000
ALPHA = 0.05
MAX = 20
SCHEDULE = looks(3, 2, MAX)


def tolerance(rate: float, trials: int) -> float:
    """Three binomial standard errors of a rate estimated from ``trials`` simulated tables."""
    return 3 * math.sqrt(rate * (1 - rate) / trials)


def tables(effect: float, rows: int, seed: int, shared_baseline: bool = False) -> np.ndarray:
    """(TABLES, rows, MAX) seed-paired differences with paired sd 1 (effects are in paired SDs). With a
    shared baseline the rows are (method - none) on the same seeds, correlated through `none`."""
    rng = np.random.default_rng(seed)
    if not shared_baseline:
        return rng.normal(effect, 1.0, (TABLES, rows, MAX))
    scale = 1 / math.sqrt(2)
    return effect + rng.normal(0, scale, (TABLES, rows, MAX)) - rng.normal(0, scale, (TABLES, 1, MAX))


def any_call(verdict: np.ndarray, calls=(BETTER, WORSE)) -> float:
    """Share of tables where any row got one of ``calls``."""
    return float(np.isin(verdict, list(calls)).any(axis=-1).mean())


def plain_t_evidence(d: np.ndarray) -> Evidence:
    """The fixed-n paired t-test of report/stats.py after each prefix, in the form simulate() takes."""
    prefix = [t_summary(d[..., :k]) for k in range(1, d.shape[-1] + 1)]
    return Evidence(
        np.stack([t.p for t in prefix], -1), np.sign(np.stack([t.mean for t in prefix], -1)), None
    )


# (a) the problem
@pytest.mark.parametrize("rows", [1, 5])
def test_plain_t_tests_rerun_after_every_round_exceed_5_percent(rows):
    d = tables(0.0, rows, seed=1, shared_baseline=rows > 1)
    fixed = any_call(simulate(plain_t_evidence(d), [MAX])[0])  # one look at n = 20: calibrated
    rate = any_call(simulate(plain_t_evidence(d), SCHEDULE)[0])
    print(f"plain t, {rows} rows: one look {fixed:.4f}, every round {rate:.4f}")
    assert fixed <= ALPHA + tolerance(ALPHA, TABLES)
    assert rate > ALPHA + tolerance(ALPHA, TABLES)


# (b) the sequential rule under no effect
@pytest.mark.parametrize("margin", [None, 0.5], ids=["no-margin", "margin-0.5sd"])
@pytest.mark.parametrize("rows", [1, 5])
def test_the_stopping_rule_keeps_the_familywise_rate_under_no_effect(rows, margin):
    d = tables(0.0, rows, seed=2 + rows, shared_baseline=rows > 1)
    verdict, n = simulate(evidence(d, margin), SCHEDULE)
    rate = any_call(verdict)
    print(f"sequential, {rows} rows, margin {margin}: family-wise {rate:.4f}, mean seeds {n.mean():.1f}")
    assert rate <= ALPHA + tolerance(ALPHA, TABLES)
    assert n.max() <= MAX and n.min() >= 3


# (c) power at 2 paired SDs
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("maximize", [True, False])
def test_a_two_sd_effect_is_decided_within_max_at_least_80_percent(rows, maximize):
    d = tables(2.0, rows, seed=10 + rows)
    verdict, n = simulate(evidence(d), SCHEDULE, maximize=maximize)
    right = verdict == (BETTER if maximize else WORSE)  # lower-is-better: the same gain reads `worse`
    print(f"2 SD, {rows} rows: decided {right.mean():.4f}, mean seeds {n.mean():.1f}")
    assert right.mean() >= 0.80 and (n < MAX).mean() >= 0.80


# (d) equivalence
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("side", [1, -1])
def test_a_true_difference_of_exactly_the_margin_is_rarely_called_equivalent(rows, side):
    margin = 1.0
    d = tables(side * margin, rows, seed=20 + rows + side, shared_baseline=rows > 1)
    verdict, _ = simulate(evidence(d, margin), SCHEDULE)
    rate = any_call(verdict, [EQUIVALENT])
    print(f"effect = {side} margin, {rows} rows: equivalent in {rate:.4f} of tables")
    assert rate <= ALPHA + tolerance(ALPHA, TABLES)


@pytest.mark.parametrize("rows", [1, 5])
def test_under_no_effect_a_margin_of_three_sd_stops_most_rows_as_equivalent(rows):
    d = tables(0.0, rows, seed=30 + rows, shared_baseline=rows > 1)
    verdict, n = simulate(evidence(d, 3.0), SCHEDULE)
    early = (verdict == EQUIVALENT) & (n < MAX)
    print(
        f"no effect, margin 3 SD, {rows} rows: equivalent before max {early.mean():.4f}, seeds {n.mean():.1f}"
    )
    assert early.mean() >= 0.9 and n.mean() < 10


# (e) seeds needed
@pytest.mark.parametrize("effect,sd", [(0.01, 0.02), (0.03, 0.02), (0.02, 0.01), (-0.005, 0.02), (1.0, 0.5)])
def test_seeds_needed_equals_statsmodels_ttestpower(effect, sd):
    reference = TTestPower().solve_power(abs(effect) / sd, alpha=ALPHA, power=0.8, alternative="two-sided")
    assert seeds_needed(effect, sd) == math.ceil(reference)


def test_seeds_needed_has_no_answer_without_an_effect_or_spread():
    assert seeds_needed(0.0, 0.01) is None and seeds_needed(0.01, 0.0) is None
    assert seeds_needed(0.01, math.nan) is None
    assert seeds_needed(0.01, 0.02, power=0.9) > seeds_needed(0.01, 0.02)


# the e-process itself
def direct_bayes_factor(d, mu0: float, g: float) -> float:
    """m1 / m0 by numerical integration: mu - mu0 = delta * sigma, delta ~ N(0, g), p(sigma) = 1 / sigma."""
    x = np.asarray(d) - mu0
    n = len(x)
    m0 = integrate.quad(lambda s: s ** (-n - 1) * np.exp(-np.sum(x * x) / (2 * s * s)), 0, np.inf)[0]

    def joint(delta, s):
        return (
            s ** (-n - 1)
            * np.exp(-np.sum((x - delta * s) ** 2) / (2 * s * s))
            * sps.norm.pdf(delta, 0, g**0.5)
        )

    return integrate.dblquad(joint, 0, np.inf, -np.inf, np.inf, epsrel=1e-9)[0] / m0


@pytest.mark.parametrize(
    "d,mu0", [([0.3, 1.2, 0.8, 1.9], 0.0), ([0.3, -1.2, 0.8], 0.5), ([2.0, 2.1, 1.9, 2.2, 2.05], 0.0)]
)
def test_the_closed_form_equals_direct_integration(d, mu0):
    pre = prefixes(d)
    closed = math.exp(log_e(len(d), pre.mean[-1] - mu0, pre.ss[-1]))
    assert closed == pytest.approx(direct_bayes_factor(d, mu0, PRIOR_VAR), rel=1e-6)


def test_no_evidence_from_one_seed_or_equal_differences():
    assert math.exp(log_e(1, 0.7, 0.0)) == pytest.approx(1.0)  # E_1 = 1 for any d_1: the martingale's start
    ev = evidence([0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # 0.6 - 0.5 etc.: no estimate of seed noise
    assert ev.p.tolist() == [1.0] * 6
    ev = evidence([0.02, 0.03, 0.025, 0.03, 0.02, 0.028, 0.031])
    assert np.all(np.diff(ev.p) <= 0) and ev.p[-1] < ALPHA  # a running minimum
    far = evidence([2.0, 2.2, 1.9, 2.1, 2.05, 1.95], margin=0.5)  # far above the margin: never equivalent
    assert far.p_eq.tolist() == [1.0] * 6 and far.p[-1] < ALPHA


def test_the_confidence_sequence_covers_the_truth_at_every_seed_count():
    effect = 0.3
    d = np.random.default_rng(40).normal(effect, 1.0, (TABLES, MAX))
    low, high = confidence_sequence(d)
    always = ((low <= effect) & (effect <= high)).all(axis=-1).mean()
    print(f"covered at all 20 seed counts: {always:.4f}")
    assert always >= 1 - ALPHA - tolerance(ALPHA, TABLES)
    assert np.isinf(low[:, :2]).all()  # E cannot reach 20 with 2 seeds: every mean is compatible


def test_the_interval_agrees_with_the_p_values():
    d = np.random.default_rng(41).normal(0.8, 1.0, (2000, MAX))
    low, high = confidence_sequence(d)
    ev = evidence(d, 0.5)
    ok = low <= high  # an empty intersection is an event of probability below alpha
    np.testing.assert_array_equal(((low > 0) | (high < 0))[ok], (ev.p < ALPHA)[ok])
    np.testing.assert_array_equal(((low > -0.5) & (high < 0.5))[ok], (ev.p_eq < ALPHA)[ok])


# Holm across rows
def test_holm_with_margin_by_hand():
    # sorted: eq0 0.005 (2 rows open: x2), zero0 0.01 (x2; row 0 closed), eq1 0.03 (x1), zero1 0.6 (x1)
    adj0, adj_eq = holm_with_margin([0.01, 0.6], [0.005, 0.03])
    assert adj0.tolist() == pytest.approx([0.02, 0.6]) and adj_eq.tolist() == pytest.approx([0.01, 0.03])
    # a row decided better keeps its equivalence null open: the next row is multiplied by 2, not 1
    adj0, adj_eq = holm_with_margin([0.001, 0.02], [0.9, 0.9])
    assert adj0.tolist() == pytest.approx([0.002, 0.04]) and adj_eq.tolist() == pytest.approx([1.0, 1.0])


def test_without_a_margin_the_rows_get_stats_holm():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    adj0, adj_eq, verdict = judge_rows(p, np.array([1, -1, 1, 1]), None, 5)
    np.testing.assert_allclose(adj0, holm(p))
    assert np.isnan(adj_eq).all() and verdict.tolist() == [BETTER, UNDECIDED, UNDECIDED, BETTER]


@pytest.mark.parametrize("margin", [False, True])
def test_smaller_p_values_never_undo_a_decision(margin):
    """What keeps decided rows decided across rounds: each p only falls, and the step-down is monotone."""
    rng = np.random.default_rng(50)
    p0 = rng.uniform(0, 0.1, (5000, 5))
    p_eq = rng.uniform(0, 0.1, (5000, 5)) if margin else None
    shrink = lambda p: p * rng.uniform(0, 1, p.shape) ** (rng.uniform(size=p.shape) < 0.5)  # noqa: E731
    before = judge_rows(p0, np.ones_like(p0), p_eq, 5)[2] != UNDECIDED
    after = (
        judge_rows(shrink(p0), np.ones_like(p0), None if p_eq is None else shrink(p_eq), 5)[2] != UNDECIDED
    )
    assert before.sum() > 1000 and not (before & ~after).any()


# the API the sweep calls
def run_rounds(full: list[np.ndarray], **kwargs) -> list:
    """Drive decide() as the sweep will: first 3 seeds, then 2 more to each running row, until none runs."""
    n = [3] * len(full)
    while True:
        results = decide([d[:k] for d, k in zip(full, n)], max_seeds=MAX, **kwargs)
        if all(r.stopped for r in results):
            return results
        n = [k if r.stopped else min(k + 2, MAX) for k, r in zip(n, results)]


def test_decide_round_by_round_matches_the_simulation():
    d = tables(1.0, 3, seed=60, shared_baseline=True)[:40]
    d[:, 2] -= 1.0  # one row without an effect
    verdict, n = simulate(evidence(d, 0.8), SCHEDULE)
    for i in range(len(d)):
        results = run_rounds(list(d[i]), min_effect=0.8)
        assert [r.verdict for r in results] == verdict[i].tolist() and [r.n for r in results] == n[i].tolist()


def test_decided_rows_stay_decided_and_say_why_they_stopped():
    rng = np.random.default_rng(61)
    strong = 0.05 + 0.01 * rng.normal(size=MAX)
    weak = 0.004 + 0.01 * rng.normal(size=MAX)
    first = decide([strong[:5], weak[:5]])
    assert first[0].verdict == BETTER and first[0].stopped == DECIDED and first[1].stopped is None
    assert (
        first[0].seeds_needed is None
        and first[1].seeds_needed > 5
        and first[1].seeds_needed_min_effect is None
    )
    last = decide([strong[:5], weak])
    assert repr(last[0]) == repr(first[0])  # the frozen row: same p, same verdict, still decided
    assert last[1].n == MAX and last[1].stopped == MAX_REACHED and last[1].verdict == UNDECIDED
    assert last[1].low < last[1].mean < last[1].high and last[1].low < 0.004 < last[1].high


def test_an_undecided_row_says_how_many_seeds_a_fixed_t_test_needs():
    d = np.array([0.01, -0.005, 0.02, 0.0, 0.015])
    (row,) = decide([d], min_effect=0.01)
    sd = float(np.std(d, ddof=1))
    assert row.verdict == UNDECIDED and row.stopped is None
    assert row.seeds_needed == seeds_needed(d.mean(), sd) and row.seeds_needed_min_effect == seeds_needed(
        0.01, sd
    )
    assert math.isfinite(row.p_equivalent) and row.p_holm_equivalent >= row.p_equivalent


def test_rows_with_too_few_seeds_count_in_the_family_but_are_never_called():
    strong = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.02])
    alone, with_short = decide([strong]), decide([strong, np.array([0.1, 0.2])])
    assert with_short[1].verdict == TOO_FEW and with_short[1].stopped is None
    assert with_short[0].p_holm == pytest.approx(min(1.0, 2 * alone[0].p))  # m = 2 from the first call
    assert decide([strong], maximize=False)[0].verdict == WORSE and decide([]) == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"min_effect": -0.01}, "min_effect=-0.01 must be a positive margin"),
        ({"max_seeds": 2}, "seeds max=2 is below 3"),
        ({"alpha": 1.5}, "alpha=1.5 must be between 0 and 1"),
    ],
)
def test_bad_arguments_get_a_one_line_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        decide([np.zeros(3)], **kwargs)


def test_non_finite_differences_and_bad_schedules_are_refused():
    with pytest.raises(ConfigError, match="row 1 has a non-finite seed difference"):
        decide([np.zeros(3), np.array([0.1, np.nan, 0.2])])
    with pytest.raises(ConfigError, match="use 3 <= first <= max and step >= 1"):
        looks(2, 2, 20)
    assert looks(3, 2, 20) == [3, 5, 7, 9, 11, 13, 15, 17, 19, 20] and looks(3, 5, 13) == [3, 8, 13]
