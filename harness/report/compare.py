"""KD against the study's own no-KD baseline: the same student, the same data and schedule, the same seeds.

For each method row (best configuration per method and student, chosen on validation) the baseline is the
best ``none`` configuration with the same ``model.*``, ``data.*``, ``train.epochs`` and ``train.budget.*``
and the same value of every other ``train.*`` key the study did not search (device settings aside); keys
the study searched may differ, each arm keeping its best value, and the note lists where they do
(``report/fairness.py``). The test metric's seed-paired difference gets an interval, p's, a Holm-adjusted
p across the table's rows and a verdict: fixed-n or sequential, with equivalence when the study has a
``min_effect``, and the seeds an undecided row would need (``report/decisive.py``; docs/reading-reports.md).
A study with a confirm phase is judged on its confirmation runs alone: each row's tuning choice is looked up
among them (``report/arms.py``). The trivial predictor's score stands beside the baseline, and the finding
warns instead when the comparison cannot mean anything (``report/sanity.py``). Gap closed = (KD - none) / (teacher - none), with the teacher's test metric and
the baseline's mean over the paired seeds, and its interval is the difference's interval divided by the
same gap. A method none of whose configurations finished a seed stays in the table as a ``Div.`` row, a
pruned one as a row with its mean so far; neither is compared, nor is a row whose baseline was pruned.
Each row says how many trials tuned the method and the baseline, and the note flags a method tuned with
more than twice the baseline's trials (``report/fairness.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.report.arms import confirmation, confirmed
from harness.report.cells import DIV, FAILED, cell, fill_pruned, is_pruned, marker, with_unfinished
from harness.report.decisive import (
    Plan,
    cannot_decide,
    judge_table,
    method_sentences,
    open_rows,
    plan_of,
    row_statistics,
    stat_columns,
)
from harness.report.fairness import (
    budgets,
    differences,
    fairness_note,
    matched_keys,
    searched_keys,
    selection_note,
    tuned_apart,
    tuning_flags,
)
from harness.report.findings import finding
from harness.report.groups import _norm, best_per, student_keys
from harness.report.judged import judged_rows
from harness.report.load import StudyRuns
from harness.report.markdown import Table, number
from harness.report.sanity import trivial_score, trivial_text, warning_finding, warnings
from harness.report.stats import Comparison, paired_differences
from harness.report.tables import keys_frame, label, quality_label, row_name

__all__ = ["baseline_table", "finding", "higher_is_better"]

SIGN_FLIP_FLOOR_N = 6  # below this the exact sign-flip p cannot reach 0.05 (floor 2 / 2^n)
NO_BASELINE = "no baseline: no `none` run with this student and fixed training settings"
NOT_CONFIRMED = "not confirmed: no confirmation runs of this configuration"
BASE_NOT_CONFIRMED = "baseline not confirmed: no confirmation runs of its none configuration"


def _per_seed(seeds: pd.DataFrame, group: int, metric: str) -> dict[int, float]:
    runs = seeds[(seeds["group"] == group) & (seeds["state"] == "finished")]
    col = f"metrics.{metric}"
    if col not in runs:
        return {}
    return {int(s): float(v) for s, v in zip(runs["seed"], runs[col]) if pd.notna(s) and pd.notna(v)}


def higher_is_better(metric: str) -> bool:
    """The report's quality metrics are maximised (mIoU, accuracy); losses are minimised."""
    return not metric.rsplit("/", 1)[-1].endswith("loss")


def _values(row: pd.Series, keys: list[str]) -> tuple:
    return tuple(str(_norm(row.get(f"params.{k}"))) for k in keys)


def _baseline(nones: pd.DataFrame, row: pd.Series, study: StudyRuns, keys: list[str]) -> pd.Series | None:
    """The best ``none`` configuration sharing the row's ``keys``; failing one with a finished seed, a
    pruned one (so the table can say the baseline was pruned rather than missing)."""
    target = _values(row, keys)
    same = nones[
        pd.Series([_values(n, keys) == target for _, n in nones.iterrows()], index=nones.index, dtype=bool)
    ]
    base = best_per(same, [], study.objective, study.direction)
    if len(base):
        return base.iloc[0]
    pruned = same[same["pruned"]]
    return pruned.iloc[0] if len(pruned) else None


