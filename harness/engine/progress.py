"""Progress display for one training run (epochs), shared by ``train``, teachers and trials."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness.data.base import QUALITY

console = Console(stderr=True)


@contextlib.contextmanager
def epoch_progress(total: int, description: str, enabled: bool = True):
    """Yields a callback(epoch, metrics) that advances a bar showing loss and the validation metric."""
    if not enabled:
        yield None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, loss="-", val="-")

        def update(epoch: int, metrics: dict[str, float]) -> None:
            val = next((metrics[f"val/{q}"] for q in QUALITY.values() if f"val/{q}" in metrics), None)
            bar.update(
                task,
                completed=epoch + 1,
                loss=f"{metrics.get('train/loss', float('nan')):.4f}",
                val=f"{val:.4f}" if val is not None else "-",
            )

        yield update
