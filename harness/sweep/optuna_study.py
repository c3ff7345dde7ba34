"""Optuna's side of a study: storage, sampler, pruner, the budget, and the loop that runs trials.

The objective itself (one configuration trained per seed) is ``trial.py``; leases on running trials and
the recovery of dead workers' trials are ``leases.py``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from harness.sweep.config import StudyConfig, example_experiment
from harness.sweep.definition import check_choices_kept, check_judged_alike, definition_changes
from harness.sweep.leases import recover_dead_trials

optuna.logging.set_verbosity(optuna.logging.ERROR)  # our display reports trial outcomes
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Target and region quantiles")
warnings.filterwarnings("ignore", message="Some regimes for parameter")  # importances from few trials

DEFAULT_JOURNAL = "mlruns/optuna/journal.log"
JOURNAL_LOCK_GRACE = 30  # seconds without journal writes before a lock is taken to be stale
POLL_SECONDS = 2.0  # how often a worker waiting on others' trials looks again
MAX_DUPLICATES = 25
COUNTED_STATES = ("finished", "pruned", "diverged", "failed")  # user_attr "state" of trials that use budget


class TrialDiverged(Exception):
    """A seed's training loss turned NaN/inf; the trial is recorded as failed with state 'diverged'."""


class TrialFailed(Exception):
    """A seed's training raised; its traceback is an artifact of the seed's run. The study goes on."""


class SurplusTrial(Exception):
    """Not to be trained: the budget is allocated, the grid has no point left, or the configuration was
    already trained. Recorded as failed with a state that does not count toward the budget."""


def open_storage(url: str | None, heartbeat: int | None = None, retries: int = 2):
    """A journal file by default (safe for many processes on one host); an RDB URL for many machines.

    RDB storages get heartbeats: a trial whose worker died is failed and re-queued (``retries`` times);
    their calls wait for a database that restarts (``rdb.py``, ``HARNESS_STORAGE_RETRY_S``)."""
    if url is None or url.startswith("journal:") or url.endswith(".log"):
        return open_journal(Path(url.removeprefix("journal:") if url else DEFAULT_JOURNAL))
    from harness.sweep.rdb import open_rdb

    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=retries
            ),
        )
    return open_rdb(url, **kwargs)


def open_journal(path: Path):
    """A journal file opened by absolute path. Optuna's lock is a symlink to the path it was given; with a
    relative path the link dangles, its age can never be read and a lock left by a killed process is never
    broken. With an absolute one Optuna breaks a lock nobody has refreshed for the grace period."""
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage

    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = Path(f"{path}.lock")
    grace = int(os.environ.get("HARNESS_JOURNAL_LOCK_GRACE", JOURNAL_LOCK_GRACE))
    if lock.is_symlink():
        if not lock.exists():  # dangling: left by a version that opened the journal by a relative path
            lock.unlink(missing_ok=True)
            print(f"warning: removed the stale lock {lock} (it pointed nowhere)", file=sys.stderr)
        else:
            print(
                f"warning: {lock} exists; if no other sweep is running it was left by a killed one "
                f"and is broken after {grace} s without journal writes",
                file=sys.stderr,
            )
    backend = JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path), grace_period=grace))
    return JournalStorage(backend)


def make_sampler(study: StudyConfig, worker: int = 0, stored: int = 0, arm: int | None = None):
    """Seeded sampler. The seed also depends on the worker (workers of one study don't propose the same
    trials), on the number of trials already stored (a resumed study doesn't replay its first draws) and
    on the arm it samples (arms.py). A grid study samples nothing: every grid point is enqueued once
    (``enqueue_grid``)."""
    s = study.sampler
    entropy = [s.seed, worker, stored, *([] if arm is None else [arm])]
    seed = None if s.seed is None else int(np.random.SeedSequence(entropy).generate_state(1)[0])
    if s.name in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        multivariate=True,
        group=True,
        n_startup_trials=s.startup_trials,
        constraints_func=_constraints_func if study.constraints else None,
    )


def _constraints_func(trial) -> list[float]:
    return trial.user_attrs.get("constraints", [1.0])


