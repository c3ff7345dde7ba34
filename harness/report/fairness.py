"""Fair comparisons: how much tuning each row's method got, and the schedule it was trained with.

A method tuned with many trials against a baseline tuned with one can win by tuning alone, and a longer
schedule can beat KD on its own (docs/reading-reports.md). The method and baseline tables count each
row's trials and show its schedule; a note flags a method that got more than ``TUNING_RATIO`` times the
trials of the ``none`` baseline with the same student.
"""

from __future__ import annotations

import pandas as pd

from harness.report.groups import _norm
from harness.report.load import StudyRuns

TUNING_RATIO = 2
SCHEDULE = (
    ("train.epochs", "{} ep"),
    ("train.optimizer", "{}"),
    ("train.lr", "lr {:g}"),
    ("train.scheduler", "{}"),
    ("train.batch_size", "batch {}"),
    ("train.early_stopping", "early stop {}"),
)
SCHEDULER_NONE = "constant"  # train.scheduler "none": the lr stays where it starts


def row_values(row: pd.Series, keys: list[str]) -> dict:
    """A table row's values of ``keys`` (``kd.method`` read from the method label, combos included)."""
    return {k: row["method"] if k == "kd.method" else row.get(f"params.{k}") for k in keys}


def tuning_trials(study: StudyRuns, values: dict) -> int:
    """Trials the study ran, in any state (pruned, diverged and failed included), with these config values:
    the tuning that method and student got."""
    trials = study.trials
    match = pd.Series(True, index=trials.index)
    for key, value in values.items():
        col = "method" if key == "kd.method" else f"params.{key}"
        column = trials[col] if col in trials else pd.Series(None, index=trials.index, dtype=object)
        match &= column.map(lambda v: str(_norm(v))) == str(_norm(value))
    return int(match.sum())


def budgets(study: StudyRuns, rows: pd.DataFrame, keys: list[str]) -> tuple[list[int], list[int]]:
    """Per row: the trials its method got, and the trials ``none`` got with the same student."""
    mine, none = [], []
    for _, row in rows.iterrows():
        values = row_values(row, keys)
        mine.append(tuning_trials(study, values))
        none.append(tuning_trials(study, {**values, "kd.method": "none"}))
    return mine, none


def schedule(row: pd.Series) -> str:
    """The training schedule as a compact phrase, e.g. "8 ep, adam, lr 0.005, cosine, batch 32"
    (``constant``: no lr scheduler)."""
    parts = []
    for key, fmt in SCHEDULE:
        value = _norm(row.get(f"params.{key}"))
        if value is None:
            continue
        if key == "train.scheduler" and value == "none":
            value = SCHEDULER_NONE
        try:
            parts.append(fmt.format(value))
        except (TypeError, ValueError):
            parts.append(f"{key.removeprefix('train.')} {value}")
    return ", ".join(parts) or "–"


def tuning_flags(names: list[str], methods: list[str], mine: list[int], none: list[int]) -> list[str]:
    """One sentence per KD row tuned with more than TUNING_RATIO times the baseline's trials."""
    return [
        f"{name} got {k} trials of tuning, none {m}: its advantage may come from tuning, not KD."
        for name, method, k, m in zip(names, methods, mine, none)
        if method != "none" and m > 0 and k > TUNING_RATIO * m
    ]


def fairness_note(schedules: list[str], flags: list[str]) -> str:
    """Sentences for under a table: schedules that differ between rows, and the tuning-budget flags."""
    parts = []
    if len(set(schedules)) > 1:
        parts.append(
            "Rows were trained with different schedules (schedule column): a longer or better-tuned "
            "schedule can beat KD on its own."
        )
    if flags:
        parts.append("Tuning budgets differ: " + " ".join(flags))
    return " ".join(parts)
