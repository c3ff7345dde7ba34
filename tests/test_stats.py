"""report/stats.py: calibration of the verdicts and intervals by simulation, and hand-computed values.

The simulations run the same vectorised functions the report calls (t_summary, judge), on arrays of
simulated tables: (tables, rows, seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from harness.report.stats import (
    BETTER,
    TOO_FEW,
    UNDECIDED,
    WORSE,
    adjust,
    compare,
    compare_table,
    holm,
    judge,
    pareto_front,
    sign_flip_p,
    t_summary,
    verdicts,
)

TABLES = 4000
ROWS = 7  # the README's methods table: seven KD methods against one `none`
ALPHA = 0.05


def tolerance(rate: float, trials: int) -> float:
    """Three binomial standard errors of a rate estimated from ``trials`` simulated tables."""
    return 3 * math.sqrt(rate * (1 - rate) / trials)


def null_differences(n: int, shared_baseline: bool, seed: int) -> np.ndarray:
    """(TABLES, ROWS, n) seed-paired differences with no true effect. With a shared baseline each row is
    (method - none) on the same seeds, so rows are correlated through `none`, as in a real table; a seed
    effect common to all configurations cancels in the pairing."""
    rng = np.random.default_rng(seed)
    seed_effect = rng.normal(0, 0.02, (TABLES, 1, n))
    methods = seed_effect + rng.normal(0, 0.01, (TABLES, ROWS, n))
    if shared_baseline:
        none = seed_effect + rng.normal(0, 0.01, (TABLES, 1, n))
    else:
        none = seed_effect + rng.normal(0, 0.01, (TABLES, ROWS, n))
    return methods - none


def familywise_rate(d: np.ndarray) -> float:
    """Share of tables where any row gets a `better` or `worse` verdict."""
    t = t_summary(d)
    _, verdict = judge(t.mean, t.p, d.shape[-1])
    return float(np.isin(verdict, [BETTER, WORSE]).any(axis=-1).mean())


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("shared_baseline", [True, False], ids=["shared-none", "independent"])
def test_null_tables_call_a_difference_at_most_5_percent_of_the_time(n, shared_baseline):
    rate = familywise_rate(null_differences(n, shared_baseline, seed=n))
    print(f"n={n} {'shared' if shared_baseline else 'independent'}: family-wise rate {rate:.4f}")
    assert rate <= ALPHA + tolerance(ALPHA, TABLES)


@pytest.mark.parametrize("n", [3, 5, 10])
def test_one_row_tables_are_calibrated_not_just_conservative(n):
    d = np.random.default_rng(100 + n).normal(0, 1, (TABLES, 1, n))
    rate = familywise_rate(d)
    print(f"n={n} one row: rate {rate:.4f}")
    assert abs(rate - ALPHA) <= tolerance(ALPHA, TABLES)


def old_percentile_bootstrap_calls(d: np.ndarray) -> np.ndarray:
    """The rule report/stats.py used before: 'significant' when the 95% percentile bootstrap interval of the
    mean seed-paired difference excludes 0. Its many-resample limit: all n^n resamples, equally weighted.
    Returns (tables, rows) booleans."""
    n = d.shape[-1]
    picks = np.stack(np.meshgrid(*[np.arange(n)] * n, indexing="ij"), -1).reshape(-1, n)
    means = d[..., picks].mean(axis=-1)  # (tables, rows, n^n)
    low, high = np.percentile(means, [2.5, 97.5], axis=-1, method="inverted_cdf")
    return (low > 0) | (high < 0)


def test_the_old_percentile_bootstrap_fails_the_same_check():
    d = null_differences(3, shared_baseline=True, seed=3)[:2000]
    calls = old_percentile_bootstrap_calls(d)
    per_row, familywise = calls.mean(), calls.any(axis=-1).mean()
    print(f"old bootstrap, n=3: per-row rate {per_row:.3f}, family-wise {familywise:.3f}")
    assert per_row == pytest.approx(0.25, abs=0.03)  # all three seeds share a sign
    assert familywise > ALPHA + tolerance(ALPHA, len(d))


@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_t_interval_covers_a_known_effect_95_percent_of_the_time(n):
    effect = 0.03
    d = np.random.default_rng(200 + n).normal(effect, 0.02, (TABLES, n))
    t = t_summary(d)
    coverage = float(((t.low <= effect) & (effect <= t.high)).mean())
    print(f"n={n}: coverage {coverage:.4f}")
    assert 0.93 <= coverage <= 0.97


def test_t_summary_matches_scipy_and_the_readme_example():
    d = [0.0001, 0.0155, 0.0534]  # cwd - none on seeds 0-2, README "First results"
    t = t_summary(d)
    ref = sps.ttest_1samp(d, 0)
    assert (
        t.mean == pytest.approx(0.023)
        and t.p == pytest.approx(ref.pvalue)
        and t.p == pytest.approx(0.2836, abs=1e-4)
    )
    half = 4.302652729911275 * np.std(d, ddof=1) / math.sqrt(3)  # t quantile 0.975 at df = 2
    assert (t.low, t.high) == pytest.approx((0.023 - half, 0.023 + half))
    assert sign_flip_p(d) == pytest.approx(0.25)


def test_sign_flip_p_by_hand():
    # d = (1, 2, 3): |sum| over the 8 sign patterns is 6, 4, 2, 0, 0, 2, 4, 6; observed 6 -> 2/8
    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # d = (1, -2, 3, 4): observed |sum| 6; patterns with |sum| >= 6: sums 10, 8, 6, 4, 2, 0 for the
    # 2^4 = 16 signs give {10: 2, 8: 2, 6: 2, 4: 4, 2: 4, 0: 2}: 6 of 16 reach 6 -> 0.375
    assert sign_flip_p([1.0, -2.0, 3.0, 4.0]) == pytest.approx(6 / 16)
    for n in range(1, 8):  # the floor: the observed pattern and its mirror
        assert sign_flip_p(np.arange(1.0, n + 1)) == pytest.approx(min(1.0, 2 / 2**n))
    assert sign_flip_p(np.zeros(3)) == 1.0
    assert sign_flip_p(np.ones((2, 5))).tolist() == pytest.approx([1 / 16, 1 / 16])


def test_holm_by_hand():
    # sorted p 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.01, np.nan, 0.02])  # NaN is not in the family: m = 2
    assert out[0] == pytest.approx(0.02) and np.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert holm([0.5, 0.9]).tolist() == pytest.approx([1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(holm([[0.01, 0.2], [0.3, 0.001]]), [[0.02, 0.2], [0.3, 0.002]])  # per row


def test_verdicts_follow_the_metric_direction():
    mean, p, n = np.array([0.1, -0.1, 0.1, 0.1]), np.array([0.01, 0.01, 0.2, 0.01]), np.array([3, 3, 3, 2])
    assert verdicts(mean, p, n).tolist() == [BETTER, WORSE, UNDECIDED, TOO_FEW]
    assert verdicts(mean, p, n, maximize=False).tolist() == [WORSE, BETTER, UNDECIDED, TOO_FEW]
    lower_loss = compare_table(
        [({s: 0.5 - 0.1 * s - 0.01 * s**2 for s in range(5)}, dict.fromkeys(range(5), 1.0))], maximize=False
    )
    assert lower_loss[0].mean < 0 and lower_loss[0].verdict == BETTER


def test_too_few_seeds_and_only_common_seeds_count():
    rows = compare_table(
        [
            ({0: 0.5, 1: 0.6, 9: 0.9}, {0: 0.4, 1: 0.45, 2: 0.1}),  # two seeds in common
            ({0: 0.5}, {0: 0.4}),
            ({0: 0.5}, {1: 0.4}),  # nothing in common
        ]
    )
    assert [r.n for r in rows] == [2, 1, 0] and {r.verdict for r in rows} == {TOO_FEW}
    assert rows[0].mean == pytest.approx(0.125) and rows[0].n_a == 3 and rows[0].n_b == 3
    assert np.isfinite(rows[0].low) and np.isnan(rows[0].p_holm)  # df = 1 interval, but no verdict
    assert np.isnan(rows[1].low) and np.isnan(rows[2].mean)


def test_too_few_seed_rows_stay_out_of_the_holm_family():
    strong = ({s: 1.0 + 0.1 * s + 0.01 * s**2 for s in range(4)}, dict.fromkeys(range(4), 0.0))
    alone = compare_table([strong])[0]
    with_short = compare_table([strong, ({0: 0.1, 1: 0.2}, {0: 0.0, 1: 0.0})])
    assert with_short[0].p_holm == pytest.approx(alone.p_holm) == pytest.approx(alone.p_t)
    doubled = compare_table([strong, strong])
    assert doubled[0].p_holm == pytest.approx(min(1.0, 2 * alone.p_t))


def test_identical_differences_have_no_t_test_and_stay_undecided():
    # 0.5-0.4, 0.6-0.5, 0.7-0.6 are 0.1 up to float rounding: t would be ~1e16 and p ~0
    (row,) = compare_table([({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.5, 2: 0.6})])
    assert row.mean == pytest.approx(0.1) and row.zero_spread
    assert np.isnan(row.low) and np.isnan(row.high) and np.isnan(row.p_t) and np.isnan(row.p_holm)
    assert row.p_sign == pytest.approx(0.25) and row.verdict == UNDECIDED
    (zero,) = compare_table([(dict.fromkeys(range(4), 0.3), dict.fromkeys(range(4), 0.3))])
    assert zero.mean == 0 and zero.verdict == UNDECIDED and zero.p_sign == 1.0
    # not in the family: the other row keeps its unadjusted p
    strong = ({s: 1.0 + 0.1 * s + 0.01 * s**2 for s in range(4)}, dict.fromkeys(range(4), 0.0))
    rows = compare_table([strong, (dict.fromkeys(range(4), 0.3), dict.fromkeys(range(4), 0.3))])
    assert rows[0].p_holm == pytest.approx(rows[0].p_t)


def test_compare_then_adjust_equals_compare_table():
    pairs = [
        ({s: 0.1 * s + 0.02 * (s % 2) for s in range(5)}, dict.fromkeys(range(5), 0.0)),
        ({s: 0.01 * (-1) ** s for s in range(5)}, dict.fromkeys(range(5), 0.0)),
    ]
    assert adjust([compare(a, b) for a, b in pairs]) == compare_table(pairs)
    assert compare(*pairs[0]).verdict == ""  # a verdict needs the whole table


def test_pareto_front():
    assert pareto_front([1, 2, 3, 3], [0.1, 0.3, 0.2, np.nan]).tolist() == [True, True, False, False]
    assert pareto_front([1, 2], [0.3, 0.1], maximize=False).tolist() == [True, True]


def test_tost_p_is_two_one_sided_t_tests_and_matches_the_interval():
    from statsmodels.stats.weightstats import ttost_paired

    from harness.report.stats import tost_p

    rng = np.random.default_rng(7)
    for n, mean, margin in ((3, 0.0, 0.05), (5, 0.01, 0.02), (10, -0.015, 0.02), (8, 0.03, 0.01)):
        d = rng.normal(mean, 0.01, n)
        p = float(tost_p(d, margin))
        assert p == pytest.approx(min(1.0, 2 * ttost_paired(d, np.zeros(n), -margin, margin)[0]))
        t = t_summary(d)
        assert (p < ALPHA) == (-margin < t.low and t.high < margin)  # 95% interval inside +-margin
    assert np.isnan(tost_p(np.full(4, 0.01), 0.05)) and np.isnan(tost_p(np.array([0.01]), 0.05))
