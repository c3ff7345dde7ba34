"""The objective: one sampled configuration trained once per seed, logged under the study's parent run.

A trial's MLflow run (a child of the study's parent run) holds the sampled parameters and the mean and
spread over seeds; each seed's training run is a child of the trial's run. While it runs, the trial holds a
lease (``leases.py``) so that a worker that dies is noticed and its trial re-queued.

Pruning: with one seed, the study's pruner (median, hyperband) follows that seed's per-epoch validation
curve. With several seeds the seeds themselves are the pruning steps: after each seed, its final objective
value is reported at step = seed and Optuna's Wilcoxon pruner compares the per-seed values with the best
trial's on the same seeds, so a configuration is never pruned on one seed's curve.

Each seed's end is recorded with the trial (user attrs ``seed_states`` {seed: state} and ``seed_metrics``
{seed: {metric: value}}), so sequential rounds read per-seed values from Optuna storage alone. A trial
that trains a chosen configuration on more seeds after tuning (``is_extra``: a round, a confirmation) is
never pruned and trains only its seeds that no other trial of the same configuration has ended.
"""

from __future__ import annotations

import functools
import os
import socket
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import optuna

from harness.data.base import QUALITY
from harness.engine.run import run_experiment
from harness.errors import HarnessError
from harness.sweep.config import StudyConfig
from harness.sweep.group import processes_per_trial, run_seed
from harness.sweep.leases import Lease, requeue
from harness.sweep.optuna_study import (
    COUNTED_STATES,
    SurplusTrial,
    TrialDiverged,
    TrialFailed,
    is_enqueued,
    is_extra,
    trial_key,
    trial_state,
    used_budget,
)
from harness.sweep.rounds import ended_seeds, in_flight
from harness.sweep.workers import terminated
from harness.tracking import Tracker
from harness.tracking.outage import TrackingUnavailable

RUN_TAGS = ("phase", "arm", "round")  # trial user attrs also set as tags of its MLflow runs
# final metrics kept in the trial's user attrs (besides the objective and constraints)
SHOWN = (*(f"{s}/{q}" for s in ("val", "test") for q in QUALITY.values()), "params", "ms_per_image")


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


def outside_search(trial: optuna.Trial, study: StudyConfig) -> dict[str, Any]:
    """The queued parameters of ``trial`` that the study's search no longer allows (an empty dict if none)."""
    fixed = trial.storage.get_trial_system_attrs(trial._trial_id).get("fixed_params") or {}
    out = {}
    for key, value in fixed.items():
        p = study.search.get(key)
        if p is None:
            out[key] = value
        elif p.kind == "categorical":
            if value not in p.choices:
                out[key] = value
        elif not float(p.low) <= float(value) <= float(p.high):
            out[key] = value
    return out


def duplicate_of(trial: optuna.Trial, study: StudyConfig, config: str, seeds: list[int]) -> int | None:
    """An earlier trial that trained this config hash with these seeds and finished (in any counted state)
    or is still running, if there is one."""
    for t in trial.study.get_trials(deepcopy=False):
        if t.number == trial.number or trial_key(t, study) != (config, tuple(seeds)):
            continue
        state = trial_state(t)
        if state in COUNTED_STATES or (state == "running" and t.number < trial.number and t.datetime_start):
            return t.number
    return None


def is_baseline(study: StudyConfig, cfg) -> bool:
    """The no-KD trial of a study that searches kd.method: the report compares every KD method with it, so
    it is never pruned."""
    searched = any(p.target(k) == "kd.method" for k, p in study.search.items())
    return searched and cfg.kd.method == "none"


def close_dead_runs(tracker: Tracker, study: str):
    """A callback for lease recovery: end a dead trial's MLflow runs (trial and seeds) as KILLED."""

    def close(number: int, why: str) -> None:
        for run in tracker.open_trial_runs(study, number):
            run.set_tags({"failure": why})
            run.end("abandoned")

    return close


