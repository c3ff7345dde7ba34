"""KD against the study's own no-KD baseline: the same student, the same data and schedule, the same seeds.

For each method row (best configuration per method and student, chosen on validation) the baseline is the
best ``none`` configuration with the same ``model.*``, ``data.*`` and ``train.epochs``. The test metric's
seed-paired difference gets a 95% t-interval, a paired-t p, an exact sign-flip p, a Holm-adjusted p across
the table's rows and a verdict (``report/stats.py``; docs/reading-reports.md). Gap closed =
(KD - none) / (teacher - none), with the teacher's test metric, and its interval is the difference's
interval divided by the same gap. A method none of whose configurations finished a seed stays in the table
as a ``Div.`` row with no statistics; each row says how many trials tuned the method and the baseline, and
the note flags a method tuned with more than twice the baseline's trials (``report/fairness.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.report.cells import cell, marker, with_unfinished
from harness.report.fairness import budgets, fairness_note, tuning_flags
from harness.report.groups import _norm, best_per, student_keys
from harness.report.load import StudyRuns
from harness.report.markdown import Table, number
from harness.report.stats import BETTER, MIN_SEEDS, TOO_FEW, WORSE, Comparison, adjust, compare
from harness.report.tables import keys_frame, quality_label, row_name

SAME_STUDENT = ("model.", "data.", "train.epochs")
SIGN_FLIP_FLOOR_N = 6  # below this the exact sign-flip p cannot reach 0.05 (floor 2 / 2^n)


def _student(row: pd.Series) -> tuple:
    return tuple(
        sorted(
            (k, _norm(v))
            for k, v in row.items()
            if isinstance(k, str)
            and k.startswith("params.")
            and k.removeprefix("params.").startswith(SAME_STUDENT)
        )
    )


def _per_seed(seeds: pd.DataFrame, group: int, metric: str) -> dict[int, float]:
    runs = seeds[(seeds["group"] == group) & (seeds["state"] == "finished")]
    col = f"metrics.{metric}"
    if col not in runs:
        return {}
    return {int(s): float(v) for s, v in zip(runs["seed"], runs[col]) if pd.notna(s) and pd.notna(v)}


def higher_is_better(metric: str) -> bool:
    """The report's quality metrics are maximised (mIoU, accuracy); losses are minimised."""
    return not metric.rsplit("/", 1)[-1].endswith("loss")


def _baseline(nones: pd.DataFrame, row: pd.Series, study: StudyRuns) -> pd.Series | None:
    student = _student(row)
    same = nones[[_student(n) == student for _, n in nones.iterrows()]] if len(nones) else nones
    base = best_per(same, [], study.objective, study.direction)
    return base.iloc[0] if len(base) else None


def _record(row: pd.Series, base: pd.Series | None, metric: str, qlabel: str) -> dict:
    rec = {"KD method": row["method"], **cell(row, metric, f"{qlabel} KD")}
    none = cell(base, metric, f"{qlabel} none") if base is not None else {}
    rec.update({k: none.get(k, np.nan) for k in cell(row, metric, f"{qlabel} none")})
    none_trials = "–" if base is None else ", ".join(map(str, base["trials"]))
    rec["trial # KD / none"] = f"{', '.join(map(str, row['trials']))} / {none_trials}"
    return rec


def _statistics(c: Comparison | None, gap: float, diverged: bool = False) -> dict:
    if diverged:
        return {"verdict": "no finished seed (Div.): not compared"}
    if c is None:
        return {"verdict": "no baseline: no `none` run with this student"}
    scale = 100 / gap if gap > 0 else np.nan
    return {
        "difference": c.mean,
        "difference CI low": c.low,
        "difference CI high": c.high,
        "seeds paired": c.n,
        "p (paired t)": c.p_t,
        "p (sign-flip)": c.p_sign,
        "p (Holm)": c.p_holm,
        "verdict": c.verdict,
        "gap closed %": c.mean * scale,
        "gap closed % CI low": c.low * scale,
        "gap closed % CI high": c.high * scale,
    }


STAT_COLUMNS = list(_statistics(Comparison(0, 0, 0, *[np.nan] * 5), 1.0))


def baseline_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    metric, qlabel = study.quality, quality_label(study)
    keys = student_keys(groups)
    choice = ["kd.method", *keys]
    rows = with_unfinished(best_per(groups, choice, study.objective, study.direction), groups, choice)
    kd_rows = rows[rows["method"] != "none"]
    if not len(kd_rows):
        return None
    nones = groups[(groups["method"] == "none") & (groups["seeds_finished"] > 0)]
    teacher_value = (study.teacher or {}).get("metrics", {}).get(metric, np.nan)
    records, gaps, compared = [], [], {}
    diverged = [marker(row) is not None for _, row in kd_rows.iterrows()]
    for i, (_, row) in enumerate(kd_rows.iterrows()):
        base = _baseline(nones, row, study)
        records.append(_record(row, base, metric, qlabel))
        gaps.append(np.nan if base is None else teacher_value - base[metric])
        if base is not None and not diverged[i]:
            compared[i] = compare(
                _per_seed(seeds, row["group"], metric), _per_seed(seeds, base["group"], metric)
            )
    judged = dict(zip(compared, adjust(list(compared.values()), higher_is_better(metric))))
    mine, none = budgets(study, kd_rows, choice)
    for i, rec in enumerate(records):
        rec.update(_statistics(judged.get(i), gaps[i], diverged[i]))
        rec["tuning trials KD / none"] = f"{mine[i]} / {none[i]}"
    tail = ["tuning trials KD / none", "trial # KD / none"]
    columns = [c for c in records[0] if c not in (*STAT_COLUMNS, *tail)] + STAT_COLUMNS + tail
    out = pd.DataFrame(records, columns=columns)
    if keys:
        out = pd.concat([out.iloc[:, :1], keys_frame(kd_rows, keys), out.iloc[:, 1:]], axis=1)
    names = [row_name(row, keys) for _, row in kd_rows.iterrows()]
    results = [(names[i], c) for i, c in judged.items()]
    lost = [n for n, d in zip(names, diverged) if d]
    flags = tuning_flags(names, list(kd_rows["method"]), mine, none)
    note = _note(results, qlabel, _teacher_text(study, teacher_value, qlabel, out), flags)
    return Table("baseline", "KD against the no-KD baseline", out, note, [finding(results, qlabel, lost)])


