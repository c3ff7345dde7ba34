"""Fair comparisons: how much tuning each row's method got, the schedule it was trained with, and which
training settings a KD row shares with its baseline.

A method tuned with many trials against a baseline tuned with one can win by tuning alone, and a longer
schedule can beat KD on its own (docs/reading-reports.md). The method and baseline tables count each
row's trials and show its schedule; a note flags a method that got more than ``TUNING_RATIO`` times the
trials of the ``none`` baseline with the same student.

A KD row's baseline has the same student, data, epochs or iterations and budget (``ALWAYS_MATCHED``) and the same value
of every other ``train.*`` key that changes what is trained, except the keys the study searched: each arm
keeps its own best value of those (insisting on the KD row's lr would leave ``none`` untuned, or no
baseline at all), and the note lists where they differ. Device settings (``DEVICE_SETTINGS``) never count.
"""

from __future__ import annotations

import pandas as pd

from harness.data.base import quality_metric
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
ALWAYS_MATCHED = (
    "model.",
    "data.",
    "train.epochs",
    "train.iterations",
    "train.budget.",
)  # student, data, how long
# train.* keys that change how the runs use the machine, not what is trained
DEVICE_SETTINGS = (
    "train.seed",
    "train.device",
    "train.channels_last",
    "train.compile",
    "train.teacher_cache",
    "train.teacher_cache_gb",
    "train.eval_batch_size",
)


def row_values(row: pd.Series, keys: list[str]) -> dict:
    """A table row's values of ``keys`` (``kd.method`` read from the method label, combos included)."""
    return {k: row["method"] if k == "kd.method" else row.get(f"params.{k}") for k in keys}


def tuning_trials(study: StudyRuns, values: dict) -> int:
    """Trials the study ran, in any state (pruned, diverged and failed included), with these config values:
    the tuning that method and student got. Trials that only added seeds (seed rounds) are not tuning."""
    trials = study.trials
    if "extra" in trials:
        trials = trials[~trials["extra"].astype(bool)]
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


def searched_keys(study: StudyRuns) -> set[str]:
    """Config keys the study searched: those its trials record as ``search.<key>``, and for a search entry
    with its own ``key`` (``fitnet_beta: {key: kd.beta}``) the train.* keys that hold its value in every
    trial that sampled it."""
    trials = study.trials
    found = set()
    for col in [c for c in trials if c.startswith("params.search.")]:
        key = col.removeprefix("params.search.")
        if f"params.{key}" in trials:
            found.add(key)
            continue
        sampled = trials[trials[col].notna()]
        if len(sampled):
            train = [c for c in trials if c.startswith("params.train.")]
            found |= {c.removeprefix("params.") for c in train if _same(sampled[c], sampled[col])}
    return found


def _same(a: pd.Series, b: pd.Series) -> bool:
    return bool((a.map(lambda v: str(_norm(v))) == b.map(lambda v: str(_norm(v)))).all())


def matched_keys(groups: pd.DataFrame, searched: set[str]) -> list[str]:
    """Config keys a KD row and its baseline must share: ``ALWAYS_MATCHED``, and every train.* key the study
    did not search, device settings aside."""
    keys = [c.removeprefix("params.") for c in groups if c.startswith("params.")]
    return sorted(
        k
        for k in keys
        if k.startswith(ALWAYS_MATCHED)
        or (k.startswith("train.") and k not in searched and k not in DEVICE_SETTINGS)
    )


def tuned_apart(groups: pd.DataFrame, searched: set[str]) -> list[str]:
    """The searched train.* keys (device settings aside) in which a KD row and its baseline may differ."""
    matched = matched_keys(groups, searched)
    return sorted(k for k in searched if k.startswith("train.") and k not in (*matched, *DEVICE_SETTINGS))


def differences(row: pd.Series, base: pd.Series, keys: list[str]) -> str:
    """Where a KD row's ``keys`` differ from its baseline's, e.g. "lr 0.01 (none 0.001)"."""
    parts = []
    for key in keys:
        mine, theirs = _norm(row.get(f"params.{key}")), _norm(base.get(f"params.{key}"))
        if str(mine) != str(theirs):
            parts.append(f"{key.removeprefix('train.')} {mine} (none {theirs})")
    return ", ".join(parts)


def selection_note(study: StudyRuns, names: list[str], rows: list[pd.Series]) -> str:
    """Which validation metric chose each seed's model epoch (``train.select_on``; unset: the task's
    quality metric), for the rows of a table."""
    default = f"val/{quality_metric(study.task)}"
    by_metric: dict[str, list[str]] = {}
    for name, row in zip(names, rows):
        names_for = by_metric.setdefault(_norm(row.get("params.train.select_on")) or default, [])
        names_for += [] if name in names_for else [name]
    if len(by_metric) == 1:
        return f"Each seed's model is its epoch with the best `{next(iter(by_metric))}` (train.select_on)."
    chosen = "; ".join(f"`{m}` for {', '.join(n)}" for m, n in by_metric.items())
    return f"Each seed's model is its epoch with the best validation metric (train.select_on): {chosen}."
