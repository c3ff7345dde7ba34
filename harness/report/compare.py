"""KD against the study's own no-KD baseline: the same student, the same data and schedule, the same seeds.

For each method row (best configuration per method and student, chosen on validation) the baseline is the
best ``none`` configuration with the same ``model.*``, ``data.*`` and ``train.epochs``. The test metric's
difference gets a 95% bootstrap interval over seeds (seed-paired when the seeds match); "n.s." marks an
interval that includes 0. Gap closed = (KD - none) / (teacher - none), with the teacher's test metric.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.report.groups import _norm, best_per, student_keys
from harness.report.load import StudyRuns
from harness.report.markdown import Table, number
from harness.report.stats import bootstrap_difference
from harness.report.tables import keys_frame, quality_label

SAME_STUDENT = ("model.", "data.", "train.epochs")


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


def baseline_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    metric, qlabel = study.quality, quality_label(study)
    keys = student_keys(groups)
    rows = best_per(groups, ["kd.method", *keys], study.objective, study.direction)
    kd_rows = rows[rows["method"] != "none"]
    if not len(kd_rows):
        return None
    nones = groups[(groups["method"] == "none") & (groups["seeds_finished"] > 0)]
    teacher_value = (study.teacher or {}).get("metrics", {}).get(metric, np.nan)
    records, diffs = [], []
    for _, row in kd_rows.iterrows():
        student = _student(row)
        same = nones[[_student(n) == student for _, n in nones.iterrows()]] if len(nones) else nones
        base = best_per(same, [], study.objective, study.direction)
        rec = {
            "KD method": row["method"],
            f"{qlabel} KD": row[metric],
            f"{qlabel} KD std": row[f"{metric} std"],
            f"{qlabel} KD n": row[f"{metric} n"],
        }
        if not len(base):
            records.append(
                {
                    **rec,
                    "significant": "no baseline: no `none` run with this student",
                    "trial # KD / none": f"{', '.join(map(str, row['trials']))} / –",
                }
            )
            continue
        base = base.iloc[0]
        d = bootstrap_difference(
            _per_seed(seeds, row["group"], metric), _per_seed(seeds, base["group"], metric)
        )
        gap = teacher_value - base[metric]
        rec.update(
            {
                f"{qlabel} none": base[metric],
                f"{qlabel} none std": base[f"{metric} std"],
                f"{qlabel} none n": base[f"{metric} n"],
                "difference": d.diff,
                "difference CI low": d.low,
                "difference CI high": d.high,
                "seeds paired": d.paired,
                "significant": ("yes" if d.significant else "n.s.")
                if d.computable
                else "n.s. (too few seeds)",
                "gap closed %": 100 * d.diff / gap if gap > 0 else np.nan,
                "gap closed % CI low": 100 * d.low / gap if gap > 0 else np.nan,
                "gap closed % CI high": 100 * d.high / gap if gap > 0 else np.nan,
                "trial # KD / none": f"{', '.join(map(str, row['trials']))} / {', '.join(map(str, base['trials']))}",
            }
        )
        records.append(rec)
        diffs.append((row["method"], d))
    columns = list(dict.fromkeys(k for rec in sorted(records, key=len, reverse=True) for k in rec))
    out = pd.DataFrame(records, columns=columns)
    if keys:
        out = pd.concat([out.iloc[:, :1], keys_frame(kd_rows, keys), out.iloc[:, 1:]], axis=1)
    teacher = study.teacher
    teacher_text = (
        f"teacher {teacher['name']} {qlabel} {number(teacher_value)}"
        if teacher and pd.notna(teacher_value)
        else "no teacher run found, so no gap closed"
    )
    no_gap = "gap closed %" in out and (out["gap closed %"].isna() & out[f"{qlabel} none"].notna()).any()
    if no_gap and pd.notna(teacher_value):
        teacher_text += (
            " (where gap closed is blank, the teacher is no better than the baseline: there is no gap)"
        )
    note = (
        f"Difference = KD − none in {qlabel}, mean over seeds, with a 95% bootstrap interval "
        f"(10,000 resamples of seed-paired differences); n.s. = the interval includes 0. "
        f"Gap closed = difference / (teacher − none); {teacher_text}."
    )
    return Table("baseline", "KD against the no-KD baseline", out, note, [finding(diffs, qlabel)])


def finding(diffs, qlabel: str) -> str:
    """One plain sentence: did any KD method beat no KD, beyond seed-to-seed noise?"""
    if not diffs:
        return "No KD method has a no-KD baseline with the same student in this study, so none can be judged."
    computable = [(m, d) for m, d in diffs if d.computable]
    if not computable:
        best_m, best_d = max(diffs, key=lambda md: md[1].diff if np.isfinite(md[1].diff) else -np.inf)
        return (
            f"Too few seeds to tell: with one seed per configuration no interval can be computed "
            f"(largest difference: {best_m} {number(best_d.diff, True)} {qlabel}); "
            f"list several seeds in the study (seeds: [0, 1, 2]) to test KD against no KD."
        )
    better = [m for m, d in computable if d.significant and d.diff > 0]
    worse = [m for m, d in computable if d.significant and d.diff < 0]
    parts = []
    if better:
        parts.append(f"{', '.join(better)} beat the no-KD baseline significantly (95% interval above 0)")
    elif worse:
        parts.append("No KD method beat the no-KD baseline significantly")
    else:
        parts.append("No KD method beat the no-KD baseline significantly: every 95% interval includes 0")
    if worse:
        parts.append(f"{', '.join(worse)} did significantly worse than no KD")
    return "; ".join(parts) + "."
