"""The "at equal compute" table: when a study gives its trials a compute budget (``train.budget.flops`` or
``train.budget.seconds``), each method's quality next to what it actually spent under that budget.

Training FLOPs are counted by the trainer (harness/engine/compute.py): the student's forward and backward,
the KD method's own modules and a live teacher's forward. The teacher cache is a one-off cost outside the
budget; the runs that built a cache logged its cost, and this table divides the study's total over every
run that used a cache ("teacher cache share").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.report.groups import best_per, student_keys, varying
from harness.report.load import StudyRuns
from harness.report.markdown import Table, number
from harness.report.tables import keys_frame, label, method_order, quality_label, stat, trials_text

BUDGET_KEYS = ("train.budget.flops", "train.budget.seconds")
UNITS = {"train.budget.flops": "training FLOPs", "train.budget.seconds": "seconds of training steps"}


def budget_keys(groups: pd.DataFrame) -> list[str]:
    """The budget keys some configuration of the study sets."""
    return [k for k in BUDGET_KEYS if f"params.{k}" in groups and groups[f"params.{k}"].notna().any()]


def _per_group(seeds: pd.DataFrame, metric: str):
    done = seeds[seeds["state"] == "finished"]
    values = pd.to_numeric(
        done.get(f"metrics.{metric}", pd.Series(np.nan, index=done.index)), errors="coerce"
    )
    return values.groupby(done["group"])


def seed_mean(seeds: pd.DataFrame, metric: str) -> pd.Series:
    """Per group id: the mean of a metric over its finished seed runs (for metrics groups.py leaves out)."""
    return _per_group(seeds, metric).mean()


def seed_stat(out: pd.DataFrame, rows: pd.DataFrame, seeds: pd.DataFrame, metric: str, name: str) -> None:
    """Mean and std over each row's finished seed runs, under a display name."""
    per_group = _per_group(seeds, metric)
    out[name] = rows["group"].map(per_group.mean()).to_numpy()
    out[f"{name} std"] = rows["group"].map(per_group.std()).to_numpy()


def cache_share(study: StudyRuns) -> float:
    """The teacher caches built in this study, divided over the seed runs that used a cache."""
    logged = pd.to_numeric(study.seeds.get("metrics.teacher_cache_flops"), errors="coerce").dropna()
    return float(logged.sum() / len(logged)) if len(logged) else 0.0


def used_cache(rows: pd.DataFrame, seeds: pd.DataFrame) -> np.ndarray:
    if "metrics.teacher_cache_flops" not in seeds:
        return np.zeros(len(rows), dtype=bool)
    users = set(seeds.loc[seeds["metrics.teacher_cache_flops"].notna(), "group"])
    return rows["group"].isin(users).to_numpy()


def spread(out: pd.DataFrame) -> str:
    flops = out["train FLOPs"].dropna()
    if len(flops) < 2 or flops.min() <= 0:
        return ""
    epochs = out["epochs run"].dropna()
    return (
        f" Training FLOPs of the {len(flops)} rows lie within {100 * (flops.max() / flops.min() - 1):.1f}% "
        f"of each other; they ran {number(epochs.min())} to {number(epochs.max())} epochs."
    )


def compute_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    keys = budget_keys(groups)
    if not keys:
        return None
    budgeted = groups[groups[[f"params.{k}" for k in keys]].notna().any(axis=1)]
    row_keys = ["kd.method", *student_keys(budgeted), *[k for k in keys if k in varying(budgeted)]]
    rows = best_per(budgeted, row_keys, study.objective, study.direction)
    if not len(rows):
        return None
    rows = rows.sort_values(["method", *[f"params.{k}" for k in row_keys[1:]]], key=method_order)
    out = keys_frame(rows, row_keys)
    stat(out, rows, study.quality, quality_label(study), n=True)
    stat(out, rows, "epochs_run", "epochs run")
    seed_stat(out, rows, seeds, "train_steps", "steps")
    seed_stat(out, rows, seeds, "train_flops", "train FLOPs")
    seed_stat(out, rows, seeds, "budget_spent", "budget spent")
    seed_stat(out, rows, seeds, "train_seconds", "train seconds")
    out["teacher cache share (FLOPs)"] = np.where(used_cache(rows, seeds), cache_share(study), 0.0)
    out["trial #"] = trials_text(rows)
    fixed = [k for k in keys if k not in row_keys]
    budget = "; ".join(f"{number(budgeted[f'params.{k}'].dropna().iloc[0])} {UNITS[k]}" for k in fixed)
    return Table(
        "equal_compute",
        "At equal compute",
        out,
        f"One row per {' and '.join(label(k) for k in row_keys)}: the configuration with the best mean "
        f"{study.objective}"
        + (f"; every run trained under a budget of {budget}" if budget else "")
        + ". Mean ± std over seeds. Train FLOPs: the student's forward and backward (3 x forward), the KD "
        "method's own modules and a live teacher's forward, over the steps taken. Teacher cache share: the "
        "one-off teacher forward over the training set, outside the budget, divided over the runs that used "
        "the cache." + spread(out),
    )
