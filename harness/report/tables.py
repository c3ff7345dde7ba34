"""The report's tables, each a plain frame (what the CSV holds) plus a title and a note.

Which tables a study gets follows from what its trials vary: a method table when ``kd.method`` varies (or
nothing does), a width table when ``model.width`` varies, temperature tables when one method's KD
temperature does (each method at its own default temperature is not a temperature study), a
classification table when the runs have accuracy metrics. Rows that stand for a choice (a method, a
width) show the configuration with the best validation objective among those tried for it, preferring
configurations that finished every seed and leaving pruned ones last; a choice none of whose
configurations finished a seed shows as a ``Div.`` (or ``Pruned``) row. Quality cells carry their seed
counts (``report/cells.py``).

Every table function takes the same three inputs (the study's runs, its configurations pooled over seeds,
and its seed runs) and returns None when the study has nothing for it; ``build.TABLES`` lists them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.data.base import quality_metric
from harness.distill.base import knob_labels, temperature_keys
from harness.report.cells import LATENCY_NOTE, cell, stat, with_unfinished
from harness.report.fairness import budgets, fairness_note, schedule, selection_note, tuning_flags
from harness.report.groups import REPORTED_STATES, best_per, student_keys, tempered, varying
from harness.report.load import StudyRuns
from harness.report.markdown import Table

LABELS = {
    "model.width": "k",
    "kd.method": "KD method",
    "data.source": "dataset",
    "train.lr": "lr",
    **knob_labels(),
}
METRIC_LABELS = {"miou": "mIoU", "accuracy": "accuracy"}
NON_TERMS = {"loss", "loss_final", "loss_best_epoch", "alpha", "beta"}
SEEDS_NOTE = (
    "mean ± std over the finished seeds (n); k div. / k failed: seeds that diverged or failed, left out "
    "of the mean; Div. = no seed finished; pruned: the study's pruner stopped the configuration, its mean "
    "is over the seeds it finished."
)


def label(key: str) -> str:
    return LABELS.get(key, key)


def quality_label(study: StudyRuns) -> str:
    return f"test {METRIC_LABELS[quality_metric(study.task)]}"


def keys_frame(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame({label(k): rows[f"params.{k}"].to_numpy() for k in keys}, index=range(len(rows)))


def trials_text(rows: pd.DataFrame) -> list[str]:
    return [", ".join(map(str, t)) for t in rows["trials"]]


def row_name(row: pd.Series, keys: list[str]) -> str:
    """A row's method with its student, e.g. "response (k=2)"."""
    if not keys:
        return str(row["method"])
    values = ", ".join(f"{label(k)}={row['params.' + k]}" for k in keys)
    return f"{row['method']} ({values})"


def method_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    if "kd.method" not in varying(groups) and varying(groups):
        return None
    keys = ["kd.method", *student_keys(groups)]
    rows = with_unfinished(best_per(groups, keys, study.objective, study.direction), groups, keys)
    rows = rows.sort_values(["method", *[f"params.{k}" for k in keys[1:]]], key=method_order)
    out = keys_frame(rows, keys)
    stat(out, rows, study.quality, quality_label(study), n=True)
    stat(out, rows, "params", "# parameters", std=False)
    if rows["kd_params"].fillna(0).gt(0).any():
        stat(out, rows, "kd_params", "KD parameters (training only)", std=False)
    stat(out, rows, "ms_per_image", "ms/image", std=False)
    stat(out, rows, "train_ms_per_image", "training ms/image")
    mine, none = budgets(study, rows, keys)
    out["tuning trials"] = mine
    out["schedule"] = [schedule(r) for _, r in rows.iterrows()]
    out["trial #"] = trials_text(rows)
    names = [row_name(r, keys[1:]) for _, r in rows.iterrows()]
    flags = tuning_flags(names, list(rows["method"]), mine, none)
    note = (
        f"One row per KD method{' and student' if len(keys) > 1 else ''}: "
        f"the configuration with the best mean {study.objective} among those tried (configurations that "
        f"finished every seed first, pruned ones last); {SEEDS_NOTE} Tuning trials: the trials the study "
        f"ran for that method and student, in any state. {LATENCY_NOTE} "
        + selection_note(study, names, [r for _, r in rows.iterrows()])
    )
    fair = fairness_note(list(out["schedule"]), flags)
    return Table("methods", "Methods", out, f"{note} {fair}" if fair else note)