def _teacher_text(study: StudyRuns, teacher_value: float, qlabel: str, out: pd.DataFrame) -> str:
    teacher = study.teacher
    if not (teacher and pd.notna(teacher_value)):
        return "no teacher run found, so no gap closed"
    text = f"teacher {teacher['name']} {qlabel} {number(teacher_value)}"
    if (out["gap closed %"].isna() & out[f"{qlabel} none"].notna()).any():
        text += " (where gap closed is blank, the teacher is no better than the baseline: there is no gap)"
    return text


def _note(results: list[tuple[str, Comparison]], qlabel: str, teacher_text: str, flags: list[str]) -> str:
    family = sum(c.verdict != TOO_FEW and np.isfinite(c.p_t) for _, c in results)
    parts = [
        f"Difference = KD − none in {qlabel} over the n seeds both ran (seed-paired), mean with a 95% "
        "t-interval (df = n − 1). p (paired t): two-sided paired t-test; p (sign-flip): exact permutation "
        "test over all 2^n sign patterns; p (Holm): the paired-t p adjusted with Holm–Bonferroni across the "
        f"rows of this table with at least {MIN_SEEDS} paired seeds ({family} here). Verdict: better/worse "
        f"when the Holm p is below 0.05, undecided otherwise, too few seeds below {MIN_SEEDS} paired seeds. "
        "The interval is not adjusted for the number of rows: it can exclude 0 while the row stays undecided.",
        f"Gap closed = difference / (teacher − none), its interval the difference's divided by the same "
        f"gap; {teacher_text}.",
    ]
    small = sorted({c.n for _, c in results if 0 < c.n < SIGN_FLIP_FLOOR_N})
    if small:
        floors = ", ".join(f"{2 / 2**n:.3g} at n = {n}" for n in small)
        parts.append(
            f"With n ≤ 5 seeds the sign-flip p cannot reach 0.05: its floor is 2/2^n ({floors} here); "
            "from n = 6 it can."
        )
    flat = [m for m, c in results if c.zero_spread]
    if flat:
        parts.append(
            f"{', '.join(flat)}: the same difference on every seed, so no t-test (zero spread) and the "
            "verdict stays undecided; check that the seeds change the runs."
        )
    parts.append(
        "KD and none cells: mean ± std over finished seeds (n), with the seeds that diverged or failed; "
        "tuning trials: the trials the study ran for the method and for none with this student."
    )
    parts.append(fairness_note([], flags))
    return " ".join(p for p in parts if p)


def _seeds_text(results: list[tuple[str, Comparison]]) -> str:
    ns = sorted({c.n for _, c in results})
    return f"n={ns[0]} seeds" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]} seeds"


def _count(k: int, noun: str) -> str:
    return f"{k} {noun}" if k == 1 else f"{k} {noun}s"


def finding(results: list[tuple[str, Comparison]], qlabel: str, diverged: list[str] = ()) -> str:
    """One plain sentence from the verdicts: which KD methods differ from no KD beyond seed noise (and
    which diverged on every seed)."""
    lost = f" {', '.join(diverged)}: no seed finished (diverged or failed), not compared." if diverged else ""
    return _verdict_sentence(results, qlabel) + lost


def _verdict_sentence(results: list[tuple[str, Comparison]], qlabel: str) -> str:
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
    called = [(m, c) for m, c in judged if c.verdict in (BETTER, WORSE)]
    how = f"({_seeds_text(judged)}; Holm-corrected paired t-tests over {_count(len(judged), 'method')})"
    if called:
        parts = [
            f"{m} is {c.verdict} than no KD: {number(c.mean, True)} [{number(c.low, True)}, "
            f"{number(c.high, True)}] {qlabel}, Holm p = {number(c.p_holm)}"
            for m, c in called
        ]
        rest = len(judged) - len(called)
        if rest:
            others = "the other method does" if rest == 1 else f"the other {rest} methods do"
            parts.append(f"{others} not differ from no KD beyond seed noise")
        sentence = "; ".join(parts) + f" {how}."
    else:
        sentence = f"No KD method differs from training without KD beyond seed noise {how}."
    unjudged = len(results) - len(judged)
    if unjudged:
        sentence += f" {_count(unjudged, 'more method')} with fewer than {MIN_SEEDS} seeds in common with the baseline not judged."
    return sentence
