"""Markdown output: a small table writer (pandas' to_markdown needs tabulate) and number formatting.

Tables are built as plain frames (what the CSV files hold). For markdown, a column ``X`` with companions
``X std``, ``X n``, ``X div.`` and ``X failed`` is shown as one cell "mean ± std (n=k, 1 div., 1 failed)"
(counts of 0 left out; ``X pruned``, when True, as "pruned"), so every mean carries its spread and the
seeds behind it, and ``X CI low`` / ``X CI high`` as "X [low, high]". A ``Div.``, ``Failed`` or ``Pruned``
cell keeps its counts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SIGNED = ("difference", "Δ", "gap closed")  # columns shown with an explicit sign
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$")
COMPANIONS = (" std", " n", " CI low", " CI high", " div.", " failed", " pruned")  # merged into their column
COUNTS = ((" div.", "div."), (" failed", "failed"))
MARKERS = ("Div.", "Failed", "Pruned")  # a cell with no finished seed: shown with its counts


@dataclass
class Table:
    """One table of the report: a file stem, a title, the frame, and a sentence or two above it."""

    name: str
    title: str
    frame: pd.DataFrame
    note: str = ""
    findings: list[str] = field(default_factory=list)


def number(value, signed: bool = False, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    value = value.item() if isinstance(value, np.generic) else value
    sign = "+" if signed and value > 0 else ""
    if percent:
        return f"{sign}{value:.1f}%"
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 1e9:
        return f"{sign}{value:.3g}"
    if isinstance(value, int) or (float(value).is_integer() and a >= 1):
        return f"{sign}{int(value):,}" if a >= 10_000 else f"{sign}{int(value)}"
    if a >= 100:
        return f"{sign}{value:,.1f}"
    if a >= 1:
        return f"{sign}{value:.3f}"
    if a >= 1e-4:
        return f"{sign}{value:.4f}"
    return f"{sign}{value:.1e}"


def display(frame: pd.DataFrame) -> pd.DataFrame:
    """Strings for markdown: mean ± std (n=k) merged into one cell, numbers formatted, NaN as '–'."""
    cols = list(frame.columns)
    out = {}
    for col in cols:
        if any(col.endswith(sfx) and col.removesuffix(sfx) in cols for sfx in COMPANIONS):
            continue
        std, n, low, high = (f"{col}{sfx}" for sfx in COMPANIONS[:4])
        header = col
        if std in cols or n in cols:
            header = f"{col} (mean ± std{', n' if n in cols else ''})" if std in cols else f"{col} (n)"
        elif low in cols and high in cols:
            header = f"{col} [95% CI]"
        out[header] = [_cell(frame, idx, col) for idx in frame.index]
    return pd.DataFrame(out, index=frame.index)


def _cell(frame: pd.DataFrame, idx, col: str) -> str:
    cols = frame.columns
    std, _, low, high = (f"{col}{sfx}" for sfx in COMPANIONS[:4])
    signed, pct = any(s in col for s in SIGNED), "%" in col
    value = frame.at[idx, col]
    text = number(value, signed, pct)
    numeric = text != "–" and not isinstance(value, str)
    if numeric and std in cols and not pd.isna(frame.at[idx, std]):
        text += f" ± {number(frame.at[idx, std])}"
    if numeric or value in MARKERS:
        text += _counts(frame, idx, col)
    if numeric and low in cols and high in cols and not pd.isna(frame.at[idx, low]):
        text += f" [{number(frame.at[idx, low], signed, pct)}, {number(frame.at[idx, high], signed, pct)}]"
    return text


def _counts(frame: pd.DataFrame, idx, col: str) -> str:
    """ " (n=4, 1 div., 1 failed)": the seeds behind a cell; zero diverged or failed counts are left out,
    and "pruned" follows when the configuration was pruned (not repeated after a ``Pruned`` cell)."""
    parts = []
    if f"{col} n" in frame and not pd.isna(frame.at[idx, f"{col} n"]):
        parts.append(f"n={int(frame.at[idx, f'{col} n'])}")
    for sfx, word in COUNTS:
        k = frame.at[idx, f"{col}{sfx}"] if f"{col}{sfx}" in frame else 0
        if not pd.isna(k) and k > 0:
            parts.append(f"{int(k)} {word}")
    pruned = f"{col} pruned"
    flag = frame.at[idx, pruned] if pruned in frame else False
    if isinstance(flag, (bool, np.bool_)) and flag and frame.at[idx, col] != "Pruned":
        parts.append("pruned")
    return f" ({', '.join(parts)})" if parts else ""


def md_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table; numeric-looking columns right-aligned."""
    shown = display(frame)
    if not len(shown.columns):
        return ""
    header = [_escape(c) for c in shown.columns]
    rows = [[_escape(v) for v in row] for row in shown.itertuples(index=False)]
    numeric = [all(_looks_numeric(r[i]) for r in rows) and rows for i in range(len(header))]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _escape(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _looks_numeric(text: str) -> bool:
    head = text.split(" ")[0].replace(",", "").rstrip("%")
    return head in ("–", *MARKERS) or bool(_NUMBER.match(head))


def section(table: Table, level: int = 2, findings: bool = True) -> str:
    parts = [f"{'#' * level} {table.title}", ""]
    for finding in table.findings if findings else []:
        parts += [f"**{finding}**", ""]
    if table.note:
        parts += [table.note, ""]
    parts += [md_table(table.frame) if len(table.frame) else "_(no rows)_", ""]
    return "\n".join(parts)


def document(title: str, intro: list[str], tables: list[Table], images: list[tuple[str, str]]) -> str:
    """The one file a reader opens: the intro lines (the findings among them), every table with its title,
    then the plots."""
    parts = [f"# {title}", ""]
    for line in intro:
        parts += [line, ""]
    for table in tables:
        parts.append(section(table, findings=False))
    if images:
        parts += ["## Plots", ""]
        for caption, path in images:
            parts += [f"### {caption}", "", f"![{caption}]({path})", ""]
    return "\n".join(parts).rstrip() + "\n"
