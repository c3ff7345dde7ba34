"""PNG plots: quality against cost with the Pareto front, against width and temperature; loss curves.

Figures are built with matplotlib's object API (no pyplot, no global backend state) and saved as PNG.
Every point is a configuration's mean over seeds with the spread over seeds as an error bar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harness.report.stats import pareto_front

DPI = 110


def _colors(labels) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    ordered = sorted(dict.fromkeys(labels), key=lambda s: (not str(s).startswith("none"), str(s)))
    return {lab: cmap(i % 10) for i, lab in enumerate(ordered)}


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


PARETO_COSTS = (("params", "parameters"), ("ms_per_image", "ms/image (inference)"))


def pareto(
    points: pd.DataFrame,
    quality: str,
    ylabel: str,
    path: Path,
    teacher: dict | None = None,
    title: str = "",
    costs: tuple[tuple[str, str], ...] = PARETO_COSTS,
) -> Path:
    """``points``: one row per configuration with ``label``, ``quality``, ``quality std`` and a column per
    cost. One panel per cost (column, axis label); the front (higher quality at no higher cost) is drawn as
    a step line through ringed points."""
    fig = Figure(figsize=(5.5 * len(costs), 4.4))
    colors = _colors(points["label"])
    for ax, (cost, xlabel) in zip(np.atleast_1d(fig.subplots(1, len(costs))), costs):
        for lab in colors:
            sub = points[points["label"] == lab]
            ax.errorbar(
                sub[cost],
                sub["quality"],
                yerr=sub["quality std"].fillna(0),
                fmt="o",
                ms=6,
                capsize=3,
                color=colors[lab],
                label=str(lab),
                alpha=0.85,
            )
        front = pareto_front(points[cost], points["quality"])
        if front.any():
            f = points[front].sort_values(cost)
            ax.step(f[cost], f["quality"], where="post", color="black", lw=1, ls="--", label="Pareto front")
            ax.scatter(f[cost], f["quality"], s=140, facecolors="none", edgecolors="black", lw=1.2)
        if teacher and np.isfinite(teacher.get(quality, np.nan)) and np.isfinite(teacher.get(cost, np.nan)):
            ax.scatter(
                [teacher[cost]],
                [teacher[quality]],
                marker="*",
                s=220,
                color="gold",
                edgecolors="black",
                label=f"teacher {teacher.get('name', '')}",
                zorder=5,
            )
        xs = pd.concat(
            [points[cost], pd.Series([teacher.get(cost, np.nan)] if teacher else [], dtype=float)]
        ).dropna()
        if len(xs) and xs.min() > 0 and xs.max() / xs.min() > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def by_value(
    points: pd.DataFrame,
    x: str,
    xlabel: str,
    ylabel: str,
    path: Path,
    log: bool = False,
    title: str = "",
    lines: bool = True,
) -> Path:
    """Quality against one config value (width, temperature), one line per ``label``; rows whose
    ``quality`` is NaN but that have ``diverged`` set are drawn as red crosses on the bottom edge."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    colors = _colors(points["label"])
    ok = points[points["quality"].notna()]
    for lab in colors:
        sub = ok[ok["label"] == lab].sort_values(x)
        if not len(sub):
            continue
        ax.errorbar(
            sub[x],
            sub["quality"],
            yerr=sub["quality std"].fillna(0),
            fmt="o-" if lines else "o",
            capsize=3,
            ms=5,
            color=colors[lab],
            label=str(lab),
        )
    div = points[points["quality"].isna() & points.get("diverged", False)]
    if len(div):
        ax.scatter(
            div[x],
            [0.0] * len(div),
            marker="x",
            s=80,
            color="red",
            label="diverged",
            clip_on=False,
            transform=ax.get_xaxis_transform(),
            zorder=5,
        )
    if log:
        ax.set_xscale("log")
    values = sorted(points[x].dropna().unique())
    if len(values) <= 12:
        ax.set_xticks(values)
        ax.set_xticklabels([f"{v:.3g}" for v in values])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


CURVE_PANELS = (
    ("train/loss", "train loss (total, with KD terms)"),
    ("train/ce", "train cross-entropy"),
    ("val/loss", "validation loss"),
)


def loss_curves(curves: pd.DataFrame, labels: dict[str, str], path: Path, title: str = "") -> Path:
    """Mean over seeds per epoch with a ±1 std band, one line per label (``labels`` maps seed run -> label)."""
    panels = [(k, t) for k, t in CURVE_PANELS if (curves["key"] == k).any()]
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 4.0))
    axes = np.atleast_1d(fig.subplots(1, max(len(panels), 1)))
    data = curves.assign(label=curves["run_id"].map(labels)).dropna(subset=["label"])
    colors = _colors(labels.values())
    for ax, (key, panel_title) in zip(axes, panels):
        sub = data[data["key"] == key]
        for lab in colors:
            per_epoch = sub[sub["label"] == lab].groupby("epoch")["value"]
            if not len(per_epoch):
                continue
            mean, std = per_epoch.mean(), per_epoch.std().fillna(0)
            ax.plot(mean.index, mean.to_numpy(), marker="o", ms=3, color=colors[lab], label=lab)
            ax.fill_between(
                mean.index, (mean - std).to_numpy(), (mean + std).to_numpy(), color=colors[lab], alpha=0.2
            )
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
