"""Driving a study: the teacher trained once, the study's parent run, trials in this process, live display;
after tuning, the confirmation of each arm's best configuration and sequential seed rounds."""

from __future__ import annotations

import json
import time

from harness.engine.progress import console
from harness.engine.teacher import find_or_train_teacher, is_checkpoint
from harness.sweep.arms import ArmTuner, confirmation_configs, record_tuning
from harness.sweep.config import StudyConfig, example_experiment
from harness.sweep.display import StudyDisplay
from harness.sweep.optuna_study import importances, open_study, optimize, summarize, used_budget
from harness.sweep.rounds import Family, Need, run_rounds, train_needs
from harness.sweep.rows import arm_rows, chosen_from, tuning_rows
from harness.sweep.schema import SeedSchedule, first_seeds
from harness.sweep.trial import TrialRunner, close_dead_runs
from harness.tracking import Run, Tracker
from harness.tracking.urls import redact

RECORDS = ("sequential", "tuning", "confirmation")  # study user attrs the parent run gets as JSON
TAG_LIMIT = 5000  # characters of a tag value every MLflow store takes


def ensure_teacher(study: StudyConfig, tracker: Tracker) -> None:
    """Train the study's teacher now if no earlier run has the same config, so trials never train it."""
    spec = example_experiment(study).teacher
    if spec and not is_checkpoint(spec):
        find_or_train_teacher(spec, tracker)


def open_parent(tracker: Tracker, study: StudyConfig, storage: str | None, reopen: bool = True) -> Run:
    """The study's one parent run (created on first use, reused when the study is resumed or joined).

    The Optuna study is opened first: a file that changed the study's objective is refused before anything
    is written to MLflow, and a changed definition is announced."""
    open_study(study, storage)
    tags = {"optuna.storage": redact(storage) or "journal (default)"}
    run, created = tracker.parent_run(study.name, tags)
    if created:
        run.log_yaml(study.model_dump(mode="json"), "study.yaml")
        run.log_params(
            {
                "objective": f"{study.objective.direction} {study.objective.metric}",
                "sampler": study.sampler.name,
                "pruner": study.pruner.name,
                "seeds": f"one per trial: {', '.join(study.seed_keys())}"
                if study.seed_keys()
                else _seeds(study.seeds),
                "budget.trials": study.budget.trials,
                "experiment": study.experiment,
                "teacher": study.teacher,
                **_phase_params(study),
            }
        )
    elif reopen:
        run.reopen()
    return run


def _seeds(seeds) -> str | list[int]:
    return seeds.describe() if isinstance(seeds, SeedSchedule) else seeds


def _phase_params(study: StudyConfig) -> dict:
    out = {} if study.min_effect is None else {"min_effect": study.min_effect}
    if study.arms is not None:
        out["arms"] = f"{study.arms.key}: {study.arms.trials} tuning trials each"
    if study.confirm is not None:
        out["confirm.seeds"] = _seeds(study.confirm.seeds)
    return out


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
    """Run trials here until the budget is spent.
    Returns 'spent', 'finished' (timeout or grid done) or 'interrupted'."""
    optuna_study = open_study(study, storage, heartbeat, worker)
    with StudyDisplay(study, optuna_study, enabled=not quiet) as display:
        runner = TrialRunner(study, tracker, parent.id, progress=display.epoch)
        hooks = dict(
            callbacks=[lambda st, t: display.refresh()], close_runs=close_dead_runs(tracker, study.name)
        )
        arms = study.arms is not None and study.sampler.name != "grid"
        try:
            optimize(
                study,
                optuna_study,
                runner,
                trials=study.budget.trials,
                timeout=study.budget.timeout,
                before_trial=ArmTuner(study, optuna_study, worker) if arms else None,
                **hooks,
            )
            after_tuning(study, optuna_study, runner, **hooks)
        except KeyboardInterrupt:
            return "interrupted"
    if study.budget.trials is not None and used_budget(optuna_study, cfg=study) >= study.budget.trials:
        return "spent"
    return "finished"


def after_tuning(study: StudyConfig, optuna_study, runner, **hooks) -> None:
    """Once the budget's trials are done: the arms' tuning counts; each arm's best configuration trained
    on the confirmation seeds; sequential rounds on the rows still undecided (tuning or confirmation
    seeds, whichever the verdict rests on)."""
    schedule, phase = study.schedule()
    if study.arms is not None:
        record_tuning(study, optuna_study)
    if study.confirm is not None:
        configs = confirmation_configs(study, optuna_study)
        seeds = first_seeds(study.confirm.seeds)
        first = {} if schedule is None else {"round": 0}  # as the rounds that may follow number them
        needs = [Need(c, seeds, {**c.attrs(phase), **first}) for c in configs.values()]
        if needs:
            chosen = ", ".join(f"{arm} #{c.trial}" for arm, c in configs.items())
            console.print(f"confirmation: the best configuration of each arm ({chosen}) on seeds {seeds}")
        train_needs(optuna_study, runner, needs, **hooks)
    if schedule is None:
        return
    trials = optuna_study.get_trials(deepcopy=False)
    rows = arm_rows(configs) if study.confirm is not None else tuning_rows(study, trials)
    if not rows:
        console.print(
            "[yellow]note[/yellow]: no KD configuration has a no-KD baseline to compare with; no rounds"
        )
    family = Family(rows, schedule, phase, study.min_effect, chosen_from(study, trials))
    run_rounds(optuna_study, runner, family, **hooks)


def log_records(optuna_study, parent: Run) -> None:
    """What the report needs of the rounds and arms, from the study's user attrs to its parent run: a JSON
    artifact each, the same as a tag where it fits, and the per-arm tuning trial counts as metrics."""
    for name in RECORDS:
        tree = optuna_study.user_attrs.get(name)
        if tree is None:
            continue
        text = json.dumps(tree, sort_keys=True)
        parent.log_text(text, f"{name}.json")
        parent.set_tags({name: text if len(text) <= TAG_LIMIT else f"see the artifact {name}.json"})
    tuning = optuna_study.user_attrs.get("tuning")
    if tuning:
        parent.log_metrics({f"tuning_trials/{arm}": a["trials"] for arm, a in tuning["arms"].items()})


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
    summary = summarize(optuna_study, study)
    counts, best = summary["counts"], summary["best"]
    metrics = {f"trials_{k}": v for k, v in counts.items()}
    if best:
        metrics["best_value"] = best["value"]
        metrics["best_trial"] = best["number"]
        parent.set_tags({"best_params": best["params"]})
    metrics.update({f"importance/{k}": v for k, v in importances(optuna_study).items()})
    parent.log_metrics(metrics)
    log_records(optuna_study, parent)
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
            f"best trial {best['number']}: "
            f"{study.objective.metric} = {best['value']:.4f} with {best['params']}"
        )
    console.print(
        f"runs: MLflow experiment '{study.name}' in {tracker.uri} (make ui); tables: "
        f"python -m harness.report --study {study.name}"
    )
    return 0