@dataclass
class TrialRunner:
    """The objective: trains one sampled configuration per seed and logs it under the study's parent run."""

    study: StudyConfig
    tracker: Tracker
    parent_id: str
    progress: Any = None
    duplicate_streak: int = field(default=0, init=False)  # consecutive proposals of trained configurations
    processes: int = field(default_factory=processes_per_trial)  # > 1: each seed trains as a torchrun group

    def __call__(self, trial: optuna.Trial) -> float:
        if is_extra(trial):
            return self._more_seeds(trial)
        budget = self.study.budget.trials
        if budget is not None and used_budget(trial.study, before=trial.number, cfg=self.study) >= budget:
            self._skip(trial, "surplus")
        if self.study.sampler.name == "grid" and not is_enqueued(trial):
            self._skip(trial, "surplus")  # every grid point is enqueued once; this worker found none left
        self._claim(trial)
        params = sample(trial, self.study)  # a retried trial gets its dead original's params back
        if self.study.arms is not None:
            self._take_arm(trial, params)
        base = self.study.trial_config(params)
        key, seeds = self.study.trial_key(params)  # what the trial trains: config hash and seeds
        trial.set_user_attr("seeds", list(seeds))
        trial.set_user_attr("config_hash", key)
        earlier = duplicate_of(trial, self.study, key, seeds)
        if earlier is not None:
            self.duplicate_streak += 1
            trial.set_user_attr("duplicate_of", earlier)
            self._skip(trial, "duplicate")
        self.duplicate_streak = 0
        return self._train_or_requeue(trial, params, base, list(seeds))

    def _claim(self, trial: optuna.Trial) -> None:
        """Record this worker, close a dead original's runs, and skip a trial queued (a dead worker's retry,
        an old grid point) with values the study file no longer searches."""
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        self._abandon_stale_runs(trial)
        outside = outside_search(trial, self.study)
        if outside:
            print(
                f"note: study {self.study.name}: trial {trial.number} was queued with {outside}, which the "
                "study file no longer searches; skipped, not trained",
                file=sys.stderr,
            )
            self._skip(trial, "outdated")

    def _take_arm(self, trial: optuna.Trial, params: dict[str, Any]) -> None:
        """A tuning trial of an arm that has its trials already (racing workers) is surplus."""
        from harness.sweep.arms import tuning_trials

        arm = params[self.study.arms.key]
        trial.set_user_attr("phase", "tuning")
        trial.set_user_attr("arm", arm)
        if tuning_trials(self.study, trial.study.get_trials(deepcopy=False), arm, before=trial.number) >= (
            self.study.arms.trials
        ):
            self._skip(trial, "surplus")

    def _more_seeds(self, trial: optuna.Trial) -> float:
        """A round or confirmation trial: its seeds that no trial of its configuration has ended or is
        training (a killed round re-run trains only what is left); none left: skipped as a duplicate."""
        self._claim(trial)
        params = sample(trial, self.study)
        key = (self.study.trial_key(params) or (None,))[0]
        if key != trial.user_attrs.get("config_hash"):  # enqueued under an earlier version of the file
            self._skip(trial, "stale")
        trials = trial.study.get_trials(deepcopy=False)
        taken = ended_seeds(trials).get(key, set()) | in_flight(trials, before=trial.number).get(key, set())
        seeds = [s for s in trial.user_attrs["seeds"] if s not in taken]
        if not seeds:
            self._skip(trial, "duplicate")
        trial.set_user_attr("seeds", seeds)
        return self._train_or_requeue(trial, params, self.study.trial_config(params), seeds, prunable=False)

    def _train_or_requeue(self, trial: optuna.Trial, *args, **kwargs) -> float:
        """``_train`` under a lease. A tracking server away past its limit (tracking/outage.py) fails this
        trial once, uncounted ('abandoned'), and queues its parameters again; the worker stops with one line."""
        try:
            with Lease(trial):
                return self._train(trial, *args, **kwargs)
        except TrackingUnavailable as exc:
            trial.set_user_attr("state", "abandoned")
            trial.set_user_attr("failure", str(exc)[:500])
            requeue(trial.study, trial)
            raise TrackingUnavailable(
                f"{exc}; trial {trial.number} failed and its parameters are queued again"
            ) from None

    def _skip(self, trial: optuna.Trial, state: str):
        trial.set_user_attr("state", state)
        raise SurplusTrial(state)

    def _train(
        self, trial: optuna.Trial, params: dict[str, Any], base, seeds: list[int], prunable: bool = True
    ) -> float:
        attrs = trial.user_attrs
        tags = {"optuna.study": self.study.name, "optuna.trial": trial.number}
        tags.update({k: attrs[k] for k in RUN_TAGS if k in attrs})
        run = self.tracker.start_run(
            self.study.name,
            f"trial-{trial.number}",
            parent_id=self.parent_id,
            tags={
                **tags,
                "role": "trial",
                "state": "running",
                "kd.method": base.kd.method,
                "config_hash": self.study.trial_key(params)[0],
            },
        )
        run.log_params({**base.flat(), **{f"search.{k}": v for k, v in params.items()}, "seeds": seeds})
        trial.set_user_attr("mlflow_run_id", run.id)
        per_seed = self.study.pruner.name == "wilcoxon"
        prunable = prunable and not is_baseline(self.study, base)
        results, states = [], []
        seed = seeds[0]
        train = (
            run_experiment if self.processes <= 1 else functools.partial(run_seed, processes=self.processes)
        )
        try:
            for seed in seeds:
                cfg = base.model_copy(update={"train": base.train.model_copy(update={"seed": seed})})
                outcome = train(
                    cfg,
                    self.tracker,
                    experiment=self.study.name,
                    run_name=f"trial-{trial.number}-seed-{seed}",
                    parent_id=run.id,
                    tags={**tags, "seed": seed},
                    role="seed",
                    on_epoch=None if per_seed else self._epoch_reporter(trial, prunable),
                    stop_states={optuna.TrialPruned: "pruned"},
                    progress=self.progress,
                )
                states.append(outcome.state)
                self._record_seed(trial, seed, outcome.state, outcome.metrics)
                if outcome.state == "finished":
                    results.append(outcome.metrics)
                    if per_seed:
                        value = outcome.metrics.get(self.study.objective.metric)
                        self._report(trial, value, seed, "seed", prunable)
        except optuna.TrialPruned:
            trial.set_user_attr("state", "pruned")
            run.end("pruned")
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("state", "interrupted")
            run.end("interrupted")
            if terminated():  # SIGTERM (preemption): the next worker trains this configuration
                requeue(trial.study, trial)
            raise
        except TrackingUnavailable:
            raise
        except Exception as exc:
            if str(seed) not in trial.user_attrs.get("seed_states", {}):
                self._record_seed(trial, seed, "failed", {})
            trial.set_user_attr("state", "failed")
            trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}"[:500])
            run.set_tags({"failure": f"{type(exc).__name__}: {exc}"[:500]})
            run.end("failed")
            raise TrialFailed(str(exc)) from exc
        return self._conclude(trial, run, aggregate(results), states)

    def _record_seed(self, trial: optuna.Trial, seed: int, state: str, metrics: dict[str, float]) -> None:
        """A seed's end, and its final metrics if it finished: what sequential rounds read."""
        trial.set_user_attr("seed_states", {**trial.user_attrs.get("seed_states", {}), str(seed): state})
        if state != "finished":
            return
        wanted = {self.study.objective.metric, *(c.metric for c in self.study.constraints), *SHOWN}
        kept = {k: float(v) for k, v in metrics.items() if k in wanted}
        trial.set_user_attr("seed_metrics", {**trial.user_attrs.get("seed_metrics", {}), str(seed): kept})

    def _conclude(self, trial: optuna.Trial, run, summary: dict[str, float], states: list[str]) -> float:
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
        violations = [c.violation(summary[c.metric]) for c in self.study.constraints]
        trial.set_user_attr("constraints", violations)
        trial.set_user_attr("state", "finished")
        for key in SHOWN:
            if key in summary:
                trial.set_user_attr(key, summary[key])
        run.set_tags({"feasible": all(v <= 0 for v in violations)})
        run.end("finished")
        return summary[self.study.objective.metric]

    def _abandon_stale_runs(self, trial: optuna.Trial) -> None:
        """A retry of a trial that Optuna's heartbeat (RDB storage) found stale, or that was queued again
        because the tracking server stayed away: close the earlier trial's MLflow runs, which would otherwise
        read RUNNING forever, as 'abandoned'."""
        stale = trial.storage.get_trial_system_attrs(trial._trial_id).get("retry_history") or []
        close = close_dead_runs(self.tracker, self.study.name)
        for number in stale:
            close(number, f"worker died (heartbeat stale); retried as trial {trial.number}")
        earlier = trial.user_attrs.get("retry_of")
        if earlier is not None and earlier not in stale:
            close(earlier, f"left open (the tracking server was away); retried as trial {trial.number}")

    def _report(self, trial: optuna.Trial, value: float | None, step: int, unit: str, prunable: bool) -> None:
        """Report an intermediate value (the pruner compares others with it); prune only if ``prunable``."""
        if value is None or self.study.pruner.name == "none":
            return
        trial.report(value, step)
        if prunable and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {unit} {step}")

    def _epoch_reporter(self, trial: optuna.Trial, prunable: bool):
        def report(epoch: int, metrics: dict[str, float]) -> None:
            self._report(trial, metrics.get(self.study.objective.metric), epoch, "epoch", prunable)

        return report


def aggregate(results: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each final metric over seeds, with ``<metric>_std`` (0 for one seed) and ``n_seeds``."""
    out: dict[str, float] = {"n_seeds": len(results)}
    for key in results[0] if results else []:
        values = [r[key] for r in results if key in r]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out
