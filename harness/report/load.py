"""Reading a study's runs from MLflow into tidy frames: one row per trial run and one row per seed run.

Columns follow MLflow's own ``search_runs`` naming: ``params.<key>`` (parsed to numbers, booleans and None
where they read as such), ``metrics.<key>`` (the latest value; a seed run's final metrics are logged one
step past its last epoch, so the latest value is the selected model's) and ``tags.<key>``, plus a few
convenience columns: ``trial``, ``state``, ``method`` and, for seed runs, ``seed`` and ``trial_run``.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from harness.data.base import quality_metric, task_of
from harness.engine.teacher import find_teacher_run, is_checkpoint
from harness.errors import HarnessError
from harness.report.design import Design, DesignError, design_of
from harness.tracking import Tracker

_INT = re.compile(r"^[+-]?\d+$")
_TEACHER_RUN = re.compile(r"^run (\w+)")


class ReportError(HarnessError):
    """A study that cannot be reported; the message says why, the exit code says how bad."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StudyRuns:
    name: str
    parent: pd.Series | None
    trials: pd.DataFrame
    seeds: pd.DataFrame
    objective: str = "val/miou"
    direction: str = "maximize"
    teacher: dict | None = None
    design: Design = field(default_factory=Design)
    confirmation: StudyRuns | None = None  # the confirmation phase's trials and seeds, split off
    rounds: dict | None = None  # the sweep's record of its seed rounds (the parent's sequential.json)

    @property
    def task(self) -> str:
        return task_of(self.seeds.columns)

    @property
    def quality(self) -> str:
        """The held-out metric the tables lead with."""
        return f"test/{quality_metric(self.task)}"


def parse_value(text):
    """MLflow params are strings; numbers, booleans and None come back as themselves."""
    if not isinstance(text, str):
        return text
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    if _INT.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for col in [c for c in frame.columns if c.startswith("params.")]:
        frame[col] = frame[col].map(parse_value).astype(object)
    return frame


def _col(frame: pd.DataFrame, name: str, default=None) -> pd.Series:
    return frame[name] if name in frame else pd.Series(default, index=frame.index, dtype=object)


def method_label(frame: pd.DataFrame) -> pd.Series:
    """The KD method as tables name it: ``kd.method``, or a combo's preset (its ``hard`` preset is the
    no-KD baseline, ``none``)."""
    method = _col(frame, "params.kd.method", "none").fillna("none")
    preset = _col(frame, "params.kd.preset")
    is_combo = (method == "combo") & preset.notna()
    return method.where(~is_combo, preset.map(lambda p: "none" if p == "hard" else f"combo: {p}"))


def load_study(tracker: Tracker, name: str) -> StudyRuns:
    runs = tracker.runs_frame([name])
    if not len(runs):
        raise ReportError(f"study {name}: no runs in {tracker.uri}", 2)
    role = _col(runs, "tags.role")
    parents = runs[role == "study"].sort_values("start_time")
    parent = parents.iloc[0] if len(parents) else None
    trials = _typed(runs[role == "trial"]).reset_index(drop=True)
    seeds = _typed(runs[role == "seed"]).reset_index(drop=True)
    for frame in (trials, seeds):
        frame["trial"] = pd.to_numeric(_col(frame, "tags.optuna.trial"), errors="coerce").astype("Int64")
        frame["state"] = _col(frame, "tags.state", "unknown").fillna("unknown")
        frame["method"] = method_label(frame)
        if "params.kd.method" in frame:  # tables key on kd.method: let a combo's preset stand for it
            frame["params.kd.method"] = frame["method"].where(frame["params.kd.method"].notna())
    seeds["seed"] = pd.to_numeric(_col(seeds, "tags.seed"), errors="coerce").astype("Int64")
    seeds["trial_run"] = _col(seeds, "tags.mlflow.parentRunId")
    trials = trials.sort_values("trial").reset_index(drop=True)
    seeds = seeds.sort_values(["trial", "seed"]).reset_index(drop=True)
    study = StudyRuns(name, parent, trials, seeds)
    objective = parent.get("params.objective") if parent is not None else None
    if isinstance(objective, str) and " " in objective:
        study.direction, study.objective = objective.split(" ", 1)
    else:
        study.objective = f"val/{quality_metric(study.task)}"
    study.teacher = find_teacher(tracker, study)
    try:
        study.design = read_design(tracker, parent)
    except DesignError as exc:
        raise ReportError(f"study {name}: {exc}", 2) from None
    study.trials["extra"] = extra_seed_trials(study)
    study.rounds = read_record(tracker, parent, "sequential")
    return split_confirmation(study)