def _not_compared(row: pd.Series, base: pd.Series | None) -> str | None:
    """Why a row gets no statistics, or None when it is compared."""
    if marker(row) in (DIV, FAILED):
        return "no finished seed (Div.): not compared"
    if is_pruned(row):
        return f"pruned {_pruned_when(row)}: not compared"
    if base is None:
        return NO_BASELINE
    if is_pruned(base):
        return f"baseline pruned (none, trial {_trials(base)}): not compared"
    return None


def _pruned_when(row: pd.Series) -> str:
    n = int(row["seeds_finished"])
    return f"after {n} finished seed{'s' if n != 1 else ''}" if n else "before a seed finished"


def _trials(row: pd.Series | None) -> str:
    return "–" if row is None else ", ".join(map(str, row["trials"]))


def _side(row: pd.Series | None, metric: str, name: str, missing) -> dict:
    """One side's quality cell; ``missing`` where the side has no configuration."""
    if row is not None:
        return cell(row, metric, name)
    return {**dict.fromkeys(cell(pd.Series(dtype=object), metric, name), np.nan), name: missing}


def _record(method: str, row, base, metric: str, qlabel: str, trivial: float, missing) -> dict:
    rec = {"KD method": method, **_side(row, metric, f"{qlabel} KD", missing)}
    rec.update(_side(base, metric, f"{qlabel} none", missing))
    rec[f"trivial {qlabel}"] = trivial
    rec["trial # KD / none"] = f"{_trials(row)} / {_trials(base)}"
    return rec


def _paired_mean(base: dict[int, float], kd: dict[int, float]) -> float:
    """The baseline's mean over the seeds both sides finished (the seeds the difference is over)."""
    common = sorted(set(base) & set(kd))
    return float(np.mean([base[s] for s in common])) if common else np.nan


@dataclass
class Sides:
    """The configurations a table's rows are judged on: the tuning choices, or for a study with a confirm
    phase their confirmation runs; ``seeds`` the seed runs their values come from."""

    rows: list[pd.Series | None]
    bases: list[pd.Series | None]
    reasons: list[str | None]
    seeds: pd.DataFrame
    missing: object = np.nan  # what a cell without a configuration shows


def _sides(study: StudyRuns, kd_rows: pd.DataFrame, bases: list, seeds: pd.DataFrame, choice) -> Sides:
    rows = [row for _, row in kd_rows.iterrows()]
    reasons = [_not_compared(row, base) for row, base in zip(rows, bases)]
    conf = confirmation(study)
    if conf is None:
        return Sides(rows, bases, reasons, seeds)
    groups, conf_seeds = conf
    rows = [confirmed(r, groups, choice) for r in rows]
    bases = [confirmed(b, groups, choice) for b in bases]
    for i, (row, base) in enumerate(zip(rows, bases)):
        if reasons[i] is None:
            missing = NOT_CONFIRMED if row is None else BASE_NOT_CONFIRMED if base is None else None
            reasons[i] = missing or _not_compared(row, base)
    return Sides(rows, bases, reasons, conf_seeds, "not confirmed")


