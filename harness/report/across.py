"""The report across studies (reports/all/): one summary row per study, and the method and baseline tables
of every study stacked with a ``study`` column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.report import plots
from harness.report.build import OUTPUTS, StudyReport, state_counts, write_tables
from harness.report.markdown import Table, document
from harness.report.tables import quality_label


def summary_table(reports: list[StudyReport]) -> Table:
    rows = []
    for r in reports:
        s = r.study
        finished = s.trials[s.trials["state"] == "finished"]
        obj = pd.to_numeric(finished.get(f"metrics.{s.objective}"), errors="coerce")
        best = (
            finished.loc[obj.idxmax() if s.direction == "maximize" else obj.idxmin()]
            if obj.notna().any()
            else None
        )
        rows.append(
            {
                "study": s.name,
                "task": s.task,
                "objective": f"{s.direction} {s.objective}",
                **{f"trials {k}": v for k, v in state_counts(s).items()},
                "configurations": len(r.groups),
                **_best_fields(s, best),
                "teacher test metric": (s.teacher or {}).get("metrics", {}).get(s.quality, np.nan),
                "finding": r.finding or "",
            }
        )
    return Table(
        "summary",
        "Studies",
        pd.DataFrame(rows),
        "One row per study; best = best finished trial on its objective (mean ± std over its seeds).",
    )


def _best_fields(s, best: pd.Series | None) -> dict:
    """The best trial's number, objective (with its std over seeds when it had several) and test metric."""
    if best is None:
        return {
            "best trial": np.nan,
            "best objective": np.nan,
            "best objective std": np.nan,
            "its test metric": "",
        }
    several = best.get("metrics.n_seeds", 1) > 1
    return {
        "best trial": int(best["trial"]),
        "best objective": best[f"metrics.{s.objective}"],
        "best objective std": best.get(f"metrics.{s.objective}_std", np.nan) if several else np.nan,
        "its test metric": f"{quality_label(s)} {best.get(f'metrics.{s.quality}', np.nan):.4f}",
    }


def stacked(reports: list[StudyReport], name: str, title: str, note: str) -> Table | None:
    frames = []
    for r in reports:
        t = r.table(name)
        if t is not None and len(t.frame):
            frames.append(t.frame.assign(study=r.study.name)[["study", *t.frame.columns]])
    if not frames:
        return None
    return Table(name, title, pd.concat(frames, ignore_index=True), note)


def write_all(
    reports: list[StudyReport], folder: Path, formats: tuple[str, ...], with_plots: bool = True
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in OUTPUTS:
        for old in folder.glob(pattern):
            old.unlink()
    tables = [summary_table(reports)]
    tables += [
        t
        for t in (
            stacked(
                reports,
                "baseline",
                "KD against the no-KD baseline, all studies",
                "Each study's KD methods against its own no-KD baseline (same student, same seed-paired "
                "differences), judged as each study asks: fixed-n paired t-tests (95% t-interval, paired-t "
                "and sign-flip p) or, for seed rounds, anytime-valid sequential tests, with equivalence "
                "where the study has a min_effect, and a verdict from Holm-corrected p-values within each "
                "study's own table (docs/reading-reports.md).",
            ),
            stacked(
                reports,
                "methods",
                "Methods, all studies",
                "Each study's method table; mean ± std over seeds. Metrics of different studies (data, schedule) "
                "are not comparable with each other.",
            ),
        )
        if t is not None
    ]
    files = write_tables(tables, folder, formats)
    images = []
    if with_plots:
        points = []
        for r in reports:
            g = r.groups[r.groups["seeds_finished"] > 0]
            q = r.study.quality
            points.append(
                pd.DataFrame(
                    {
                        "label": [f"{r.study.name}: {m}" for m in g["method"]],
                        "quality": g[q],
                        "quality std": g[f"{q} std"],
                        "params": g["params"],
                        "ms_per_image": g["ms_per_image"],
                    }
                )
            )
        if points:
            ylabel = (
                "test metric (mIoU or accuracy)"
                if len({r.study.task for r in reports}) > 1
                else quality_label(reports[0].study)
            )
            plots.pareto(
                pd.concat(points, ignore_index=True),
                "quality",
                ylabel,
                folder / "pareto.png",
                title="All studies: test metric against cost",
            )
            images.append(("All studies against cost (Pareto front over all configurations)", "pareto.png"))
            files.append(folder / "pareto.png")
    if "md" in formats:
        intro = [
            f"{len(reports)} studies: "
            + ", ".join(f"[{r.study.name}](../{r.study.name}/README.md)" for r in reports)
            + ". Each study's own report has its width, temperature and classification tables."
        ]
        intro += [f"**{r.study.name}: {r.finding}**" for r in reports if r.finding]
        (folder / "README.md").write_text(document("All studies", intro, tables, images), encoding="utf-8")
        files.append(folder / "README.md")
    return files
