"""Equal tuning, then confirmation: a study with ``arms: {key: kd.method, trials: 8}`` tunes every arm
with the same number of trials, and with ``confirm: {seeds: [100, 101, 102]}`` re-trains each arm's best
tuning configuration on fresh seeds (trial runs tagged ``phase: confirmation``).

The best configuration was chosen by looking at the tuning seeds, so its tuning scores are biased upward
(the winner's curse, larger for an arm tuned more); the confirmation seeds were not looked at. So the
baseline verdicts rest on the confirmation runs alone (``report/compare.py`` pairs confirmation seeds
only), and the arms table shows both phases side by side: per arm the tuning trials it got, its best
tuning configuration's validation objective and tuning-seed test metric, and the confirmation seeds' test
metric. Its note says when an arm got fewer tuning trials than another.
"""

from __future__ import annotations

import pandas as pd

from harness.report.cells import cell, with_unfinished
from harness.report.fairness import row_values, tuning_trials
from harness.report.groups import _norm, best_per, build_groups, group_seeds, student_keys
from harness.report.load import StudyRuns
from harness.report.markdown import Table
from harness.report.tables import keys_frame, label, method_order, quality_label, row_name, trials_text


def confirmation(study: StudyRuns) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The confirmation phase's configurations and seed runs, or None when the study has none."""
    if study.confirmation is None:
        return None
    groups = build_groups(study.confirmation)
    return groups, group_seeds(study.confirmation, groups)


def _config(row: pd.Series, keys: list[str]) -> tuple:
    return tuple(str(_norm(row.get(k))) for k in keys)


def _same_config(a: pd.Series, b: pd.Series) -> bool:
    keys = sorted({str(c) for c in [*a.index, *b.index] if str(c).startswith("params.")})
    return _config(a, keys) == _config(b, keys)


def confirmed(row: pd.Series | None, confirming: pd.DataFrame, choice: list[str]) -> pd.Series | None:
    """The confirmation configuration of a tuning row's arm: the one with the row's ``choice`` values
    (kd.method and student), the row's own configuration first if several."""
    if row is None or not len(confirming):
        return None
    keys = [f"params.{k}" for k in choice]
    same = [r for _, r in confirming.iterrows() if _config(r, keys) == _config(row, keys)]
    exact = [r for r in same if _same_config(r, row)]
    return (exact or same or [None])[0]


def tuned(row: pd.Series, conf_row: pd.Series | None, groups: pd.DataFrame) -> pd.Series:
    """The tuning configuration the confirmation re-trained (the sweep's choice), else the report's row."""
    same = [g for _, g in groups.iterrows() if conf_row is not None and _same_config(g, conf_row)]
    return same[0] if same else row


def arm_key(study: StudyRuns) -> str:
    arms = study.design.arms or {}
    return str(arms.get("key", "kd.method"))


def fewer_trials_note(names: list[str], trials: list[int]) -> str:
    """A sentence when an arm got fewer tuning trials than another."""
    if len(set(trials)) < 2:
        return ""
    most = max(trials)
    short = [f"{n} {t}" for n, t in zip(names, trials) if t < most]
    return (
        f"Unequal tuning: {', '.join(short)} tuning trials against {most} for "
        f"{', '.join(n for n, t in zip(names, trials) if t == most)}; an arm tuned less had fewer chances "
        "to find a good configuration, so it can lose by tuning alone."
    )


def arms_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    """Tuning and confirmation side by side, per arm (and student)."""
    conf = confirmation(study)
    if study.design.arms is None and conf is None:
        return None
    key = arm_key(study)
    keys = [key, *[k for k in student_keys(groups) if k != key]]
    rows = with_unfinished(best_per(groups, keys, study.objective, study.direction), groups, keys)
    rows = rows.sort_values([f"params.{k}" for k in keys], key=method_order).reset_index(drop=True)
    if key == "kd.method":
        rows["params.kd.method"] = rows["method"]
    qlabel = quality_label(study)
    out = keys_frame(rows, keys)
    names = [
        row_name(r, keys[1:]) if key == "kd.method" else str(r[f"params.{key}"]) for _, r in rows.iterrows()
    ]
    trials = [tuning_trials(study, row_values(r, keys)) for _, r in rows.iterrows()]
    records = []
    for (_, best), n in zip(rows.iterrows(), trials):
        done = confirmed(best, conf[0], keys) if conf else None
        row = tuned(best, done, groups)
        records.append(
            {
                "tuning trials": n,
                "best tuning trial #": ", ".join(map(str, row["trials"])),
                **cell(row, study.objective, f"{study.objective} (tuning)"),
                **cell(row, study.quality, f"{qlabel} (tuning seeds)"),
                **(
                    cell(done, study.quality, f"{qlabel} (confirmation seeds)")
                    if done is not None
                    else {f"{qlabel} (confirmation seeds)": "not confirmed"}
                ),
                "confirmation trial #": "–" if done is None else trials_text(pd.DataFrame([done]))[0],
            }
        )
    out = pd.concat([out, pd.DataFrame(records)], axis=1)
    arm = label(key) + (" and student" if len(keys) > 1 else "")
    return Table("arms", "Tuning and confirmation", out, _note(study, arm, names, trials, conf))


def _note(study: StudyRuns, arm: str, names: list[str], trials: list[int], conf) -> str:
    planned = (study.design.arms or {}).get("trials")
    parts = [
        f"One row per {arm}: tuning trials run "
        + (f"(the study gives each arm {planned}); " if planned else "; ")
        + f"the best tuning configuration, chosen on `{study.objective}` over the tuning seeds, with its "
        "tuning-seed test metric, which is biased upward by the choice (the more trials, the more);",
    ]
    if conf is None:
        parts.append("no confirmation runs: the study has no confirm phase, or it has not run yet.")
    else:
        parts.append(
            "its confirmation seeds' test metric: the same configuration re-trained on seeds the choice "
            "never saw. The baseline table's verdicts rest on the confirmation seeds alone."
        )
    parts.append(fewer_trials_note(names, trials))
    return " ".join(p for p in parts if p)
