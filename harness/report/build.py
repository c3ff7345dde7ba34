"""One study's report (tables, plots, README.md) written to a folder and logged on its parent run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.report.arms import arms_table
from harness.report.compare import baseline_table
from harness.report.compute import compute_table
from harness.report.design import Rounds, seeds_text
from harness.report.exported import exported_table
from harness.report.figures import make_plots
from harness.report.groups import build_groups, group_seeds, varying
from harness.report.load import ReportError, StudyRuns, load_study
from harness.report.markdown import Table, document, number, section
from harness.report.regimes import regime_table
from harness.report.sanity import trivial_text
from harness.report.tables import (
    best_trials_table,
    classification_table,
    importance_table,
    method_table,
    quality_label,
    seeds_table,
    temperature_table,
    width_table,
)
from harness.tracking import Tracker

OUTPUTS = ("*.md", "*.csv", "*.png")
STATES = ("finished", "pruned", "diverged", "failed", "interrupted", "running")


@dataclass
class StudyReport:
    study: StudyRuns
    groups: pd.DataFrame
    tables: list[Table]
    intro: list[str]
    images: list[tuple[str, str]] = field(default_factory=list)
    folder: Path | None = None

    def table(self, name: str) -> Table | None:
        return next((t for t in self.tables if t.name == name), None)

    @property
    def finding(self) -> str | None:
        base = self.table("baseline")
        return base.findings[0] if base and base.findings else None


def state_counts(study: StudyRuns) -> dict[str, int]:
    counts = study.trials["state"].value_counts()
    return {s: int(counts.get(s, 0)) for s in STATES if counts.get(s, 0) or s in STATES[:4]}


def analyse(tracker: Tracker, name: str) -> StudyReport:
    """Load a study and build its tables (no files written)."""
    study = load_study(tracker, name)
    counts = state_counts(study)
    if not counts["finished"]:
        done = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no trials"
        raise ReportError(f"study {name} has no finished trials yet ({done}); nothing to report", 1)
    groups = build_groups(study)
    seeds = group_seeds(study, groups)
    tables = [t for make in TABLES if (t := make(study, groups, seeds)) is not None]
    return StudyReport(study, groups, tables, _intro(study, groups, counts))


def parent_importances(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table:
    parent = study.parent if study.parent is not None else pd.Series(dtype=object)
    found = {
        k.removeprefix("metrics.importance/"): float(v)
        for k, v in parent.items()
        if isinstance(k, str) and k.startswith("metrics.importance/") and pd.notna(v)
    }
    if found:
        return importance_table(
            found,
            "Optuna's parameter importances (fANOVA) of the objective over the finished "
            "trials, as recorded on the study's parent run when the sweep ended.",
        )
    return importance_table(
        {},
        "Not recorded: the sweep logs importances on the study's parent run when it "
        "ends, given at least two finished trials and a varying parameter.",
    )


# Every table a report can hold, in order. Adding a table: one function (study, groups, seeds) -> Table | None
# and one entry here.
TABLES = (
    baseline_table,
    arms_table,
    method_table,
    compute_table,
    width_table,
    temperature_table,
    seeds_table,
    regime_table,
    classification_table,
    best_trials_table,
    parent_importances,
    exported_table,
)


def _intro(study: StudyRuns, groups: pd.DataFrame, counts: dict[str, int]) -> list[str]:
    qlabel = quality_label(study)
    lines = [
        f"Objective: {study.direction} `{study.objective}`. Trials: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
        + _phase_counts(study)
        + ". "
        + _design_text(study)
    ]
    vary = varying(groups)
    lines.append(
        f"{len(groups)} configurations (trials identical but for the seed are pooled); varying: "
        + (", ".join(f"`{k}`" for k in vary) or "nothing")
        + "."
    )
    if study.teacher:
        t = study.teacher["metrics"]
        found = f", found in {study.teacher['found_in']}" if study.teacher.get("found_in") else ""
        lines.append(
            f"Teacher: {study.teacher['name']} (run {study.teacher['run_id'][:8]}{found}), {qlabel} "
            f"{number(t.get(study.quality, np.nan))}, {number(t.get('params', np.nan))} parameters, "
            f"{number(t.get('ms_per_image', np.nan))} ms/image."
        )
    trivial = trivial_text(study, study.seeds, qlabel)
    lines.append(f"{trivial[0].upper()}{trivial[1:]}.")
    lines.append(
        "Tables report test metrics as mean ± std over the finished seeds (n), with the seeds that "
        "diverged or failed beside them (k div., k failed; Div. = none finished); configurations are "
        f"chosen on `{study.objective}` (validation), never on test, those that finished every seed first "
        "and pruned ones (stopped by the study's pruner; mean over the seeds they finished) last."
    )
    return lines


def _design_text(study: StudyRuns) -> str:
    """What the study file asked for: its seeds (a list or rounds), min_effect, arms, confirmation seeds."""
    design = study.design
    seeds = design.seeds
    parts = []
    if seeds is not None:
        per = "Seeds" if isinstance(seeds, Rounds) else "Seeds per trial"
        parts.append(f"{per}: {seeds_text(seeds)}.")
    elif study.parent is not None and pd.notna(study.parent.get("params.seeds", np.nan)):
        parts.append(f"Seeds per trial: {study.parent['params.seeds']}.")
    if design.min_effect is not None:
        parts.append(f"min_effect: {design.min_effect:g} (the equivalence margin).")
    if design.arms:
        parts.append(f"Arms: {design.arms.get('key')}, {design.arms.get('trials')} tuning trials each.")
    if design.confirm is not None:
        parts.append(f"Confirmation seeds: {seeds_text(design.confirm)}.")
    return " ".join(parts)


def _phase_counts(study: StudyRuns) -> str:
    """Trials that only added seeds (seed rounds) among those counted, and the confirmation trials."""
    extra = int(study.trials["extra"].sum()) if "extra" in study.trials else 0
    text = f" ({extra} of them seed rounds: more seeds for a configuration)" if extra else ""
    if study.confirmation is not None:
        text += f"; plus {len(study.confirmation.trials)} confirmation trials"
    return text


def write(
    report: StudyReport,
    tracker: Tracker,
    folder: Path,
    formats: tuple[str, ...],
    with_plots: bool = True,
    log: bool = True,
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in OUTPUTS:
        for old in folder.glob(pattern):
            old.unlink()
    report.folder = folder
    files = write_tables(report.tables, folder, formats)
    if with_plots:
        report.images = make_plots(report, tracker, folder)
        files += [folder / p for _, p in report.images]
    if "md" in formats:
        files.append(write_readme(report, folder))
    if log and report.study.parent is not None:
        tracker.run(report.study.parent["run_id"]).log_dir(folder, "report")
    return files


def write_tables(tables: list[Table], folder: Path, formats: tuple[str, ...]) -> list[Path]:
    files = []
    for table in tables:
        if "csv" in formats:
            table.frame.to_csv(folder / f"{table.name}.csv", index=False, encoding="utf-8")
            files.append(folder / f"{table.name}.csv")
        if "md" in formats:
            (folder / f"{table.name}.md").write_text(section(table, level=1), encoding="utf-8")
            files.append(folder / f"{table.name}.md")
    return files


def write_readme(report: StudyReport, folder: Path) -> Path:
    intro = [f"**Finding: {report.finding}**"] if report.finding else []
    intro += report.intro
    text = document(f"Study {report.study.name}", intro, report.tables, report.images)
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