def width_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    if "model.width" not in varying(groups):
        return None
    keys = ["model.width", *(["kd.method"] if "kd.method" in varying(groups) else [])]
    rows = with_unfinished(best_per(groups, keys, study.objective, study.direction), groups, keys)
    rows = rows.sort_values(
        [f"params.{k}" for k in keys], ascending=[False, *[True] * (len(keys) - 1)], key=method_order
    )
    out = keys_frame(rows, keys)
    stat(out, rows, "params", "parameters", std=False)
    stat(out, rows, "test/loss", "test loss")
    stat(out, rows, "train/loss_best_epoch", "train loss")
    stat(out, rows, "best_epoch", "best epoch")
    stat(out, rows, study.quality, quality_label(study), n=True)
    out["trial #"] = trials_text(rows)
    return Table(
        "widths",
        "Student width",
        out,
        "Seed 002 Table 1 layout: k = channels of the first stage. "
        f"Train loss is the training loss at the best-validation epoch; best epoch counts from 0. {SEEDS_NOTE}",
    )


def temperature_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    temps = tempered(groups)
    if not len(temps):
        return None
    extra = ["kd.method"] if temps["method"].nunique() > 1 else []
    records = []
    for (t, *rest), at_t in temps.groupby(["_T", *[f"params.{k}" for k in extra]], sort=True):
        best = with_unfinished(best_per(at_t, [], study.objective, study.direction), at_t, []).iloc[0]
        finished = int((at_t["seeds_finished"] > 0).sum())
        diverged = int((at_t["seeds_diverged"] > 0).sum())
        rec = {"T": t, **{label(k): v for k, v in zip(extra, rest)}}
        for metric, name in (("test/loss", "test loss"), (study.quality, quality_label(study))):
            rec.update(cell(best, metric, name))
        rec["best epoch"], rec["best epoch std"] = best["best_epoch"], best["best_epoch std"]
        rec["trial #"] = ", ".join(map(str, best["trials"]))
        rec["configs (finished / with diverged seeds / all)"] = f"{finished} / {diverged} / {len(at_t)}"
        records.append(rec)
    out = pd.DataFrame(records)
    return Table(
        "temperatures",
        "KD temperature",
        out,
        "Seed 002 Table 2 layout: for each temperature the "
        f"configuration with the best mean {study.objective}; Div. = every configuration at that "
        f"temperature diverged (training loss not finite). {SEEDS_NOTE}",
    )


def seeds_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    temps = tempered(groups)
    if not len(temps) or (temps["seeds_finished"] + temps["seeds_diverged"]).max() < 2:
        return None
    keys = [k for k in varying(temps) if k not in temperature_keys()]
    temps = temps.sort_values(["_T", *[f"params.{k}" for k in keys]])
    all_seeds = sorted(int(s) for s in seeds["seed"].dropna().unique())
    out = pd.DataFrame({"T": temps["_T"].to_numpy()})
    out = pd.concat([out, keys_frame(temps, keys)], axis=1)
    for s in all_seeds:
        cells = []
        for gid in temps["group"]:
            runs = seeds[(seeds["group"] == gid) & (seeds["seed"] == s)]
            if not len(runs):
                cells.append("–")
                continue
            run = runs.iloc[0]
            if run["state"] == "finished":
                cells.append(run.get("metrics.test/loss", np.nan))
            else:
                cells.append("Div." if run["state"] == "diverged" else run["state"])
        out[f"seed {s}"] = cells
    stat(out, temps, "test/loss", "test loss", n=True)
    return Table(
        "seeds_per_temperature",
        "Test loss per seed and temperature",
        out,
        "Seed 002 Table 3 layout: one row per configuration, one column per seed; "
        f"Div. = that seed's training diverged. Test loss: {SEEDS_NOTE}",
    )