def make_pruner(study: StudyConfig):
    p = study.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.name == "wilcoxon":  # steps are seeds: judged on per-seed values against the best trial's
        return optuna.pruners.WilcoxonPruner(p_threshold=p.p_threshold, n_startup_steps=2)
    if p.name == "hyperband":
        epochs = example_experiment(study).train.epochs
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.warmup_epochs), max_resource=epochs)
    return optuna.pruners.NopPruner()


def open_study(
    study: StudyConfig, storage_url: str | None, heartbeat: int | None = None, worker: int = 0
) -> optuna.Study:
    """The study named in ``study``, created on first use. A study stored under that name with another
    objective is refused; one stored with another definition (experiment, teacher, fixed, seeds, search)
    gets one line saying what changed, and its definition is updated."""
    storage = open_storage(storage_url, heartbeat)
    found = next((s for s in storage.get_all_studies() if s.study_name == study.name), None)
    stored = storage.get_n_trials(found._study_id) if found else 0
    earlier = 0 if found is None else _counted(storage.get_all_trials(found._study_id, deepcopy=False))
    definition = study.definition()
    if found is not None:
        check_judged_alike(study.name, found, definition, earlier)
        check_choices_kept(study, storage.get_all_trials(found._study_id, deepcopy=False))
    opened = optuna.create_study(
        study_name=study.name,
        storage=storage,
        sampler=make_sampler(study, worker, stored),
        pruner=make_pruner(study),
        direction=study.objective.direction,
        load_if_exists=True,
    )
    old = found.user_attrs.get("definition") if found is not None else None
    if old != definition:
        changes = definition_changes(old, definition) if old and earlier else []
        if changes:
            print(
                f"note: study {study.name}: {'; '.join(changes)} since its {earlier} earlier trials; they "
                "are kept, and only configurations not yet trained under this file will run",
                file=sys.stderr,
            )
        opened.set_user_attr("definition", definition)
    if study.sampler.name == "grid":
        enqueue_grid(study, opened)
    return opened


def trial_key(t, study: StudyConfig) -> tuple[str, tuple[int, ...]] | None:
    """What a stored trial trains: its config hash and seeds. A waiting trial, or one from before config
    hashes were stored, is taken to train what its parameters resolve to under the current file."""
    if "config_hash" in t.user_attrs:
        return t.user_attrs["config_hash"], tuple(t.user_attrs["seeds"])
    key = study.trial_key(t.params or t.system_attrs.get("fixed_params") or {})
    if key is None or "seeds" not in t.user_attrs:
        return key
    return key[0], tuple(t.user_attrs["seeds"])


def is_current(t, study: StudyConfig | None) -> bool:
    """Whether a stored trial trained what the current file trains for its parameters; trials from before
    config hashes were stored count as current."""
    if study is None or "config_hash" not in t.user_attrs:
        return True
    return trial_key(t, study) == study.trial_key(t.params)


def enqueue_grid(study: StudyConfig, opened: optuna.Study) -> None:
    """Every grid point as a waiting trial, unless a trial that trains the same config with the same seeds
    has run, runs or waits (a re-run enqueues only what is missing, also after the file changed; a point
    enqueued twice by racing workers is caught as a duplicate when it runs)."""
    taken = {
        trial_key(t, study)
        for t in opened.get_trials(deepcopy=False)
        if trial_state(t) in (*COUNTED_STATES, "running")
    }
    for point in study.grid():
        if study.trial_key(point) not in taken:
            opened.enqueue_trial(point)


def is_extra(t) -> bool:
    """A trial that trains a chosen configuration on more seeds after tuning (a sequential round, or the
    confirmation of an arm's best configuration): it does not count toward the budget."""
    return "round" in t.user_attrs or t.user_attrs.get("phase") == "confirmation"


def is_enqueued(trial: optuna.Trial) -> bool:
    return "fixed_params" in trial.storage.get_trial_system_attrs(trial._trial_id)


