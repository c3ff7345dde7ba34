"""Live study display: trials against the budget, the best so far, the running trial's epochs."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness.engine.progress import console


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
        from harness.sweep.optuna_study import summarize, used_budget

        summary = summarize(self.study, self.cfg)
        c, best = summary["counts"], summary["best"]
        info = f"done {c['finished']} pruned {c['pruned']} diverged {c['diverged']} failed {c['failed']}"
        if best:
            params = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()
            )
            info += f" | best {best['value']:.4f} (#{best['number']}: {params})"
        self.bar.update(self.trials, completed=used_budget(self.study, cfg=self.cfg), info=info)

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        val = metrics.get(self.cfg.objective.metric)
        info = f"loss {metrics.get('train/loss', float('nan')):.4f}" + (
            f" {self.cfg.objective.metric} {val:.4f}" if val is not None else ""
        )
        self.bar.update(self.epochs, completed=epoch + 1, total=None, info=info, visible=True)
