"""Which plots a study gets, and their data: quality against cost (always), against width (when the study
varies it) and temperature (when one method's temperature varies), and the loss curves of each method's
best configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.distill.base import temperature_keys
from harness.report import plots
from harness.report.compute import seed_mean
from harness.report.groups import best_per, group_seeds, student_keys, tempered, varying
from harness.report.load import curves
from harness.report.markdown import number
from harness.report.tables import label, quality_label
from harness.tracking import Tracker


def make_plots(report, tracker: Tracker, folder: Path) -> list[tuple[str, str]]:
    study, groups = report.study, report.groups
    q, ylabel = study.quality, quality_label(study)
    done = groups[groups["seeds_finished"] > 0]
    images = []
    teacher = None
    if study.teacher:
        t = study.teacher["metrics"]
        teacher = {
            "name": study.teacher["name"],
            q: t.get(q, np.nan),
            "params": t.get("params", np.nan),
            "ms_per_image": t.get("ms_per_image", np.nan),
        }
    points = pd.DataFrame(
        {
            "label": done["method"],
            "quality": done[q],
            "quality std": done[f"{q} std"],
            "params": done["params"],
            "ms_per_image": done["ms_per_image"],
        }
    )
    points["train_flops"] = done["group"].map(seed_mean(group_seeds(study, done), "train_flops")).to_numpy()
    costs = plots.PARETO_COSTS
    if points["train_flops"].notna().any():
        costs += (("train_flops", "training FLOPs (per run)"),)
    plots.pareto(
        points,
        q,
        ylabel,
        folder / "pareto.png",
        teacher,
        title=f"{study.name}: {ylabel} against cost",
        costs=costs,
    )
    what = " and ".join([", ".join(label for _, label in costs[:-1]), costs[-1][1]])
    images.append((f"{ylabel} against {what} (Pareto front dashed)", "pareto.png"))
    vary = varying(groups)
    if "model.width" in vary:
        rows = best_per(groups, ["model.width", "kd.method"], study.objective, study.direction)
        pts = pd.DataFrame(
            {
                "label": rows["method"],
                "x": rows["params.model.width"].astype(float),
                "quality": rows[q],
                "quality std": rows[f"{q} std"],
            }
        )
        plots.by_value(
            pts,
            "x",
            "k (student width)",
            ylabel,
            folder / "width.png",
            log=True,
            title=f"{study.name}: {ylabel} against width",
        )
        images.append((f"{ylabel} against student width", "width.png"))
    temps = tempered(groups).rename(columns={"_T": "x"})
    if len(temps):
        others = [k for k in varying(temps) if k not in (*temperature_keys(), "kd.method")]
        keys = [
            k for k in others if temps[f"params.{k}"].nunique() <= min(4, len(temps) - 1)
        ]  # categorical-like
        labels = [
            ", ".join([m, *(f"{label(k)}={number(v)}" for k, v in zip(keys, vals))])
            for m, *vals in zip(temps["method"], *[temps[f"params.{k}"] for k in keys])
        ]
        pts = pd.DataFrame(
            {
                "label": labels,
                "x": temps["x"],
                "quality": temps[q],
                "quality std": temps[f"{q} std"],
                "diverged": (temps["seeds_finished"] == 0) & (temps["seeds_diverged"] > 0),
            }
        )
        plots.by_value(
            pts,
            "x",
            "KD temperature",
            ylabel,
            folder / "temperature.png",
            log=True,
            lines=len(keys) == len(others),  # no line through points that differ in more than T
            title=f"{study.name}: {ylabel} against temperature",
        )
        images.append((f"{ylabel} against KD temperature", "temperature.png"))
    students = student_keys(groups)
    best = best_per(groups, ["kd.method", *students], study.objective, study.direction)
    seeds = group_seeds(study, best)
    seeds = seeds[seeds["state"] == "finished"]
    if len(seeds):
        names = {
            row["group"]: " ".join(
                [row["method"], *(f"{label(k)}={number(row[f'params.{k}'])}" for k in students)]
                + [f"(trial {', '.join(map(str, row['trials']))})"]
            )
            for _, row in best.iterrows()
        }
        labels = dict(zip(seeds["run_id"], seeds["group"].map(names)))
        data = curves(tracker, seeds, tuple(k for k, _ in plots.CURVE_PANELS))
        if len(data):
            plots.loss_curves(
                data,
                labels,
                folder / "loss_curves.png",
                title=f"{study.name}: loss per epoch, best configuration per method and student (mean ± std over seeds)",
            )
            images.append(("Loss curves per method", "loss_curves.png"))
    return images
