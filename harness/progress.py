"""Rich progress displays for training (epochs) and studies (trials)."""

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
            val = metrics.get("val/miou", metrics.get("val/accuracy"))
            bar.update(
                task,
                completed=epoch + 1,
                loss=f"{metrics.get('train/loss', float('nan')):.4f}",
                val=f"{val:.4f}" if val is not None else "-",
            )

        yield update


class StudyDisplay:
    """Live study display: trials done / pruned / diverged / failed against the budget, the best value and
    parameters so far, and the running trial's epoch bar."""

    def __init__(self, study_cfg, optuna_study, enabled: bool = True):
        self.cfg, self.study, self.enabled = study_cfg, optuna_study, enabled
        total = study_cfg.budget.trials
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.trials = self.bar.add_task(f"study {study_cfg.name}", total=total, info="")
        self.epochs = self.bar.add_task("  trial", total=None, info="", visible=False)

    def __enter__(self):
        self.bar.__enter__()
        self.refresh()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def refresh(self) -> None:
        from harness.study import summarize, used_budget

        summary = summarize(self.study)
        c, best = summary["counts"], summary["best"]
        info = f"done {c['finished']} pruned {c['pruned']} diverged {c['diverged']} failed {c['failed']}"
        if best:
            params = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()
            )
            info += f" | best {best['value']:.4f} (#{best['number']}: {params})"
        self.bar.update(self.trials, completed=used_budget(self.study), info=info)

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        val = metrics.get(self.cfg.objective.metric)
        info = f"loss {metrics.get('train/loss', float('nan')):.4f}" + (
            f" {self.cfg.objective.metric} {val:.4f}" if val is not None else ""
        )
        self.bar.update(self.epochs, completed=epoch + 1, total=None, info=info, visible=True)
