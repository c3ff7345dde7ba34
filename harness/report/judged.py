"""The configurations a study's seed rounds judged stay the rows its report judges.

Seed rounds (``sweep/rounds.py``) fix, when they begin, which configuration of each method (and student)
they add seeds to: the best on the validation objective over the first seeds. More seeds move that
configuration's mean, often down, since it was chosen for being high. Choosing again on the longer record
could then pick another configuration of the method, one the rounds never gave seeds to, and show it as
still open after the sweep has ended. So where the sweep recorded its rounds (the parent run's
``sequential`` record), each method's row is the configuration the rounds judged.
"""

from __future__ import annotations

import pandas as pd

from harness.report.groups import _norm
from harness.report.load import StudyRuns


def _key(row: pd.Series, choice: list[str]) -> tuple[str, ...]:
    return tuple(str(_norm(row.get(f"params.{k}"))) for k in choice)


def judged_rows(
    study: StudyRuns, groups: pd.DataFrame, rows: pd.DataFrame, choice: list[str]
) -> pd.DataFrame:
    """``rows`` (one per combination of ``choice`` keys) with each combination the tuning-phase rounds
    judged replaced by the configuration they judged (found by its tuning trial's number)."""
    record = study.rounds
    if not record or record.get("phase") != "tuning" or not len(rows):
        return rows
    by_trial = {int(n): i for i, trials in zip(groups.index, groups["trials"]) for n in trials}
    judged = {}
    for entry in record.get("rows") or []:
        number = (entry.get("kd") or {}).get("trial")
        if isinstance(number, int) and number in by_trial:
            group = groups.loc[by_trial[number]]
            judged[_key(group, choice)] = group
    if not judged:
        return rows
    out = [judged.get(_key(row, choice), row) for _, row in rows.iterrows()]
    return pd.DataFrame(out).reset_index(drop=True)
