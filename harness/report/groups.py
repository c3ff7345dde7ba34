"""Configurations: trials whose config is identical except for the seed, pooled into one group.

A study lists its seeds (each trial trains every one), and a grid study may also put ``train.seed`` in its
search; either way a group's observations are its finished seed runs, and every mean comes with the
spread over those seeds and their number. Pruned trials are left out of the groups (stopped on purpose);
diverged and failed trials stay in, so their seeds are counted and shown ("Div.", "1 failed"), and a
configuration with such a seed never ranks above one that finished all of its seeds.

ms/image is a property of the student's architecture, not of a configuration: each group carries the
median over every finished seed run with the same architecture (model.* params, input, device).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.distill.base import temperature_keys
from harness.report.load import StudyRuns

NOT_CONFIG = {"name", "seed", "seeds", "train.seed", "train.device"}
REPORTED_STATES = ("finished", "diverged", "failed")
# what ms/image depends on besides the model: the input (source, size, classes) and the device
ARCHITECTURE_PARAMS = ("model.", "data.source", "data.image_size", "data.binary", "data.augment.resize")
NOT_ARCHITECTURE = ("weights", "encoder_weights")  # model.* keys that change the numbers, not the network
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
    numbers), ``seeds_finished``, ``seeds_diverged``, ``seeds_failed``, ``complete`` (every trial
    finished all its seeds), the seed values, and for each summary metric ``<metric>`` (mean over finished
    seeds), ``<metric> std`` (NaN for one seed) and ``<metric> n``; ms/image is per architecture."""
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
            "seeds_failed": int((runs["state"] == "failed").sum()),
            "complete": bool((members["state"] == "finished").all()),
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
        _latency_per_architecture(groups, seeds)
    return groups


def architecture(frame: pd.DataFrame) -> pd.Series:
    """A key per run: the params and device that ms/image depends on (not the weights, seed or KD)."""
    cols = sorted(
        c
        for c in frame.columns
        if c.startswith("params.")
        and c.removeprefix("params.").startswith(ARCHITECTURE_PARAMS)
        and c.rsplit(".", 1)[-1] not in NOT_ARCHITECTURE
    )
    cols += ["tags.device"] if "tags.device" in frame else []
    if not cols:
        return pd.Series("", index=frame.index)
    return frame[cols].map(lambda v: str(_norm(v))).agg("|".join, axis=1)


def _latency_per_architecture(groups: pd.DataFrame, seeds: pd.DataFrame) -> None:
    """Replace each group's ms/image with the median over every finished seed run of its architecture."""
    arch = architecture(seeds)
    ms = pd.to_numeric(
        seeds.get("metrics.ms_per_image", pd.Series(np.nan, index=seeds.index)), errors="coerce"
    )
    ms = ms.where(seeds["state"] == "finished")
    for i, gid in zip(groups.index, groups["group"]):
        values = ms[arch.isin(arch[seeds["group"] == gid])].dropna()
        groups.at[i, "ms_per_image"] = values.median() if len(values) else np.nan
        groups.at[i, "ms_per_image std"] = np.nan
        groups.at[i, "ms_per_image n"] = len(values)


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
    its finished seeds (validation data: the test columns are then reported, not selected on). Groups that
    finished all their seeds come first: a diverged or failed seed drops a configuration behind them."""
    done = groups[groups["seeds_finished"] > 0].copy()
    if not len(done):
        return done
    score = done["objective"] if "objective" in done else done[objective]
    done["_score"] = score if direction == "maximize" else -score
    done["_complete"] = done["complete"] if "complete" in done else True
    done = done.sort_values(
        ["_complete", "_score", "first_trial"], ascending=[False, False, True], na_position="last"
    )
    cols = [f"params.{k}" for k in keys]
    if not cols:
        return done.head(1).drop(columns=["_score", "_complete"])
    key_frame = done[cols].map(_norm).astype(str)
    best = done.loc[~key_frame.duplicated()]
    return best.drop(columns=["_score", "_complete"])


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
