"""Everything Optuna: storage, sampler, pruner, the search space, the trial objective and the budget.

Only this module imports optuna. A trial is one configuration trained once per listed seed; its MLflow run
(a child of the study's parent run) holds the sampled parameters and the mean and spread over seeds, and
each seed's training run is a child of the trial's run. Pruning follows the first seed's validation curve.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from harness.config import load_experiment
from harness.data.base import QUALITY
from harness.engine.run import run_experiment
from harness.errors import HarnessError
from harness.sweep.config import StudyConfig, example_experiment
from harness.tracking import Tracker

optuna.logging.set_verbosity(optuna.logging.ERROR)  # our display reports trial outcomes
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Target and region quantiles")
log = logging.getLogger(__name__)

DEFAULT_JOURNAL = "mlruns/optuna/journal.log"
COUNTED_STATES = ("finished", "pruned", "diverged", "failed")  # user_attr "state" of trials that use budget


class TrialDiverged(Exception):
    """A seed's training loss turned NaN/inf; the trial is recorded as failed with state 'diverged'."""


class TrialFailed(Exception):
    """A seed's training raised; its traceback is an artifact of the seed's run. The study goes on."""


class SurplusTrial(Exception):
    """Another worker already started the last trial of the budget."""


def open_storage(url: str | None, heartbeat: int | None = None, retries: int = 2):
    """A journal file by default (safe for many processes on one host); an RDB URL for many machines.

    RDB storages get heartbeats: a trial whose worker died is failed and re-queued (``retries`` times)."""
    if url is None or url.startswith("journal:") or url.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:") if url else DEFAULT_JOURNAL)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    from harness.tracking.postgres import sqlalchemy_url

    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=retries
            ),
        )
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(sqlalchemy_url(url), **kwargs)
        except Exception as exc:  # workers started together race to create the schema of a fresh database
            if attempt == 4 or "IntegrityError" not in type(exc).__name__ + repr(exc.__cause__):
                raise
            time.sleep(0.5 + random.random())


def make_sampler(study: StudyConfig, worker: int = 0):
    """Seeded sampler; each worker of a study gets its own seed so they don't propose the same trials."""
    s = study.sampler
    seed = None if s.seed is None else s.seed + 1000 * worker
    constraints = _constraints_func if study.constraints else None
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.name == "grid":
        return optuna.samplers.GridSampler(study.grid(), seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        multivariate=True,
        group=True,
        n_startup_trials=s.startup_trials,
        constraints_func=constraints,
    )


def _constraints_func(trial) -> list[float]:
    return trial.user_attrs.get("constraints", [1.0])


def make_pruner(study: StudyConfig):
    p = study.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.name == "hyperband":
        epochs = example_experiment(study).train.epochs
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.warmup_epochs), max_resource=epochs)
    return optuna.pruners.NopPruner()


def open_study(
    study: StudyConfig, storage_url: str | None, heartbeat: int | None = None, worker: int = 0
) -> optuna.Study:
    return optuna.create_study(
        study_name=study.name,
        storage=open_storage(storage_url, heartbeat),
        sampler=make_sampler(study, worker),
        pruner=make_pruner(study),
        direction=study.objective.direction,
        load_if_exists=True,
    )


def trial_state(t) -> str:
    """Our name for how a trial ended: finished, pruned, diverged, failed, running or abandoned."""
    if t.state == TrialState.COMPLETE:
        return "finished"
    if t.state == TrialState.PRUNED:
        return "pruned"
    if t.state in (TrialState.RUNNING, TrialState.WAITING):
        return "running"
    return t.user_attrs.get("state", "abandoned")


