"""Leases on running trials, and recovery of the trials whose worker died.

A worker holds a lease on the trial it runs: its host, its pid and a heartbeat it refreshes every
``LEASE_INTERVAL`` seconds (user attribute ``lease`` of the Optuna trial). A lease is dead when its host is
this machine and the pid is gone, or when its heartbeat is older than the grace period (another machine,
or a frozen process). Every sweep or worker start, and every worker between trials, first fails the
trials whose lease is dead, closes their MLflow runs as KILLED with a ``failure`` tag saying the worker
died, and enqueues their parameters again: a killed worker costs its trial's time, never its place in the
budget. This works the same on a journal file and on an RDB storage (where Optuna's own heartbeats run too).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from harness.tracking.retry import ServerUnavailable

# what a trial that trains a chosen configuration on more seeds (a round, a confirmation) is re-queued with
CARRIED = ("round", "phase", "arm", "tuned_by", "seeds", "config_hash")
LEASE_INTERVAL = 5.0  # seconds between heartbeats
LEASE_GRACE = 60.0  # a heartbeat older than this is dead (HARNESS_LEASE_GRACE overrides)
HOST = socket.gethostname()


def grace_period() -> float:
    return float(os.environ.get("HARNESS_LEASE_GRACE", LEASE_GRACE))


class Lease:
    """Keeps a trial's lease fresh from a background thread while the trial runs (a context manager)."""

    def __init__(self, trial: optuna.Trial, interval: float = LEASE_INTERVAL):
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="trial-lease", daemon=True)

    def _write(self) -> None:
        self.trial.set_user_attr("lease", {"host": HOST, "pid": os.getpid(), "beat": time.time()})

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write()
            except (UpdateFinishedTrialError, RuntimeError):  # the trial ended (or was recovered) meanwhile
                return
            except ServerUnavailable:  # the storage stayed away past its limit: beat again next time
                continue

    def __enter__(self) -> Lease:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def death_of(trial: FrozenTrial, now: float | None = None) -> str | None:
    """Why a RUNNING trial's worker is considered dead, or None while its lease holds."""
    now = time.time() if now is None else now
    lease = trial.user_attrs.get("lease")
    if not lease:  # not yet written (or a trial from before leases): judged by its start time
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return "worker died before its first heartbeat" if now - started > grace_period() else None
    who = f"{lease['host']}:{lease['pid']}"
    if lease["host"] == HOST and lease["pid"] != os.getpid() and not pid_alive(lease["pid"]):
        return f"worker {who} died (process gone)"
    if now - lease["beat"] > grace_period():
        return f"worker {who} died (no heartbeat for {now - lease['beat']:.0f} s)"
    return None


def recover_dead_trials(study: optuna.Study, close_runs: Callable[[int, str], None]) -> list[int]:
    """Fail every RUNNING trial whose worker is dead, close its MLflow runs, enqueue its parameters again.

    Returns the numbers of the trials recovered here. When several workers find the same dead trial, the
    one whose FAIL lands first re-enqueues it; the others see the trial finished and leave it."""
    recovered = []
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = death_of(trial)
        if why is None:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "state", "abandoned")
            storage.set_trial_user_attr(trial._trial_id, "failure", why)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        close_runs(trial.number, f"{why}; parameters re-queued")
        requeue(study, trial)
        recovered.append(trial.number)
    return recovered


def requeue(study: optuna.Study, trial) -> None:
    """Queue a trial's parameters again (with what a round or confirmation trial carries), for the next
    worker: after its worker died, or was stopped by SIGTERM."""
    from harness.sweep.optuna_study import is_extra  # optuna_study imports this module

    carried = {k: trial.user_attrs[k] for k in CARRIED if k in trial.user_attrs} if is_extra(trial) else {}
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **carried})
