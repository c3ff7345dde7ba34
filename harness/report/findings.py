"""The finding: one plain sentence above the baseline table, from its verdicts only.

It names the methods called better, worse or equivalent (with their interval and Holm p), counts the
methods tested (the Holm family: rows with at least ``MIN_SEEDS`` paired seeds and a test, so a
zero-spread row is counted apart), and names the rows that were not compared: no seed finished, pruned,
baseline pruned, or not confirmed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from harness.report.markdown import number
from harness.report.sequential import EQUIVALENT
from harness.report.stats import BETTER, MIN_SEEDS, TOO_FEW, WORSE, Comparison


def _seeds_text(results: list[tuple[str, Comparison]]) -> str:
    ns = sorted({c.n for _, c in results})
    return f"n={ns[0]} seeds" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]} seeds"


def count(k: int, noun: str) -> str:
    return f"{k} {noun}" if k == 1 else f"{k} {noun}s"


def finding(
    results: list[tuple[str, Comparison]],
    qlabel: str,
    diverged: Sequence[str] = (),
    pruned: Sequence[str] = (),
    baseline_pruned: Mapping[str, str] | None = None,
    not_confirmed: Sequence[str] = (),
    test: str = "paired t-tests",
    margin: float | None = None,
) -> str:
    """One plain sentence from the verdicts: which KD methods differ from no KD beyond seed noise (or are
    equivalent to it within ``margin``), and which were not compared. ``pruned``: "fitnet (after 2
    seeds)"; ``baseline_pruned``: KD row name -> the pruned baseline's trial numbers; ``not_confirmed``: rows
    of a study with a confirm phase that have no confirmation runs; ``test``: the tests, as named."""
    baseline_pruned = baseline_pruned or {}
    if not results and not_confirmed:
        sentence = (
            "No KD method can be judged yet: the study confirms each arm's best configuration on fresh "
            "seeds and the verdicts rest on those runs, but there are none for "
            f"{', '.join(not_confirmed)}; run the study's confirmation phase."
        )
    elif not results and baseline_pruned:
        trials = ", ".join(dict.fromkeys(baseline_pruned.values()))
        sentence = (
            f"No KD method can be judged: the no-KD baseline was pruned (trial {trials}), so no method has "
            "a baseline to compare with; a study that compares against none must not prune it."
        )
    else:
        sentence = _verdict_sentence(results, qlabel, test, margin)
        if not_confirmed:
            sentence += f" {', '.join(not_confirmed)}: no confirmation runs, not compared."
        if baseline_pruned:
            sentence += f" {', '.join(baseline_pruned)}: the no-KD baseline was pruned, not compared."
    if diverged:
        sentence += f" {', '.join(diverged)}: no seed finished (diverged or failed), not compared."
    if pruned:
        sentence += f" {count(len(pruned), 'method')} pruned by the study's pruner, not compared: {', '.join(pruned)}."
    return sentence


def _verdict_sentence(
    results: list[tuple[str, Comparison]], qlabel: str, test: str, margin: float | None
) -> str:
    if not results:
        return "No KD method has a no-KD baseline with the same student in this study, so none can be judged."
    judged = [(m, c) for m, c in results if c.verdict != TOO_FEW]
    if not judged:
        m, c = max(results, key=lambda mc: mc[1].mean if np.isfinite(mc[1].mean) else -np.inf)
        return (
            f"Too few seeds to tell: a verdict needs at least {MIN_SEEDS} seeds shared with the baseline "
            f"(largest difference: {m} {number(c.mean, True)} {qlabel}, n={c.n}); "
            "list 5 or more seeds in the study (seeds: [0, 1, 2, 3, 4]) to test KD against no KD."
        )
    tested = [(m, c) for m, c in judged if np.isfinite(c.p_t)]
    flat = count(len(judged) - len(tested), "more method" if tested else "method")
    sentence = (
        _called(tested, qlabel, test, margin) if tested else "No KD method could be tested against no KD:"
    )
    if len(judged) > len(tested):
        sentence += f" {flat} with the same difference on every seed (zero spread) not tested."
    unjudged = len(results) - len(judged)
    if unjudged:
        sentence += f" {count(unjudged, 'more method')} with fewer than {MIN_SEEDS} seeds in common with the baseline not judged."
    return sentence


def _called(tested: list[tuple[str, Comparison]], qlabel: str, test: str, margin: float | None) -> str:
    """The verdicts of the Holm family's rows."""
    called = [(m, c) for m, c in tested if c.verdict in (BETTER, WORSE, EQUIVALENT)]
    how = f"({_seeds_text(tested)}; Holm-corrected {test} over {count(len(tested), 'method')})"
    if not called:
        return f"No KD method differs from training without KD beyond seed noise {how}."
    parts = [_call(m, c, qlabel, margin) for m, c in called]
    rest = len(tested) - len(called)
    if rest:
        others = "the other method does" if rest == 1 else f"the other {rest} methods do"
        parts.append(f"{others} not differ from no KD beyond seed noise")
    return "; ".join(parts) + f" {how}."


def _call(m: str, c: Comparison, qlabel: str, margin: float | None) -> str:
    interval = f"{number(c.mean, True)} [{number(c.low, True)}, {number(c.high, True)}] {qlabel}"
    if c.verdict == EQUIVALENT:
        return (
            f"{m} is equivalent to no KD within ±{margin:g}: {interval}, "
            f"Holm p (equivalence) = {number(c.p_holm_equivalent)}"
        )
    return f"{m} is {c.verdict} than no KD: {interval}, Holm p = {number(c.p_holm)}"
