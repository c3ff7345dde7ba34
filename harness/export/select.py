"""Which run to export: a study's configuration, chosen as the report chooses it (best mean validation
objective, complete configurations before diverged and pruned ones: ``report.groups.best_per``), or the one
a trial number names; then its seed run nearest the configuration's mean objective (a representative
seed, not the luckiest), or the seed the user names. ``--run`` names a seed, trial or study run directly;
a ``python -m harness train`` run outside any study is exported on its own (one seed, n=1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.export import ExportError
from harness.report.groups import best_per, build_groups, group_seeds, varying
from harness.report.load import ReportError, StudyRuns, load_study
from harness.tracking import Tracker


@dataclass
class Choice:
    """The run to export and what the registry records about its configuration."""

    name: str  # the registered model's name: the study's (or, outside a study, the run's experiment)
    run_id: str  # the seed run whose model.pt is exported
    quality: str  # e.g. test/miou
    mean: float  # the quality metric over the configuration's finished seeds
    std: float
    n: int
    seeds: list[int] = field(default_factory=list)
    seed: int | None = None
    trial: int | None = None
    trials: list[int] = field(default_factory=list)
    parent_id: str | None = None
    params: float = np.nan
    teacher: str = "none"
    objective: str = ""
    settings: dict = field(default_factory=dict)  # the configuration's values of the study's varying keys
    ms_per_image: float = np.nan  # PyTorch's figure as the training run logged it
    timing: str = ""  # and what it timed (the run's ``timing`` tag)

    def tags(self) -> dict[str, str]:
        """Model version tags: study, trial, seeds, the quality metric, params, teacher."""
        std = f" ± {self.std:.4f}" if np.isfinite(self.std) else ""
        out = {
            "study": self.name,
            "trial": "" if self.trial is None else str(self.trial),
            "trials": ",".join(map(str, self.trials)),
            "seed": "" if self.seed is None else str(self.seed),
            "seeds": ",".join(map(str, self.seeds)),
            self.quality: f"{self.mean:.4f}{std} (n={self.n})",
            f"{self.quality}.mean": f"{self.mean:.6g}",
            f"{self.quality}.std": f"{self.std:.6g}" if np.isfinite(self.std) else "",
            "params": f"{self.params:.0f}" if np.isfinite(self.params) else "",
            "teacher": self.teacher,
            "source_run": self.run_id,
            "objective": self.objective,
        }
        out.update({f"config.{k}": str(v) for k, v in self.settings.items()})
        return out


def choose(
    tracker: Tracker,
    study: str | None = None,
    run: str | None = None,
    trial: int | None = None,
    seed: int | None = None,
) -> Choice:
    """The run ``python -m harness export`` exports; an ExportError (exit 2) says why there is none."""
    if run is not None:
        return _from_run(tracker, run, trial, seed)
    return _from_study(tracker, study, trial, seed)


def _from_run(tracker: Tracker, run_id: str, trial: int | None, seed: int | None) -> Choice:
    record = tracker.run_record(run_id)
    if record is None:
        raise ExportError(
            f"unknown run {run_id} in {tracker.uri}; give a run id from the MLflow UI or --study"
        )
    role, study = record.get("tags.role"), record.get("tags.optuna.study")
    if role == "study":
        return _from_study(tracker, study or record["run_name"].removeprefix("study-"), trial, seed)
    if role in ("trial", "seed") and study:
        number = int(record["tags.optuna.trial"])
        pick = int(record["tags.seed"]) if role == "seed" else seed
        return _from_study(tracker, study, number, pick)
    if record.get("tags.state") != "finished":
        raise ExportError(
            f"run {run_id} is {record.get('tags.state', 'not finished')}; export a finished run"
        )
    metrics = {k.removeprefix("metrics."): v for k, v in record.items() if k.startswith("metrics.")}
    quality = "test/miou" if "test/miou" in metrics else "test/accuracy"
    return Choice(
        name=record.get("params.name") or record["run_name"],
        run_id=run_id,
        quality=quality,
        mean=float(metrics.get(quality, np.nan)),
        std=np.nan,
        n=1,
        seed=_int(record.get("params.seed")),
        seeds=[s] if (s := _int(record.get("params.seed"))) is not None else [],
        params=float(metrics.get("params", np.nan)),
        teacher=str(record.get("tags.teacher.source", "none")),
        ms_per_image=float(metrics.get("ms_per_image", np.nan)),
        timing=str(record.get("tags.timing", "")),
    )


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _load(tracker: Tracker, name: str) -> StudyRuns:
    try:
        return load_study(tracker, name)
    except ReportError as exc:
        known = tracker.study_names()
        hint = f"studies there: {', '.join(known)}" if known else "it holds no study yet"
        raise ExportError(
            f"{exc} ({hint}); run `python -m harness sweep --study studies/{name}.yaml` first or name one of them"
        ) from None


def _from_study(tracker: Tracker, name: str, trial: int | None, seed: int | None) -> Choice:
    study = _load(tracker, name)
    groups = build_groups(study) if (study.seeds["state"] == "finished").any() else None
    finished = groups[groups["seeds_finished"] > 0] if groups is not None and len(groups) else []
    if not len(finished):
        states = study.trials["state"].value_counts().to_dict() if len(study.trials) else {}
        raise ExportError(
            f"study {name} has no finished configuration ({_counts(states)}); let its sweep finish a trial first"
        )
    if trial is None:
        row = best_per(finished, [], study.objective, study.direction).iloc[0]
    else:
        hit = finished[finished["trials"].map(lambda t: trial in t)]
        if not len(hit):
            raise ExportError(
                f"study {name}: trial {trial} has no finished seed run; finished trials: "
                f"{sorted(t for ts in finished['trials'] for t in ts)}"
            )
        row = hit.iloc[0]
    runs = group_seeds(study, groups)
    runs = runs[(runs["group"] == row["group"]) & (runs["state"] == "finished")]
    pick = _seed_run(runs, study.objective, seed, name)
    keys = varying(groups)
    teacher = study.teacher
    return Choice(
        name=name,
        run_id=pick["run_id"],
        quality=study.quality,
        mean=float(row[study.quality]),
        std=float(row[f"{study.quality} std"]),
        n=int(row[f"{study.quality} n"]),
        seeds=[int(s) for s in row["seed_values"]],
        seed=None if pd.isna(pick["seed"]) else int(pick["seed"]),
        trial=int(pick["trial"]),
        trials=list(row["trials"]),
        parent_id=study.parent["run_id"] if study.parent is not None else None,
        params=float(row["params"]),
        teacher=f"{teacher['name']} (run {teacher['run_id']})" if teacher else "none",
        objective=f"{study.direction} {study.objective}: {row['objective']:.4f}",
        settings={k: row[f"params.{k}"] for k in keys if pd.notna(row[f"params.{k}"])},
        ms_per_image=float(pick.get("metrics.ms_per_image", np.nan)),
        timing=str(pick.get("tags.timing", "")),
    )


def _seed_run(runs: pd.DataFrame, objective: str, seed: int | None, name: str) -> pd.Series:
    """The named seed's run, else the one whose objective is nearest the configuration's mean."""
    if seed is not None:
        hit = runs[runs["seed"] == seed]
        if not len(hit):
            raise ExportError(
                f"study {name}: the configuration has no finished run of seed {seed}; "
                f"its finished seeds: {sorted(int(s) for s in runs['seed'].dropna())}"
            )
        return hit.iloc[0]
    values = pd.to_numeric(runs.get(f"metrics.{objective}"), errors="coerce")
    distance = (values - values.mean()).abs().fillna(np.inf)
    order = runs.assign(_d=distance).sort_values(["_d", "seed"], kind="stable")
    return order.iloc[0]


def _counts(states: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in states.items()) or "no trials"
