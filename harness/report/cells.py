"""Table cells that never hide a seed: a mean with its spread, the seeds it is over, and the seeds that
diverged or failed beside it.

A quality cell is five columns in the CSV (``X``, ``X std``, ``X n``, ``X div.``, ``X failed``) that the
markdown shows as one, e.g. ``0.512 ± 0.020 (n=4, 1 div.)``. A configuration none of whose seeds finished
reads ``Div.`` (or ``Failed``, or ``Pruned``) with its counts, so it stays in the table instead of dropping
out. A pruned configuration's cell is its mean over the seeds it finished, with an ``X pruned`` column
(True) that the markdown shows as ``(n=2, pruned)``; the column is there only when some row was pruned.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.report.groups import signature

DIV, FAILED, PRUNED = "Div.", "Failed", "Pruned"
MARKERS = (DIV, FAILED, PRUNED)
LATENCY_NOTE = (
    "ms/image: batch 1, median over repeats, measured once per student architecture and timing setup "
    "(device, threads, input shape, dtype, memory format: the runs' timing tag); rows with the same student "
    "timed the same way show the median over all their seed runs."
)


def marker(row: pd.Series) -> str | None:
    """``Pruned`` for a pruned configuration with no finished seed, ``Div.`` for one with no finished seed
    and a diverged one, ``Failed`` for one whose trial failed without a finished seed (a seed raised, or it
    failed before its first seed), None when a seed finished."""
    if row.get("seeds_finished", 1) > 0:
        return None
    if is_pruned(row):
        return PRUNED
    return DIV if row.get("seeds_diverged", 0) > 0 else FAILED


def is_pruned(row: pd.Series | None) -> bool:
    """Whether the study's pruner stopped every trial of this configuration."""
    value = row.get("pruned", False) if row is not None else False
    return isinstance(value, (bool, np.bool_)) and bool(value)


def cell(row: pd.Series, metric: str, name: str, std: bool = True) -> dict:
    """One quality cell of a configuration as its CSV columns."""
    mark = marker(row)
    out = {name: mark or row.get(metric, np.nan)}
    if std:
        out[f"{name} std"] = np.nan if mark else row.get(f"{metric} std", np.nan)
    out[f"{name} n"] = 0 if mark else row.get(f"{metric} n", 0)
    out[f"{name} div."] = int(row.get("seeds_diverged", 0))
    out[f"{name} failed"] = int(row.get("seeds_failed", 0))
    if is_pruned(row):
        out[f"{name} pruned"] = True
    return out


def fill_pruned(frame: pd.DataFrame) -> pd.DataFrame:
    """``X pruned`` columns False in the rows that were not pruned (a cell only sets it when True)."""
    for col in [c for c in frame.columns if c.endswith(" pruned")]:
        frame[col] = frame[col].astype(object).where(frame[col].notna(), False).astype(bool)
    return frame


def stat(
    out: pd.DataFrame, rows: pd.DataFrame, metric: str, name: str, n: bool = False, std: bool = True
) -> None:
    """Copy a group metric's mean (and std) into ``out`` under a display name; with ``n``, it is a quality
    cell: the finished, diverged and failed seed counts too, and ``Div.`` where no seed finished."""
    if n:
        frame = fill_pruned(pd.DataFrame([cell(r, metric, name, std) for _, r in rows.iterrows()]))
        for col in frame:
            out[col] = frame[col].astype(object).to_numpy() if col == name else frame[col].to_numpy()
        return
    out[name] = rows[metric].to_numpy() if metric in rows else np.nan
    if std:
        out[f"{name} std"] = rows[f"{metric} std"].to_numpy() if metric in rows else np.nan


def with_unfinished(rows: pd.DataFrame, groups: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``rows`` (the best configuration per combination of ``keys``) plus one row for each combination none
    of whose configurations finished a seed: its seeds diverged or failed, or it was pruned before a seed
    finished, and it shows as ``Div.``, ``Failed`` or ``Pruned``."""
    cols = [f"params.{k}" for k in keys]
    unfinished = groups[groups["seeds_finished"] == 0]
    lost = unfinished[~signature(unfinished, cols).isin(set(signature(rows, cols)))]
    if not len(lost):
        return rows
    extra = []
    for _, part in lost.groupby(signature(lost, cols), sort=False):
        row = part.iloc[0].copy()
        row["trials"] = sorted(t for ts in part["trials"] for t in ts)
        row["trial_runs"] = [r for rs in part["trial_runs"] for r in rs]
        row["pruned"] = bool(part["pruned"].all())
        row["seeds_diverged"] = int(part["seeds_diverged"].sum())
        row["seeds_failed"] = int(part["seeds_failed"].sum())
        extra.append(row)
    return pd.concat([rows, pd.DataFrame(extra)], ignore_index=True)
