"""The baseline table's verdicts as the study file asks for them: fixed-n or sequential, with equivalence
and the seeds an undecided row would need.

- Seeds as a list (``seeds: [0, 1, 2, 3, 4]``): the fixed-n paired t-tests of ``report/stats.py``, Holm
  across the rows. With ``min_effect`` each row also gets the fixed-n equivalence test (``stats.tost_p``:
  the 95% t-interval inside +-min_effect) and the step-down counts both hypotheses of a row, as
  ``sequential.judge_rows`` does; such a row reads ``equivalent``.
- Seeds as rounds (``seeds: {first: 3, max: 20, step: 2}``; for a study with ``confirm``, the
  confirmation's seeds): the anytime-valid verdicts of ``sequential.decide`` over the same seed-paired
  differences in seed order, with each row's anytime interval, anytime p, Holm p and why it stopped.

Either way each ``undecided`` row carries ``sequential.seeds_needed``: the seeds a fixed-n paired t-test
would need for 80% power at its current difference, and at ``min_effect``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from harness.report.design import Design, Rounds
from harness.report.sequential import decide, judge_rows, seeds_needed
from harness.report.stats import (
    MIN_SEEDS,
    TOO_FEW,
    UNDECIDED,
    Comparison,
    adjust,
    sign_flip_p,
    t_summary,
    tost_p,
)

OPEN = "open"  # a sequential row below max and undecided: the sweep should give it more seeds


@dataclass(frozen=True)
class Plan:
    """How one table's rows are judged: sequentially when the verdict seeds come in rounds."""

    rounds: Rounds | None = None
    min_effect: float | None = None

    @property
    def sequential(self) -> bool:
        return self.rounds is not None

    @property
    def max_seeds(self) -> int | None:
        return self.rounds.max if self.rounds else None

    @property
    def test(self) -> str:
        """The tests, as the finding names them."""
        if self.sequential:
            return f"anytime-valid sequential paired tests (seed rounds up to {self.max_seeds})"
        return "paired t-tests"


def plan_of(design: Design) -> Plan:
    return Plan(design.rounds, design.min_effect)


def judge_table(
    diffs: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]], plan: Plan, maximize: bool = True
) -> list[Comparison]:
    """Verdicts for one table's compared rows: ``diffs`` the seed-paired differences in seed order,
    ``sizes`` each row's (seeds of a, seeds of b)."""
    if not diffs:
        return []
    rows = (
        _sequential(diffs, sizes, plan, maximize) if plan.sequential else _fixed(diffs, sizes, plan, maximize)
    )
    return [_with_seeds_needed(c, d, plan.min_effect) for c, d in zip(rows, diffs)]


def _fixed(diffs, sizes, plan: Plan, maximize: bool) -> list[Comparison]:
    rows = [_summary(d, na, nb) for d, (na, nb) in zip(diffs, sizes)]
    rows = adjust(rows, maximize)
    if plan.min_effect is None:
        return rows
    family = [i for i, c in enumerate(rows) if c.n >= MIN_SEEDS and np.isfinite(c.p_t)]
    if not family:
        return rows
    p_eq = np.array([float(tost_p(diffs[i], plan.min_effect)) for i in family])
    adj0, adj_eq, verdict = judge_rows(
        [rows[i].p_t for i in family], [np.sign(rows[i].mean) for i in family], p_eq, MIN_SEEDS, maximize
    )
    for j, i in enumerate(family):
        rows[i] = replace(
            rows[i],
            p_holm=float(adj0[j]),
            verdict=str(verdict[j]),
            p_equivalent=float(p_eq[j]),
            p_holm_equivalent=float(adj_eq[j]),
        )
    return rows


def _summary(d: np.ndarray, n_a: int, n_b: int) -> Comparison:
    t = t_summary(d)
    return Comparison(
        len(d), n_a, n_b, float(t.mean), float(t.low), float(t.high), float(t.p), float(sign_flip_p(d))
    )


def _sequential(diffs, sizes, plan: Plan, maximize: bool) -> list[Comparison]:
    """decide()'s results as rows; no sign-flip p (a fixed-n test, not shown for seed rounds)."""
    results = decide(diffs, maximize, plan.min_effect, plan.max_seeds)
    return [
        Comparison(
            r.n,
            na,
            nb,
            r.mean,
            r.low,
            r.high,
            r.p,
            np.nan,
            r.p_holm,
            r.verdict,
            r.p_equivalent,
            r.p_holm_equivalent,
            r.stopped or OPEN,
        )
        for r, (na, nb) in zip(results, sizes)
    ]


def _with_seeds_needed(c: Comparison, d: np.ndarray, min_effect: float | None) -> Comparison:
    """An undecided row's seeds needed by a fixed-n t-test (80% power) at its difference and min_effect."""
    if c.verdict != UNDECIDED or len(d) < 2:
        return c
    sd = float(np.std(d, ddof=1))
    at_margin = seeds_needed(min_effect, sd) if min_effect else None
    return replace(c, seeds_needed=seeds_needed(c.mean, sd), seeds_needed_min_effect=at_margin)