def used_budget(study: optuna.Study, before: int | None = None) -> int:
    """Trials that count toward the budget; with ``before``, running trials with a lower number count too."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        state = trial_state(t)
        if state in COUNTED_STATES or (before is not None and state == "running" and t.number < before):
            n += 1
    return n


def sample(trial: optuna.Trial, study: StudyConfig) -> dict[str, Any]:
    values: dict[str, Any] = dict(study.fixed)
    params: dict[str, Any] = {}
    for key, p in study.search.items():
        if not p.active(values):
            continue
        if p.kind == "categorical":
            v = trial.suggest_categorical(key, p.choices)
        elif p.kind == "int":
            v = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            v = trial.suggest_float(key, float(p.low), float(p.high), step=p.step, log=p.log)
        values[p.target(key)] = params[key] = v
    return params


@dataclass
class TrialRunner:
    """The objective: trains one sampled configuration per seed and logs it under the study's parent run."""

    study: StudyConfig
    tracker: Tracker
    parent_id: str
    progress: Any = None

    def __call__(self, trial: optuna.Trial) -> float:
        if (
            self.study.budget.trials is not None
            and used_budget(trial.study, before=trial.number) >= self.study.budget.trials
        ):
            trial.set_user_attr("state", "surplus")
            raise SurplusTrial()
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        self._abandon_stale_runs(trial)
        params = sample(trial, self.study)  # a retried trial gets its stale original's params back
        base = load_experiment(self.study.experiment, self.study.overrides(params))
        tags = {"optuna.study": self.study.name, "optuna.trial": trial.number}
        run = self.tracker.start_run(
            self.study.name,
            f"trial-{trial.number}",
            parent_id=self.parent_id,
            tags={**tags, "role": "trial", "state": "running", "kd.method": base.kd.method},
        )
        run.log_params(
            {**base.flat(), **{f"search.{k}": v for k, v in params.items()}, "seeds": self.study.seeds}
        )
        trial.set_user_attr("mlflow_run_id", run.id)
        results, states = [], []
        try:
            seeds = [base.train.seed] if "train.seed" in params else self.study.seeds  # a searched seed wins
            for i, seed in enumerate(seeds):
                cfg = base.model_copy(update={"train": base.train.model_copy(update={"seed": seed})})
                outcome = run_experiment(
                    cfg,
                    self.tracker,
                    experiment=self.study.name,
                    run_name=f"trial-{trial.number}-seed-{seed}",
                    parent_id=run.id,
                    tags={**tags, "seed": seed},
                    role="seed",
                    on_epoch=self._reporter(trial) if i == 0 else None,
                    stop_states={optuna.TrialPruned: "pruned"},
                    progress=self.progress,
                )
                states.append(outcome.state)
                if outcome.state == "finished":
                    results.append(outcome.metrics)
        except optuna.TrialPruned:
            trial.set_user_attr("state", "pruned")
            run.end("pruned")
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("state", "interrupted")
            run.end("interrupted")
            raise
        except Exception as exc:
            trial.set_user_attr("state", "failed")
            trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}"[:500])
            run.set_tags({"failure": f"{type(exc).__name__}: {exc}"[:500]})
            run.end("failed")
            raise TrialFailed(str(exc)) from exc
        summary = aggregate(results)
        run.log_metrics(summary)
        if "diverged" in states:
            trial.set_user_attr("state", "diverged")
            run.set_tags({"failure": f"diverged in {states.count('diverged')} of {len(states)} seeds"})
            run.end("diverged")
            raise TrialDiverged()
        wanted = [self.study.objective.metric, *(c.metric for c in self.study.constraints)]
        missing = [m for m in wanted if m not in summary]
        if missing:  # a study-level mistake (e.g. val/miou on a classification task): stop the study
            trial.set_user_attr("state", "failed")
            run.end("failed")
            known = ", ".join(sorted(k for k in summary if not k.endswith("_std") and "/iou_" not in k))
            raise HarnessError(
                f"study {self.study.name}: metric {missing} is not logged for this task; use one of: {known}"
            )
        value = summary[self.study.objective.metric]
        violations = [c.violation(summary[c.metric]) for c in self.study.constraints]
        trial.set_user_attr("constraints", violations)
        trial.set_user_attr("state", "finished")
        for key in (
            *(f"{s}/{q}" for s in ("val", "test") for q in QUALITY.values()),
            "params",
            "ms_per_image",
        ):
            if key in summary:
                trial.set_user_attr(key, summary[key])
        run.set_tags({"feasible": all(v <= 0 for v in violations)})
        run.end("finished")
        return value

    def _abandon_stale_runs(self, trial: optuna.Trial) -> None:
        """A retry of a trial whose worker died (heartbeat stale): close the dead trial's MLflow runs, which
        would otherwise read RUNNING forever, as 'abandoned'."""
        stale = trial.storage.get_trial_system_attrs(trial._trial_id).get("retry_history") or []
        for number in stale:
            for run in self.tracker.open_trial_runs(self.study.name, number):
                run.set_tags({"failure": f"worker died (heartbeat stale); retried as trial {trial.number}"})
                run.end("abandoned")

    def _reporter(self, trial: optuna.Trial):
        metric = self.study.objective.metric

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if metric in metrics and self.study.pruner.name != "none":
                trial.report(metrics[metric], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        return report


def aggregate(results: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each final metric over seeds, with ``<metric>_std`` (0 for one seed) and ``n_seeds``."""
    out: dict[str, float] = {"n_seeds": len(results)}
    for key in results[0] if results else []:
        values = [r[key] for r in results if key in r]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def optimize(
    study_cfg: StudyConfig,
    study: optuna.Study,
    runner: TrialRunner,
    *,
    trials: int | None,
    timeout: float | None,
    callbacks=(),
) -> None:
    """Run trials in this process until the budget is used up, the timeout passes or the grid is exhausted.

    When the rest of the budget is running in other workers this worker does not start surplus trials: with
    heartbeats (RDB storage) it waits, failing stale trials, in case a worker dies and its trial is re-queued;
    without, it returns."""
    deadline = None if timeout is None else time.monotonic() + timeout
    allocated = {"stop": False}

    def stop_when_spent(st: optuna.Study, _trial) -> None:
        if trials is not None and used_budget(st, before=_next_number(st)) >= trials and not _waiting(st):
            allocated["stop"] = True
            st.stop()

    heartbeat = _heartbeat_interval(study)
    while True:
        if trials is not None:
            if heartbeat:
                optuna.storages.fail_stale_trials(study)  # may re-queue a dead worker's trial
            if used_budget(study) >= trials:
                return
            if used_budget(study, before=_next_number(study)) >= trials and not _waiting(study):
                if not heartbeat or (deadline is not None and time.monotonic() >= deadline):
                    log.info("the rest of the budget is running in other workers; this worker stops")
                    return
                time.sleep(min(heartbeat, 10))
                continue
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        allocated["stop"] = False
        study.optimize(
            runner,
            timeout=remaining,
            catch=(TrialDiverged, TrialFailed, SurplusTrial),
            callbacks=[stop_when_spent, *callbacks],
        )
        if not allocated["stop"]:  # timeout, or the grid sampler ran out of points
            return


def _next_number(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False))


def _waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _heartbeat_interval(study: optuna.Study) -> int | None:
    get = getattr(study._storage, "get_heartbeat_interval", None)
    return get() if get else None


def summarize(study: optuna.Study) -> dict[str, Any]:
    """Counts by state and the best trial so far, for progress displays and the CLI's last line."""
    counts = dict.fromkeys(("finished", "pruned", "diverged", "failed", "running"), 0)
    for t in study.get_trials(deepcopy=False):
        s = trial_state(t)
        if s in counts:
            counts[s] += 1
    best = None
    try:
        if counts["finished"]:
            bt = study.best_trial
            best = {"number": bt.number, "value": bt.value, "params": bt.params}
    except ValueError:
        pass
    return {"counts": counts, "best": best}


def importances(study: optuna.Study) -> dict[str, float]:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):
        return {}
