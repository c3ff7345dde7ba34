"""Configurations: trials whose config is identical except for the seed, pooled into one group.

A study lists its seeds (each trial trains every one), and a grid study may also put ``train.seed`` in its
search; either way a group's observations are its finished seed runs, and every mean comes with the
spread over those seeds and their number. Trials that were pruned or failed are left out of the groups
(their seeds are incomplete); diverged trials stay in, so their diverged seeds can be shown as "Div.".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.distill.base import temperature_keys
from harness.report.load import StudyRuns

NOT_CONFIG = {"name", "seed", "seeds", "train.seed", "train.device"}
REPORTED_STATES = ("finished", "diverged")
SUMMARY_METRICS = (
    "val/miou",
    "test/miou",
    "val/accuracy",
    "test/accuracy",
    "val/loss",
    "test/loss",
    "val/pixel_acc",
    "test/pixel_acc",
    "params",
    "kd_params",
    "flops",
    "ms_per_image",
    "train_ms_per_image",
    "best_epoch",
    "epochs_run",
    "train/loss_best_epoch",
    "train/loss_final",
)


def config_keys(trials: pd.DataFrame) -> list[str]:
    """Dotted config keys a trial run records (its flattened config), minus the seed and bookkeeping."""
    keys = [c.removeprefix("params.") for c in trials.columns if c.startswith("params.")]
    return [k for k in keys if k not in NOT_CONFIG and not k.startswith("search.")]


def _norm(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


def varying(frame: pd.DataFrame, keys: list[str] | None = None) -> list[str]:
    """Config keys that take more than one value (missing counts as no value) across the frame's rows."""
    keys = config_keys(frame) if keys is None else keys
    out = []
    for key in keys:
        values = {_norm(v) for v in frame.get(f"params.{key}", pd.Series(dtype=object))} - {None}
        if len(values) > 1:
            out.append(key)
    return out


def build_groups(study: StudyRuns) -> pd.DataFrame:
    """One row per configuration: ``group``, the config values (``params.<key>``), ``trials`` (their
    numbers), ``seeds_finished``, ``seeds_diverged``, the seed values, and for each summary metric
    ``<metric>`` (mean over finished seeds), ``<metric> std`` (NaN for one seed) and ``<metric> n``."""
    trials = study.trials[study.trials["state"].isin(REPORTED_STATES)]
    keys = config_keys(trials)
    ids: dict[tuple, int] = {}
    trial_group = {}
    for _, t in trials.iterrows():
        sig = tuple(_norm(t.get(f"params.{k}")) for k in keys)
        trial_group[t["run_id"]] = ids.setdefault(sig, len(ids))
    seeds = study.seeds[study.seeds["trial_run"].isin(trial_group)].copy()
    seeds["group"] = seeds["trial_run"].map(trial_group)
    rows = []
    for sig, gid in ids.items():
        members = trials[trials["run_id"].map(trial_group) == gid]
        runs = seeds[seeds["group"] == gid]
        done = runs[runs["state"] == "finished"]
        row = {
            "group": gid,
            **{f"params.{k}": v for k, v in zip(keys, sig)},
            "method": members["method"].iloc[0],
            "trials": sorted(int(n) for n in members["trial"].dropna()),
            "seeds_finished": len(done),
            "seeds_diverged": int((runs["state"] == "diverged").sum()),
            "seed_values": sorted(int(s) for s in done["seed"].dropna()),
        }
        row["objective"] = _trial_mean(members, study.objective)
        metrics = [*SUMMARY_METRICS, study.objective]
        for metric in dict.fromkeys(metrics):
            values = pd.to_numeric(
                done.get(f"metrics.{metric}", pd.Series(dtype=float)), errors="coerce"
            ).dropna()
            row[metric] = values.mean() if len(values) else np.nan
            row[f"{metric} std"] = values.std(ddof=1) if len(values) > 1 else np.nan
            row[f"{metric} n"] = len(values)
        if pd.isna(row["objective"]):
            row["objective"] = row[study.objective]
        rows.append(row)
    groups = pd.DataFrame(rows)
    if len(groups):
        groups["first_trial"] = groups["trials"].map(lambda t: min(t) if t else -1)
    return groups


def _trial_mean(members: pd.DataFrame, metric: str) -> float:
    """The objective as the trials recorded it (mean over their finished seeds), pooled by seed count; this
    is what Optuna optimised, so configurations are chosen on it."""
    values = pd.to_numeric(members.get(f"metrics.{metric}"), errors="coerce")
    weights = pd.to_numeric(members.get("metrics.n_seeds"), errors="coerce").fillna(1)
    ok = values.notna() & (weights > 0)
    return float((values[ok] * weights[ok]).sum() / weights[ok].sum()) if ok.any() else np.nan


def group_seeds(study: StudyRuns, groups: pd.DataFrame) -> pd.DataFrame:
    """The seed runs of the reported trials with their group id (all states)."""
    trial_group = {}
    for _, g in groups.iterrows():
        for run_id in study.trials.loc[study.trials["trial"].isin(g["trials"]), "run_id"]:
            trial_group[run_id] = g["group"]
    seeds = study.seeds[study.seeds["trial_run"].isin(trial_group)].copy()
    seeds["group"] = seeds["trial_run"].map(trial_group)
    return seeds


def best_per(groups: pd.DataFrame, keys: list[str], objective: str, direction: str) -> pd.DataFrame:
    """For each combination of ``keys`` (dotted config keys), the group with the best mean objective over
    its finished seeds (validation data: the test columns are then reported, not selected on)."""
    done = groups[groups["seeds_finished"] > 0].copy()
    if not len(done):
        return done
    score = done["objective"] if "objective" in done else done[objective]
    done["_score"] = score if direction == "maximize" else -score
    done = done.sort_values(["_score", "first_trial"], ascending=[False, True], na_position="last")
    cols = [f"params.{k}" for k in keys]
    if not cols:
        return done.head(1).drop(columns="_score")
    key_frame = done[cols].map(_norm).astype(str)
    best = done.loc[~key_frame.duplicated()]
    return best.drop(columns="_score")


def student_keys(groups: pd.DataFrame) -> list[str]:
    """The student's varying config keys (model.*): rows of a method table are per method and student."""
    return [
        k
        for k in varying(groups, [c.removeprefix("params.") for c in groups if c.startswith("params.")])
        if k.startswith("model.")
    ]


def temperature(groups: pd.DataFrame) -> pd.Series:
    """The KD temperature of each group: the field its method declares as its temperature, else NaN."""
    out = pd.Series(np.nan, index=groups.index, dtype=float)
    for key in (f"params.{k}" for k in temperature_keys()):
        if key in groups:
            values = pd.to_numeric(groups[key], errors="coerce")
            out = values.where(values.notna(), out)
    return out
