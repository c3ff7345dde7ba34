"""Configurations: trials whose config is identical except for the seed, pooled into one group.

A study lists its seeds (each trial trains every one), and a grid study may also put ``train.seed`` in its
search; either way a group's observations are its finished seed runs, and every mean comes with the
spread over those seeds and their number. Pruned, diverged and failed trials stay in, so their seeds are
counted and shown ("Pruned", "Div.", "1 failed"); a configuration with such a seed never ranks above one
that finished all of its seeds, and a pruned one (every trial of it pruned) ranks last.

Seed runs belong to their trial by the trial run's id (their MLflow parent), never by the trial number: an
experiment can hold two ``trial-0`` runs (a reset journal, a changed ``--storage``). A configuration keeps
one seed run per seed, the latest finished one (else the latest): when a study's seeds grow from [0, 1, 2]
to [0..4] its second trial run re-trains seeds 0-2, and counting both would make fake replicates; seed
rounds add seeds to a configuration as further trial runs, which pool the same way.

ms/image is a property of the student's architecture, not of a configuration: each group carries the
median over every finished seed run timed the same way (the model.* params and the run's ``timing`` tag;
runs from before that tag: model.* params, input and device).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.distill.base import temperature_keys
from harness.report.load import StudyRuns

NOT_CONFIG = {"name", "seed", "seeds", "train.seed", "train.device"}
REPORTED_STATES = ("finished", "pruned", "diverged", "failed")
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
    numbers), ``trial_runs`` (their run ids), ``seeds_finished``, ``seeds_diverged``, ``seeds_failed``,
    ``complete`` (every trial finished all its seeds), ``pruned`` (every trial was pruned), the seed values,
    and for each summary metric ``<metric>`` (mean over finished seeds), ``<metric> std`` (NaN for one
    seed) and ``<metric> n``; ms/image is per architecture."""
    trials = study.trials[study.trials["state"].isin(REPORTED_STATES)]
    keys = config_keys(trials)
    ids: dict[tuple, int] = {}
    trial_group = {}
    for _, t in trials.iterrows():
        sig = tuple(_norm(t.get(f"params.{k}")) for k in keys)
        trial_group[t["run_id"]] = ids.setdefault(sig, len(ids))
    seeds = _seeds_of(study, trial_group)
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
            "trial_runs": list(members["run_id"]),
            "seeds_finished": len(done),
            "seeds_diverged": int((runs["state"] == "diverged").sum()),
            "seeds_failed": int((runs["state"] == "failed").sum()),
            "complete": bool((members["state"] == "finished").all()),
            "pruned": bool((members["state"] == "pruned").all()),
            "seed_values": sorted(int(s) for s in done["seed"].dropna()),
        }
        row["objective"] = _trial_mean(members, study.objective) if len(members) == 1 else np.nan
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


def signature(frame: pd.DataFrame, cols: list[str]) -> pd.Series:
    """The values of ``cols`` per row as one string (missing values as None), for grouping rows."""
    if not cols:
        return pd.Series("", index=frame.index)
    return frame[cols].map(lambda v: str(_norm(v))).agg("|".join, axis=1)


def architecture(frame: pd.DataFrame) -> pd.Series:
    """A key per run for its ms/image: the model.* params (not the weights) and the run's ``timing`` tag
    (device, timing threads, input shape, dtype, memory format: what was timed). A run without that tag
    (logged before it existed) is keyed on the params ms/image depends on and its ``device`` tag."""
    cols = sorted(
        c
        for c in frame.columns
        if c.startswith("params.")
        and c.removeprefix("params.").startswith(ARCHITECTURE_PARAMS)
        and c.rsplit(".", 1)[-1] not in NOT_ARCHITECTURE
    )
    legacy = "device|" + signature(frame, cols + (["tags.device"] if "tags.device" in frame else []))
    if "tags.timing" not in frame:
        return legacy
    model = signature(frame, [c for c in cols if c.startswith("params.model.")])
    timed = "timing|" + model + "|" + frame["tags.timing"].astype(str)
    return timed.where(frame["tags.timing"].notna(), legacy)


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
    """The seed runs of the groups' trials with their group id (all states), by trial run id; one per
    configuration and seed."""
    trial_group = {run_id: g["group"] for _, g in groups.iterrows() for run_id in g["trial_runs"]}
    return _seeds_of(study, trial_group)


def _seeds_of(study: StudyRuns, trial_group: dict[str, int]) -> pd.DataFrame:
    """The seed runs of the trial runs in ``trial_group`` with their ``group``, one per (group, seed): the
    latest finished run of that seed, else its latest run. Runs without a seed tag are all kept."""
    seeds = study.seeds[study.seeds["trial_run"].isin(trial_group)].copy()
    seeds["group"] = seeds["trial_run"].map(trial_group)
    when = [c for c in ("end_time", "start_time") if c in seeds]
    order = seeds.assign(_done=seeds["state"] == "finished", _at=range(len(seeds)))
    order = order.sort_values(["_done", *when, "_at"], na_position="first", kind="stable")
    latest = ~order.duplicated(["group", "seed"], keep="last") | order["seed"].isna()
    return seeds.loc[latest[latest].index.sort_values()]


def best_per(groups: pd.DataFrame, keys: list[str], objective: str, direction: str) -> pd.DataFrame:
    """For each combination of ``keys`` (dotted config keys), the group with the best mean objective over
    its finished seeds (validation data: the test columns are then reported, not selected on). Groups that
    finished all their seeds come first: a diverged or failed seed drops a configuration behind them, and a
    pruned configuration comes after every other (its mean is over the seeds it got before the pruner
    stopped it)."""
    done = groups[groups["seeds_finished"] > 0].copy()
    if not len(done):
        return done
    score = done["objective"] if "objective" in done else done[objective]
    rank = {
        "_complete": done["complete"] if "complete" in done else True,
        "_kept": ~done["pruned"].astype(bool) if "pruned" in done else True,
        "_score": score if direction == "maximize" else -score,
    }
    done = done.assign(**rank).sort_values(
        [*rank, "first_trial"], ascending=[False, False, False, True], na_position="last"
    )
    cols = [f"params.{k}" for k in keys]
    if not cols:
        return done.head(1).drop(columns=list(rank))
    best = done.loc[~signature(done, cols).duplicated()]
    return best.drop(columns=list(rank))


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


def tempered(groups: pd.DataFrame) -> pd.DataFrame:
    """The groups of the methods whose KD temperature takes two or more values in the study, with the
    temperature as ``_T``; a method at its own default temperature is not a temperature study."""
    temps = groups.assign(_T=temperature(groups))
    temps = temps[temps["_T"].notna()]
    varies = temps.groupby("method")["_T"].transform("nunique") > 1
    return temps[varies]