def classification_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    if study.task != "classification":
        return None
    keys = ["data.source", "kd.method"]
    rows = with_unfinished(best_per(groups, keys, study.objective, study.direction), groups, keys)
    rows = rows.sort_values(["params.data.source", "method"], key=method_order)
    out = pd.DataFrame(
        {
            "dataset": rows["params.data.source"].to_numpy(),
            "loss used": [
                loss_used(seeds[seeds["group"] == g], m) for g, m in zip(rows["group"], rows["method"])
            ],
        }
    )
    stat(out, rows, "test/loss", "test loss")
    stat(out, rows, "test/accuracy", "test accuracy", n=True)
    out["trial #"] = trials_text(rows)
    return Table(
        "classification",
        "Classification",
        out,
        f"Seed 003 layout. Loss used: the method and the loss terms its training logged. {SEEDS_NOTE}",
    )


def loss_used(seeds: pd.DataFrame, method: str) -> str:
    terms = [
        c.removeprefix("metrics.train/")
        for c in seeds.columns
        if c.startswith("metrics.train/") and seeds[c].notna().any()
    ]
    terms = [t for t in terms if t not in NON_TERMS]
    terms = sorted(terms, key=lambda t: (t != "ce", t))
    return f"{method}: {' + '.join(terms)}" if terms else method


def best_trials_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame, top: int = 5) -> Table:
    obj = f"metrics.{study.objective}"
    done = study.trials[study.trials["state"].isin(REPORTED_STATES)].copy()
    done = done[_metric(done, study.objective).notna()]
    done["_complete"] = done["state"] == "finished"
    done = done.sort_values(["_complete", obj], ascending=[False, study.direction == "minimize"]).head(top)
    out = pd.DataFrame({"trial": done["trial"].astype(int).to_numpy()})
    n_seeds = _metric(done, "n_seeds")
    states = [study.seeds.loc[study.seeds["trial_run"] == r, "state"] for r in done["run_id"]]
    for metric in dict.fromkeys([study.objective, study.quality]):
        out[metric] = _metric(done, metric).to_numpy()
        std = _metric(done, f"{metric}_std")
        out[f"{metric} std"] = std.where(n_seeds > 1).to_numpy()  # one seed: no spread, not a spread of 0
        out[f"{metric} n"] = n_seeds.to_numpy()
        out[f"{metric} div."] = [int((s == "diverged").sum()) for s in states]
        out[f"{metric} failed"] = [int((s == "failed").sum()) for s in states]
    for col in sorted(c for c in done.columns if c.startswith("params.search.")):
        out[label(col.removeprefix("params.search."))] = done[col].to_numpy()
    return Table(
        "best_trials",
        "Best trials",
        out,
        f"Trials ranked by {study.objective} ({study.direction}; top {top}), those that finished every "
        "seed first, with the values the sampler chose; mean ± std over each trial's finished seeds (n), "
        "k div. / k failed: its seeds that diverged or failed.",
    )


def _metric(runs: pd.DataFrame, name: str) -> pd.Series:
    """A logged metric of each run as numbers (NaN where a run, or every run, did not log it)."""
    return pd.to_numeric(runs.get(f"metrics.{name}", pd.Series(np.nan, index=runs.index)), errors="coerce")


def importance_table(importances: dict[str, float], source: str) -> Table:
    items = sorted(importances.items(), key=lambda kv: -kv[1])
    out = pd.DataFrame({"parameter": [k for k, _ in items], "importance": [v for _, v in items]})
    return Table("importances", "Parameter importances", out, source)


def method_order(col: pd.Series) -> pd.Series:
    """Sort key: the no-KD baseline first, then alphabetical; numbers sort as numbers."""
    if col.name in ("method", "params.kd.method"):
        return col.map(lambda m: (m != "none", str(m)))
    return col