def baseline_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    metric, qlabel, plan = study.quality, quality_label(study), plan_of(study.design)
    keys = student_keys(groups)
    choice = ["kd.method", *keys]
    rows = with_unfinished(best_per(groups, choice, study.objective, study.direction), groups, choice)
    rows = judged_rows(study, groups, rows, choice)
    kd_rows = rows[rows["method"] != "none"]
    if not len(kd_rows):
        return None
    searched = searched_keys(study)
    matched, apart = matched_keys(groups, searched), tuned_apart(groups, searched)
    nones = groups[groups["method"] == "none"]
    teacher_value = (study.teacher or {}).get("metrics", {}).get(metric, np.nan)
    names = [row_name(row, keys) for _, row in kd_rows.iterrows()]
    tuned_bases = [_baseline(nones, row, study, matched) for _, row in kd_rows.iterrows()]
    sides = _sides(study, kd_rows, tuned_bases, seeds, choice)
    records, gaps, diffs, sizes = [], [], {}, {}
    for i, (method, row, base) in enumerate(zip(kd_rows["method"], sides.rows, sides.bases)):
        trivial = trivial_score(study, _runs_of(sides.seeds, base))
        records.append(_record(method, row, base, metric, qlabel, trivial, sides.missing))
        gaps.append(np.nan)
        if sides.reasons[i] is None:
            kd_seeds = _per_seed(sides.seeds, row["group"], metric)
            none_seeds = _per_seed(sides.seeds, base["group"], metric)
            diffs[i], sizes[i] = paired_differences(kd_seeds, none_seeds), (len(kd_seeds), len(none_seeds))
            gaps[i] = teacher_value - _paired_mean(none_seeds, kd_seeds)
    judged = dict(
        zip(diffs, judge_table(list(diffs.values()), list(sizes.values()), plan, higher_is_better(metric)))
    )
    mine, none = budgets(study, kd_rows, choice)
    for i, rec in enumerate(records):
        rec.update({"verdict": sides.reasons[i], **row_statistics(judged.get(i), gaps[i], plan)})
        rec["tuning trials KD / none"] = f"{mine[i]} / {none[i]}"
    tail = ["tuning trials KD / none", "trial # KD / none"]
    every = dict.fromkeys(k for rec in records for k in rec)
    stats = stat_columns(plan)
    columns = [c for c in every if c not in (*stats, *tail)] + stats + tail
    out = fill_pruned(pd.DataFrame(records, columns=columns))
    if keys:
        out = pd.concat([out.iloc[:, :1], keys_frame(kd_rows, keys), out.iloc[:, 1:]], axis=1)
    results = [(names[i], c) for i, c in judged.items()]
    tuned = [r for _, r in kd_rows.iterrows()]
    parts = {
        "teacher": _teacher_text(study, teacher_value, qlabel, out),
        "trivial": _trivial_note(study, out, qlabel),
        "flags": tuning_flags(names, list(kd_rows["method"]), mine, none),
        "apart": _apart_text(names, tuned, tuned_bases, apart),
        "selection": selection_note(
            study,
            [*names, *["none"] * len(tuned_bases)],
            [*tuned, *[b for b in tuned_bases if b is not None]],
        ),
        "pruned": any(is_pruned(r) for r in [*tuned, *tuned_bases]),
        "confirm": sides.missing == "not confirmed",
    }
    students = _students(study, sides, keys, metric)
    text = _finding(results, qlabel, names, tuned, tuned_bases, sides.reasons, plan)
    warned = warnings(students, teacher_value, qlabel)
    return Table(
        "baseline",
        "KD against the no-KD baseline",
        out,
        _note(results, qlabel, parts, plan),
        [warning_finding(warned) if warned else text],
    )


def _runs_of(seeds: pd.DataFrame, row: pd.Series | None) -> pd.DataFrame:
    return seeds[seeds["group"] == row["group"]] if row is not None else seeds.iloc[:0]


def _students(study: StudyRuns, sides: Sides, keys: list[str], metric: str) -> list[tuple[str, float, float]]:
    """Each distinct baseline with a finished seed: its name, test score and trivial score."""
    out, seen = [], set()
    for base in sides.bases:
        if base is None or base["seeds_finished"] == 0 or base["group"] in seen:
            continue
        seen.add(base["group"])
        student = ", ".join(f"{label(k)}={base.get(f'params.{k}')}" for k in keys)
        name = f"the no-KD student ({student})" if keys else "the no-KD student"
        out.append((name, float(base.get(metric, np.nan)), trivial_score(study, _runs_of(sides.seeds, base))))
    return out


def _trivial_note(study: StudyRuns, out: pd.DataFrame, qlabel: str) -> str:
    scores = pd.to_numeric(out[f"trivial {qlabel}"], errors="coerce").dropna().unique()
    if len(scores) > 1:
        return f"trivial {qlabel}: the strongest trivial predictor's score on each baseline's data"
    return trivial_text(study, study.seeds, qlabel)