def trial_state(t) -> str:
    """Our name for how a trial ended: finished, pruned, diverged, failed, running or abandoned."""
    if t.state == TrialState.COMPLETE:
        return "finished"
    if t.state == TrialState.PRUNED:
        return "pruned"
    if t.state in (TrialState.RUNNING, TrialState.WAITING):
        return "running"
    return t.user_attrs.get("state", "abandoned")


def _counted(trials) -> int:
    return sum(trial_state(t) in COUNTED_STATES for t in trials)


def used_budget(study: optuna.Study, before: float | None = None, cfg: StudyConfig | None = None) -> int:
    """Trials that count toward the budget; with ``cfg``, only those that trained what the current file
    trains (a changed file starts its budget afresh). With ``before``, trials running (not waiting) with a
    lower number count too: the budget they hold is taken unless their worker dies."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        running = before is not None and t.state == TrialState.RUNNING and t.number < before
        n += not is_extra(t) and ((trial_state(t) in COUNTED_STATES and is_current(t, cfg)) or running)
    return n


def optimize(
    study_cfg: StudyConfig,
    study: optuna.Study,
    runner,
    *,
    trials: int | None,
    timeout: float | None,
    callbacks=(),
    close_runs: Callable[[int, str], None] | None = None,
    before_trial: Callable[[], None] | None = None,
) -> None:
    """Run trials here one at a time until the budget is spent, the timeout passes,
    or (grid) no point is left. ``before_trial`` runs before each (arms.py points the sampler at an arm).

    Before each trial, trials whose worker died are failed and re-queued (``leases.recover_dead_trials``;
    Optuna's heartbeats too on RDB storage). While the rest of the budget runs in other workers this worker
    starts no surplus trial: it waits, polling, and trains a dead worker's trial when it comes back."""
    deadline = None if timeout is None else time.monotonic() + timeout
    heartbeat = _heartbeat_interval(study)
    grid = study_cfg.sampler.name == "grid"
    while True:
        recover_dead_trials(study, close_runs or (lambda number, why: None))
        if heartbeat:
            optuna.storages.fail_stale_trials(study)  # may re-queue a dead worker's trial
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        if trials is not None and used_budget(study, cfg=study_cfg) >= trials:
            return
        allocated = trials is not None and used_budget(study, before=math.inf, cfg=study_cfg) >= trials
        if allocated or (grid and not _waiting(study)):
            if not _running(study):
                return
            time.sleep(POLL_SECONDS if heartbeat is None else min(heartbeat, POLL_SECONDS))
            continue
        if getattr(runner, "duplicate_streak", 0) >= MAX_DUPLICATES:
            print(
                f"warning: study {study_cfg.name}: the sampler proposed {MAX_DUPLICATES} configurations in a "
                "row that were trained already; the search space looks exhausted, stopping",
                file=sys.stderr,
            )
            return
        if before_trial is not None:
            before_trial()
        study.optimize(
            runner,
            n_trials=1,
            timeout=remaining,
            catch=(TrialDiverged, TrialFailed, SurplusTrial),
            callbacks=list(callbacks),
        )


def _running(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _heartbeat_interval(study: optuna.Study) -> int | None:
    get = getattr(study._storage, "get_heartbeat_interval", None)
    return get() if get else None


def summarize(study: optuna.Study, cfg: StudyConfig | None = None) -> dict[str, Any]:
    """Counts by state and the best trial so far, for progress displays and the CLI's last line; with
    ``cfg``, of the trials that trained what the current file trains."""
    counts = dict.fromkeys(("finished", "pruned", "diverged", "failed", "running"), 0)
    trials = [t for t in study.get_trials(deepcopy=False) if is_current(t, cfg)]
    for t in trials:
        s = trial_state(t)
        if s in counts:
            counts[s] += 1
    feasible = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and all(v <= 0 for v in t.user_attrs.get("constraints", []))
    ]
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    bt = pick(feasible, key=lambda t: t.value, default=None)
    best = None if bt is None else {"number": bt.number, "value": bt.value, "params": bt.params}
    return {"counts": counts, "best": best}


def importances(study: optuna.Study) -> dict[str, float]:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):
        return {}
