"""Table cells that never hide a seed: a mean with its spread, the seeds it is over, and the seeds that
diverged or failed beside it.

A quality cell is five columns in the CSV (``X``, ``X std``, ``X n``, ``X div.``, ``X failed``) that the
markdown shows as one, e.g. ``0.512 ± 0.020 (n=4, 1 div.)``. A configuration none of whose seeds finished
reads ``Div.`` (or ``Failed``) with its counts, so it stays in the table instead of dropping out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.report.groups import _norm

DIV, FAILED = "Div.", "Failed"
MARKERS = (DIV, FAILED)
LATENCY_NOTE = (
    "ms/image: batch 1, 1 thread, median over repeats, measured once per student architecture; rows "
    "with the same student show the median over all its seed runs."
)


def marker(row: pd.Series) -> str | None:
    """``Div.`` for a configuration with no finished seed and a diverged one, ``Failed`` for one whose
    trial failed without a finished seed (a seed raised, or it failed before its first seed), None when a
    seed finished."""
    if row.get("seeds_finished", 1) > 0:
        return None
    return DIV if row.get("seeds_diverged", 0) > 0 else FAILED


def cell(row: pd.Series, metric: str, name: str, std: bool = True) -> dict:
    """One quality cell of a configuration as its CSV columns."""
    mark = marker(row)
    out = {name: mark or row.get(metric, np.nan)}
    if std:
        out[f"{name} std"] = np.nan if mark else row.get(f"{metric} std", np.nan)
    out[f"{name} n"] = 0 if mark else row.get(f"{metric} n", 0)
    out[f"{name} div."] = int(row.get("seeds_diverged", 0))
    out[f"{name} failed"] = int(row.get("seeds_failed", 0))
    return out


def stat(
    out: pd.DataFrame, rows: pd.DataFrame, metric: str, name: str, n: bool = False, std: bool = True
) -> None:
    """Copy a group metric's mean (and std) into ``out`` under a display name; with ``n``, it is a quality
    cell: the finished, diverged and failed seed counts too, and ``Div.`` where no seed finished."""
    if n:
        cells = pd.DataFrame([cell(r, metric, name, std) for _, r in rows.iterrows()], index=out.index)
        for col in cells:
            out[col] = cells[col].astype(object) if col == name else cells[col]
        return
    out[name] = rows[metric].to_numpy() if metric in rows else np.nan
    if std:
        out[f"{name} std"] = rows[f"{metric} std"].to_numpy() if metric in rows else np.nan


def _signature(frame: pd.DataFrame, cols: list[str]) -> pd.Series:
    if not cols:
        return pd.Series("", index=frame.index)
    return frame[cols].map(lambda v: str(_norm(v))).agg("|".join, axis=1)


def with_unfinished(rows: pd.DataFrame, groups: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``rows`` (the best configuration per combination of ``keys``) plus one row for each combination none
    of whose configurations finished a seed: its seeds diverged or failed, and it shows as ``Div.``."""
    cols = [f"params.{k}" for k in keys]
    unfinished = groups[groups["seeds_finished"] == 0]
    lost = unfinished[~_signature(unfinished, cols).isin(set(_signature(rows, cols)))]
    if not len(lost):
        return rows
    extra = []
    for _, part in lost.groupby(_signature(lost, cols), sort=False):
        row = part.iloc[0].copy()
        row["trials"] = sorted(t for ts in part["trials"] for t in ts)
        row["seeds_diverged"] = int(part["seeds_diverged"].sum())
        row["seeds_failed"] = int(part["seeds_failed"].sum())
        extra.append(row)
    return pd.concat([rows, pd.DataFrame(extra)], ignore_index=True)