def _finding(
    results: list[tuple[str, Comparison]],
    qlabel: str,
    names: list[str],
    rows: list[pd.Series],
    bases: list[pd.Series | None],
    reasons: list[str | None],
    plan: Plan,
) -> str:
    """The finding sentence, with the rows that were not compared and why, and what the undecided rows
    would need."""
    diverged = [n for n, r in zip(names, rows) if marker(r) in (DIV, FAILED)]
    pruned = [f"{n} ({_pruned_when(r)})" for n, r in zip(names, rows) if is_pruned(r)]
    base_pruned = {
        n: _trials(b) for n, b, why in zip(names, bases, reasons) if why and why.startswith("baseline pruned")
    }
    unconfirmed = [n for n, why in zip(names, reasons) if why in (NOT_CONFIRMED, BASE_NOT_CONFIRMED)]
    text = finding(
        results, qlabel, diverged, pruned, base_pruned, unconfirmed, test=plan.test, margin=plan.min_effect
    )
    return " ".join(p for p in (text, cannot_decide(results, plan), open_rows(results)) if p)


def _apart_text(names: list[str], rows: list[pd.Series], bases: list, apart: list[str]) -> str:
    """The rule for the baseline's training settings, and where searched ones differ from the row's."""
    rule = (
        "The baseline is the best none configuration with the same student, data, epochs (or iterations) and budget and the "
        "same fixed training settings (every train.* key but the seed, device settings and the keys the "
        "study searched)."
    )
    if not apart:
        return rule
    differ = [
        f"{n}: {d}"
        for n, r, b in zip(names, rows, bases)
        if b is not None and (d := differences(r, b, apart))
    ]
    searched = ", ".join(k.removeprefix("train.") for k in apart)
    text = (
        f"{rule} Training settings the study searched ({searched}) may differ: each arm keeps its best value"
    )
    return f"{text}; here {'; '.join(differ)}." if differ else f"{text}; here none do."


def _teacher_text(study: StudyRuns, teacher_value: float, qlabel: str, out: pd.DataFrame) -> str:
    teacher = study.teacher
    if not (teacher and pd.notna(teacher_value)):
        return "no teacher run found, so no gap closed"
    found = f" (found in {teacher['found_in']})" if teacher.get("found_in") else ""
    text = f"teacher {teacher['name']}{found} {qlabel} {number(teacher_value)}"
    if (out["gap closed %"].isna() & out["seeds paired"].notna()).any():
        text += " (where gap closed is blank, the teacher is no better than the baseline: there is no gap)"
    return text


def _note(results: list[tuple[str, Comparison]], qlabel: str, parts: dict, plan: Plan) -> str:
    sentences = [
        *method_sentences(results, qlabel, plan),
        f"Gap closed = difference / (teacher − none), none's mean over the paired seeds, its interval the "
        f"difference's divided by the same gap; {parts['teacher']}. Beside the baseline: {parts['trivial']}.",
    ]
    if parts["confirm"]:
        sentences.append(
            "Confirmation: each row is the tuning choice (on validation, over the tuning seeds) re-trained "
            "on the confirmation seeds, and the KD and none cells, the difference and the verdict are over "
            "the confirmation seeds alone; the arms table shows the tuning results beside them."
        )
    if not plan.sequential:
        small = sorted({c.n for _, c in results if 0 < c.n < SIGN_FLIP_FLOOR_N})
        if small:
            floors = ", ".join(f"{2 / 2**n:.3g} at n = {n}" for n in small)
            sentences.append(
                f"With n ≤ 5 seeds the sign-flip p cannot reach 0.05: its floor is 2/2^n ({floors} here); "
                "from n = 6 it can."
            )
    flat = [m for m, c in results if c.zero_spread]
    if flat:
        sentences.append(
            f"{', '.join(flat)}: the same difference on every seed, so no t-test (zero spread) and the "
            "verdict stays undecided; check that the seeds change the runs."
        )
    if parts["pruned"]:
        sentences.append(
            "Pruned: the study's pruner stopped that configuration before it ran every seed; its cells are "
            "the mean over the seeds it finished, and it is not compared (nor is a row whose baseline was "
            "pruned)."
        )
    sentences += [
        parts["apart"],
        parts["selection"],
        "KD and none cells: mean ± std over finished seeds (n), with the seeds that diverged or failed; "
        "tuning trials: the trials the study ran for the method and for none with this student.",
        fairness_note([], parts["flags"]),
    ]
    return " ".join(p for p in sentences if p)
