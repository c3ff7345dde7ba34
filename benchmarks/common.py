"""Shared helpers for the benchmark scripts: machine description and writing a section of RESULTS.md."""

from __future__ import annotations

import datetime
import re
import shlex
import sys
from pathlib import Path

import torch

from harness.tracking.provenance import device_name, git_commit

RESULTS = Path(__file__).with_name("RESULTS.md")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def header() -> str:
    dev = device()
    return (
        f"*{datetime.date.today()}, {device_name(dev)}, torch {torch.__version__}, commit {git_commit()}*\n\n"
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`\n"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``## name`` of RESULTS.md for this device kind."""
    title = f"## {name} ({device().type})"
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nFigures measured by the scripts in this folder; each section says how.\n"
    )
    section = f"{title}\n\n{header()}\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    RESULTS.write_text(text)
    print(section)


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