def row_statistics(c: Comparison | None, gap: float, plan: Plan) -> dict:
    """A compared row's statistics columns (None: not compared, no columns)."""
    if c is None:
        return {}
    scale = 100 / gap if gap > 0 else np.nan
    diff = "difference (anytime)" if plan.sequential else "difference"
    out = {diff: c.mean, f"{diff} CI low": c.low, f"{diff} CI high": c.high, "seeds paired": c.n}
    if plan.sequential:
        out["p (anytime)"] = c.p_t
    else:
        out |= {"p (paired t)": c.p_t, "p (sign-flip)": c.p_sign}
    out["p (Holm)"] = c.p_holm
    if plan.min_effect is not None:
        kind = "anytime" if plan.sequential else "TOST"
        out |= {f"p equivalent ({kind})": c.p_equivalent, "p equivalent (Holm)": c.p_holm_equivalent}
    out["verdict"] = c.verdict
    if plan.sequential:
        out["stopped"] = c.stopped
    out["seeds needed"] = c.seeds_needed
    if plan.min_effect is not None:
        out[f"seeds needed at {plan.min_effect:g}"] = c.seeds_needed_min_effect
    out |= {
        "gap closed %": c.mean * scale,
        "gap closed % CI low": c.low * scale,
        "gap closed % CI high": c.high * scale,
    }
    return out


def stat_columns(plan: Plan) -> list[str]:
    return list(row_statistics(Comparison(0, 0, 0, *[np.nan] * 5), 1.0, plan))


def cannot_decide(results: Sequence[tuple[str, Comparison]], plan: Plan) -> str:
    """The finding's sentence on the undecided rows: the study cannot decide them within its max
    (sequential, rows that reached it) or with its seeds (fixed), and what a fixed-n test would need."""
    stuck = [
        (m, c) for m, c in results if c.verdict == UNDECIDED and (not plan.sequential or c.stopped != OPEN)
    ]
    if not stuck:
        return ""
    needs = "; ".join(f"{m} {_needed(c, plan)}" for m, c in stuck)
    if plan.sequential:
        return (
            f"The study cannot decide {_names(stuck)} within its max of {plan.max_seeds} seeds "
            f"(a fixed-n paired t-test would need, for 80% power: {needs})."
        )
    ns = sorted({c.n for _, c in stuck})
    seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return (
        f"With {seeds} seeds the study cannot decide {_names(stuck)} (a fixed-n paired t-test would need, "
        f"for 80% power: {needs})."
    )


def open_rows(results: Sequence[tuple[str, Comparison]]) -> str:
    """Sequential rows still below max and undecided: the study has not finished its rounds."""
    running = [m for m, c in results if c.verdict == UNDECIDED and c.stopped == OPEN]
    if not running:
        return ""
    return f"{', '.join(running)}: still open (below the seed max, undecided): run the study's next rounds."


def _names(rows) -> str:
    return ", ".join(m for m, _ in rows)


def _needed(c: Comparison, plan: Plan) -> str:
    at_mean = "no estimate" if c.seeds_needed is None else f"{c.seeds_needed} seeds at its difference"
    if plan.min_effect is None:
        return at_mean
    at_margin = "–" if c.seeds_needed_min_effect is None else str(c.seeds_needed_min_effect)
    return f"{at_mean}, {at_margin} at min_effect {plan.min_effect:g}"


def method_sentences(results: Sequence[tuple[str, Comparison]], qlabel: str, plan: Plan) -> list[str]:
    """The note's account of the statistics columns, for the plan the table was judged under."""
    head = f"Difference = KD − none in {qlabel} over the n seeds both ran (seed-paired)"
    margin = plan.min_effect
    if plan.sequential:
        out = [
            f"Seed rounds, {plan.rounds.text()}: verdicts are sequential and stay valid however many "
            f"rounds looked. {head}: the mean with its anytime-valid 95% interval (a confidence sequence: "
            "it holds after every round at once, so it is wider than a t-interval, and infinite at 2–3 "
            "seeds). p (anytime): 1 / the largest e-value so far; p (Holm): Holm–Bonferroni across all "
            f"{len(results)} compared rows of this table. Verdict: better/worse when the Holm p is below 0.05"
            + (
                f", equivalent when the Holm-adjusted p of |difference| ≥ {margin:g} is below 0.05"
                if margin
                else ""
            )
            + f", undecided otherwise, too few seeds below {MIN_SEEDS}"
            + (
                "; with a margin Holm steps down over both hypotheses of every row, the multiplier counting "
                "the rows with one still open"
                if margin
                else ""
            )
            + f". Stopped: decided, max reached "
            f"({plan.max_seeds} seeds), or {OPEN} (undecided below the max: the next round gives it seeds)."
        ]
    else:
        family = sum(c.verdict != TOO_FEW and np.isfinite(c.p_t) for _, c in results)
        out = [
            f"{head}, mean with a 95% t-interval (df = n − 1). p (paired t): two-sided paired t-test; p "
            "(sign-flip): exact permutation test over all 2^n sign patterns; p (Holm): the paired-t p "
            f"adjusted with Holm–Bonferroni across the rows of this table with at least {MIN_SEEDS} paired "
            f"seeds ({family} here). Verdict: better/worse when the Holm p is below 0.05"
            + (
                f", equivalent when the Holm-adjusted p equivalent is below 0.05 (within ±{margin:g})"
                if margin
                else ""
            )
            + f", undecided otherwise, too few seeds below {MIN_SEEDS} paired seeds. The interval is not "
            "adjusted for the number of rows: it can exclude 0 while the row stays undecided."
        ]
        if margin:
            out.append(
                f"p equivalent (TOST): two one-sided paired t-tests of |difference| ≥ {margin:g} (the "
                "study's min_effect), below 0.05 exactly when the 95% interval lies inside "
                f"±{margin:g}; with a margin, Holm steps down over both hypotheses of every row, the "
                "multiplier counting the rows with one still open."
            )
    out.append(
        "Seeds needed (undecided rows): the seeds a fixed-n two-sided paired t-test at 5% would need for "
        "80% power at the row's current difference"
        + (f" and at {margin:g}" if margin else "")
        + ", from its observed paired sd: a planning number, not a promise."
    )
    return out