def read_design(tracker: Tracker, parent: pd.Series | None) -> Design:
    """The study file's seeds, min_effect, arms and confirm, from the parent run's ``study.yaml``."""
    if parent is None:
        return Design()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.download(parent["run_id"], "study.yaml", tmp)
        except Exception:  # no such artifact: a parent run logged before the sweep wrote it
            return design_of(None, parent.get("params.seeds"))
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    return design_of(tree if isinstance(tree, dict) else None, parent.get("params.seeds"))


def read_record(tracker: Tracker, parent: pd.Series | None, name: str) -> dict | None:
    """A study user attr the sweep copied to the parent run (tag ``name``, or the artifact ``name.json``
    when it was too long for a tag); None when there is none."""
    text = parent.get(f"tags.{name}") if parent is not None else None
    if not isinstance(text, str):
        return None
    if text.startswith("see the artifact"):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                text = tracker.download(parent["run_id"], f"{name}.json", tmp).read_text(encoding="utf-8")
            except Exception:
                return None
    try:
        tree = json.loads(text)
    except ValueError:
        return None
    return tree if isinstance(tree, dict) else None


def extra_seed_trials(study: StudyRuns) -> pd.Series:
    """Trials of a seed round (tag ``round``): they add seeds to a configuration already tuned, so they are
    not tuning trials."""
    return _col(study.trials, "tags.round").notna()


CONFIRMATION = "confirmation"  # the ``phase`` tag of the trials that re-run each arm's best on new seeds


def split_confirmation(study: StudyRuns) -> StudyRuns:
    """Move the confirmation trials (tag ``phase``) and their seed runs into ``study.confirmation``: every
    table then reads the tuning runs only, and the baseline verdicts read the confirmation runs."""
    confirming = _col(study.trials, "tags.phase") == CONFIRMATION
    if not confirming.any():
        return study
    ids = set(study.trials.loc[confirming, "run_id"])
    of_confirmation = study.seeds["trial_run"].isin(ids)
    part = lambda frame, keep: frame[keep].reset_index(drop=True)  # noqa: E731
    study.confirmation = StudyRuns(
        study.name,
        study.parent,
        part(study.trials, confirming),
        part(study.seeds, of_confirmation),
        study.objective,
        study.direction,
        study.teacher,
        study.design,
    )
    study.trials, study.seeds = part(study.trials, ~confirming), part(study.seeds, ~of_confirmation)
    return study


def find_teacher(tracker: Tracker, study: StudyRuns) -> dict | None:
    """The teacher's run: named by the seed runs' ``teacher.source`` tag, else found by its config hash; with
    ``found_in``, where the trainer found it (the runs' ``teacher.found_in`` tag), when they record it."""
    run_id = None
    for source in _col(study.seeds, "tags.teacher.source").dropna():
        if m := _TEACHER_RUN.match(str(source)):
            run_id = m.group(1)
            break
    if run_id is None:
        run_id = _teacher_by_hash(tracker, study)
    record = tracker.run_record(run_id) if run_id else None
    if record is None:
        return None
    return {
        "run_id": run_id,
        "name": record["run_name"],
        "metrics": {k.removeprefix("metrics."): v for k, v in record.items() if k.startswith("metrics.")},
        "width": parse_value(record.get("params.model.width")),
        "found_in": next(iter(_col(study.seeds, "tags.teacher.found_in").dropna()), None),
    }


def _teacher_by_hash(tracker: Tracker, study: StudyRuns) -> str | None:
    spec = study.parent.get("params.teacher") if study.parent is not None else None
    if not isinstance(spec, str) or is_checkpoint(spec) or not Path(spec).is_file():
        return None
    try:
        return find_teacher_run(spec, tracker)
    except HarnessError:
        return None


def curves(tracker: Tracker, seeds: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Per-epoch values of ``keys`` for the given seed runs: columns run_id, key, epoch, value.

    The final metrics share names with per-epoch ones (val/loss) but sit at step = epochs run, so only
    steps below that count; where a step holds two values, the first logged is the epoch's."""
    rows = []
    for _, run in seeds.iterrows():
        last = run.get("metrics.epochs_run")
        for key in keys:
            seen = set()
            for step, _ts, value in tracker.metric_history(run["run_id"], key):
                if step in seen or (pd.notna(last) and step >= last):
                    continue
                seen.add(step)
                rows.append({"run_id": run["run_id"], "key": key, "epoch": step, "value": value})
    return pd.DataFrame(rows, columns=["run_id", "key", "epoch", "value"])
