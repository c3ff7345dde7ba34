"""Sweep integrity with real processes: a worker killed with SIGKILL mid-trial is recovered on the next start,
a stale journal lock is broken, a grid trains every point once with two workers, a restarted seeded study
draws new configurations, and a multi-seed study prunes on per-seed values."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.sweep import leases
from tests.conftest import TINY_DATA, TINY_TRAIN, write_yaml

pytestmark = pytest.mark.slow


def journal_study(path, name: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def sweep_cmd(study, journal, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "harness",
        "sweep",
        "--study",
        str(study),
        "--storage",
        str(journal),
        *extra,
    ]


def run_sweep(study, journal, store, *extra, timeout=300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "OMP_NUM_THREADS": "1",
        "HARNESS_JOURNAL_LOCK_GRACE": "3",
    }
    proc = subprocess.run(
        sweep_cmd(study, journal, "--quiet", *extra), env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def experiment(tmp_path, **train):
    return write_yaml(
        tmp_path / "exp.yaml",
        {
            "name": "integrity",
            "data": TINY_DATA,
            "model": {"name": "unet", "width": 2, "depth": 3},
            "train": {**TINY_TRAIN, "epochs": 1, **train},
        },
    )


def study_file(tmp_path, name: str, exp, **fields):
    return write_yaml(tmp_path / f"{name}.yaml", {"name": name, "experiment": str(exp), **fields})


def mlflow_runs(store: str, name: str):
    client = MlflowClient(store)
    return client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)


def finished_params(study: optuna.Study) -> list[dict]:
    return [t.params for t in study.trials if t.state == TrialState.COMPLETE]


def test_a_worker_killed_mid_trial_is_recovered_on_the_next_start(tmp_path, store):
    exp = experiment(tmp_path, epochs=40)
    lr = {"low": 1.0e-3, "high": 1.0e-1, "log": True}
    study = study_file(
        tmp_path, "killed", exp, budget={"trials": 3}, sampler={"name": "random"}, search={"train.lr": lr}
    )
    journal = tmp_path / "journal.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "OMP_NUM_THREADS": "1",
        "HARNESS_JOURNAL_LOCK_GRACE": "3",
    }
    proc = subprocess.Popen(
        sweep_cmd(study, journal, "--quiet"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    victim, deadline = None, time.time() + 180
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            running = journal_study(journal, "killed").get_trials(states=(TrialState.RUNNING,))
        except (KeyError, ValueError):  # study not created yet
            continue
        if running and "lease" in running[0].user_attrs and running[0].number == 1:
            victim = running[0]
    assert victim is not None, proc.communicate()[0][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # what SIGKILL leaves behind: a RUNNING trial in Optuna, RUNNING runs in MLflow
    assert journal_study(journal, "killed").trials[victim.number].state == TrialState.RUNNING
    assert any(r.info.status == "RUNNING" for r in mlflow_runs(store, "killed"))

    run_sweep(study, journal, store)
    trials = journal_study(journal, "killed").trials
    assert Counter(t.state for t in trials)[TrialState.COMPLETE] == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["state"] == "abandoned"
    assert "died (process gone)" in dead.user_attrs["failure"]
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    params = finished_params(journal_study(journal, "killed"))
    assert len({tuple(sorted(p.items())) for p in params}) == len(params)

    runs = mlflow_runs(store, "killed")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    dead_runs = [r for r in runs if r.data.tags.get("optuna.trial") == str(victim.number)]
    assert dead_runs and {r.info.status for r in dead_runs} == {"KILLED"}
    assert all("died" in r.data.tags["failure"] for r in dead_runs)
    parent = [r for r in runs if r.data.tags.get("role") == "study"]
    assert len(parent) == 1 and parent[0].data.metrics["trials_finished"] == 3


def test_a_stale_journal_lock_is_broken_with_one_warning(tmp_path, store):
    exp = experiment(tmp_path)
    study = study_file(tmp_path, "locked", exp, budget={"trials": 1}, sampler={"name": "random"})
    journal = tmp_path / "optuna" / "journal.log"
    journal.parent.mkdir()
    journal.touch()
    os.symlink(str(journal), f"{journal}.lock")  # what a process killed while holding the lock leaves
    start = time.monotonic()
    proc = run_sweep(study, journal, store, timeout=120)
    assert time.monotonic() - start < 90
    warnings = [line for line in proc.stderr.splitlines() if "journal.log.lock" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), proc.stderr
    assert finished_params(journal_study(journal, "locked")) == [{}]
    assert not os.path.lexists(f"{journal}.lock")

    # a dangling lock (an older version's relative link) is removed at once
    os.symlink("optuna/journal.log", f"{journal}.lock")
    proc = run_sweep(study, journal, store, "--trials", "2", timeout=60)
    assert "pointed nowhere" in proc.stderr


def test_a_grid_with_two_workers_trains_every_point_once(tmp_path, store):
    exp = experiment(tmp_path)
    grid = {"model.width": {"choices": [1, 2, 3, 4]}, "train.lr": {"choices": [0.01, 0.03]}}
    study = study_file(tmp_path, "grid", exp, sampler={"name": "grid"}, search=grid)
    journal = tmp_path / "journal.log"
    run_sweep(study, journal, store, "--workers", "2")

    trials = journal_study(journal, "grid").trials
    done = finished_params(journal_study(journal, "grid"))
    assert sorted((p["model.width"], p["train.lr"]) for p in done) == sorted(
        (w, lr) for w in (1, 2, 3, 4) for lr in (0.01, 0.03)
    )
    assert len({t.user_attrs.get("worker") for t in trials if t.state == TrialState.COMPLETE}) == 2
    finished_runs = [r for r in mlflow_runs(store, "grid") if r.data.tags.get("role") == "trial"]
    assert len([r for r in finished_runs if r.data.tags["state"] == "finished"]) == 8

    run_sweep(study, journal, store)  # a re-run trains only what is missing: nothing
    assert len(journal_study(journal, "grid").trials) == len(trials)


def test_a_restarted_seeded_study_draws_new_configurations(tmp_path, store):
    exp = experiment(tmp_path)
    search = {"train.lr": {"low": 1.0e-3, "high": 1.0e-1, "log": True}}
    study = study_file(
        tmp_path, "restart", exp, budget={"trials": 2}, sampler={"name": "random", "seed": 0}, search=search
    )
    journal = tmp_path / "journal.log"
    run_sweep(study, journal, store)
    run_sweep(study, journal, store, "--trials", "4")
    lrs = [p["train.lr"] for p in finished_params(journal_study(journal, "restart"))]
    assert len(lrs) == 4 and len(set(lrs)) == 4, lrs


def test_several_seeds_are_pruned_on_per_seed_values(tmp_path, store):
    exp = experiment(tmp_path)
    seeds = [0, 1, 2, 3, 4]
    study = study_file(
        tmp_path,
        "seeds",
        exp,
        sampler={"name": "grid"},
        objective={"metric": "val/loss", "direction": "minimize"},
        pruner={"name": "wilcoxon"},
        seeds=seeds,
        search={
            "train.lr": {"choices": [0.05, 1.0e-7]}
        },  # a sound configuration, then one that learns nothing
    )
    journal = tmp_path / "journal.log"
    run_sweep(study, journal, store)
    good, bad = journal_study(journal, "seeds").trials
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == seeds
    # the Wilcoxon test can first reject after four seeds (one-sided exact p = 1/16 < 0.1)
    assert bad.state == TrialState.PRUNED and sorted(bad.intermediate_values) == seeds[:4]
    seed_runs = [
        r
        for r in mlflow_runs(store, "seeds")
        if r.data.tags.get("role") == "seed" and r.data.tags["optuna.trial"] == "1"
    ]
    assert sorted(int(r.data.tags["seed"]) for r in seed_runs) == seeds[:4]


def lease_trial(lease=None, started=0.0):
    return SimpleNamespace(
        user_attrs={"lease": lease} if lease else {}, datetime_start=datetime.fromtimestamp(started)
    )


def test_lease_death_rules(monkeypatch):
    monkeypatch.setenv("HARNESS_LEASE_GRACE", "60")
    now = time.time()
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert leases.death_of(lease_trial({"host": leases.HOST, "pid": gone.pid, "beat": now}), now) == (
        f"worker {leases.HOST}:{gone.pid} died (process gone)"
    )
    alive = {"host": leases.HOST, "pid": os.getppid(), "beat": now - 10}
    assert leases.death_of(lease_trial(alive), now) is None
    elsewhere = {"host": "another-host", "pid": 1, "beat": now - 61}
    assert "no heartbeat for 61 s" in leases.death_of(lease_trial(elsewhere), now)
    assert leases.death_of(lease_trial(started=now - 5), now) is None
    assert "before its first heartbeat" in leases.death_of(lease_trial(started=now - 120), now)
