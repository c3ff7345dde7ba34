"""Driving a study: the teacher trained once, the study's parent run, trials in this process, live display."""

from __future__ import annotations

import time

from harness.config import load_experiment
from harness.experiment import TEACHER_EXPERIMENT, run_experiment
from harness.progress import StudyDisplay, console
from harness.study import TrialRunner, importances, open_study, optimize, summarize, used_budget
from harness.study_config import StudyConfig, example_experiment
from harness.tracking import Run, Tracker


def ensure_teacher(study: StudyConfig, tracker: Tracker) -> None:
    """Train the study's teacher now if no earlier run has the same config, so trials never train it."""
    cfg = example_experiment(study)
    if not cfg.teacher or cfg.teacher.endswith((".pt", ".pth")):
        return
    teacher = load_experiment(cfg.teacher)
    found = tracker.search(filter_string=f"tags.config_hash = '{teacher.hash()}' and tags.state = 'finished'")
    if found:
        return
    console.print(
        f"Training teacher [bold]{cfg.teacher}[/bold] once for this and later studies (MLflow experiment '{TEACHER_EXPERIMENT}')"
    )
    from harness.progress import epoch_progress

    with epoch_progress(teacher.train.epochs, f"teacher {teacher.name}") as progress:
        run_experiment(teacher, tracker, experiment=TEACHER_EXPERIMENT, role="teacher", progress=progress)


def open_parent(tracker: Tracker, study: StudyConfig, storage: str | None, reopen: bool = True) -> Run:
    """The study's one parent run (created on first use, reused when the study is resumed or joined)."""
    runs = tracker.search([study.name], filter_string="tags.role = 'study'")
    if runs:
        run = tracker.run(min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id)
        if reopen:
            run.reopen()
        return run
    run = tracker.start_run(
        study.name,
        f"study-{study.name}",
        tags={
            "role": "study",
            "optuna.study": study.name,
            "optuna.storage": _redact(storage) or "journal (default)",
        },
    )
    # workers started together may each have created one: all keep the earliest and delete their own
    first = min(
        tracker.search([study.name], filter_string="tags.role = 'study'"),
        key=lambda r: (r.info.start_time, r.info.run_id),
    )
    if first.info.run_id != run.id:
        tracker.client.delete_run(run.id)
        return tracker.run(first.info.run_id)
    run.log_yaml(study.model_dump(mode="json"), "study.yaml")
    run.log_params(
        {
            "objective": f"{study.objective.direction} {study.objective.metric}",
            "sampler": study.sampler.name,
            "pruner": study.pruner.name,
            "seeds": study.seeds,
            "budget.trials": study.budget.trials,
            "experiment": study.experiment,
            "teacher": study.teacher,
        }
    )
    return run


def _redact(url: str | None) -> str | None:
    """A storage URL without its password, fit for a tag."""
    if not url or "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    login, host = rest.rsplit("@", 1)
    return f"{scheme}://{login.split(':', 1)[0]}{':***' if ':' in login else ''}@{host}"


def run_in_process(
    study: StudyConfig,
    tracker: Tracker,
    parent: Run,
    storage: str | None,
    *,
    quiet=False,
    heartbeat: int | None = None,
    worker: int = 0,
) -> str:
    """Run trials here until the budget is spent. Returns 'spent', 'finished' (timeout or grid done) or 'interrupted'."""
    optuna_study = open_study(study, storage, heartbeat, worker)
    with StudyDisplay(study, optuna_study, enabled=not quiet) as display:
        runner = TrialRunner(study, tracker, parent.id, progress=display.epoch)
        try:
            optimize(
                study,
                optuna_study,
                runner,
                trials=study.budget.trials,
                timeout=study.budget.timeout,
                callbacks=[lambda st, t: display.refresh()],
            )
        except KeyboardInterrupt:
            return "interrupted"
    if study.budget.trials is not None and used_budget(optuna_study) >= study.budget.trials:
        return "spent"
    return "finished"


def watch(study: StudyConfig, storage: str | None, done, quiet=False, every: float = 2.0) -> None:
    """Live display for workers running in other processes: poll the storage until ``done()``."""
    optuna_study = open_study(study, storage)
    with StudyDisplay(study, optuna_study, enabled=not quiet) as display:
        while not done():
            display.refresh()
            time.sleep(every)
        display.refresh()


def finish_parent(
    study: StudyConfig, tracker: Tracker, parent: Run, storage: str | None, state: str, announce: bool = True
) -> int:
    optuna_study = open_study(study, storage)
    summary = summarize(optuna_study)
    counts, best = summary["counts"], summary["best"]
    metrics = {f"trials_{k}": v for k, v in counts.items()}
    if best:
        metrics["best_value"] = best["value"]
        metrics["best_trial"] = best["number"]
        parent.set_tags({"best_params": best["params"]})
    metrics.update({f"importance/{k}": v for k, v in importances(optuna_study).items()})
    parent.log_metrics(metrics)
    line = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no trials finished"
    if state == "interrupted":
        parent.end("interrupted")
        console.print(f"[yellow]interrupted[/yellow] ({line}); run the same command again to resume")
        return 130
    parent.end("finished")
    if not announce:
        return 0
    console.print(f"[green]study {study.name}[/green]: {line}")
    if best:
        console.print(
            f"best trial {best['number']}: {study.objective.metric} = {best['value']:.4f} with {best['params']}"
        )
    console.print(
        f"runs: MLflow experiment '{study.name}' in {tracker.uri} (make ui); tables: python -m harness.report --study {study.name}"
    )
    return 0
