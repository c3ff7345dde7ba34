"""Faults during a study: a trial that raises fails alone (traceback kept) and the study goes on; Ctrl-C
stops cleanly, leaves storage consistent, and the same command resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from tests.conftest import TINY_DATA, TINY_TRAIN, write_yaml

pytestmark = pytest.mark.slow


def journal_study(path: str, name: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(path)))


def test_failing_trial_keeps_its_traceback_and_the_study_goes_on(tmp_path, store):
    exp = write_yaml(
        tmp_path / "exp.yaml",
        {
            "name": "f",
            "data": {**TINY_DATA, "image_size": 48},
            "model": {"name": "unet", "width": 2, "depth": 3},
            "train": TINY_TRAIN,
        },
    )
    # depth 6 pools five times: 48 is not divisible by 32, so that trial's forward pass raises
    study = write_yaml(
        tmp_path / "faulty.yaml",
        {
            "experiment": str(exp),
            "budget": {"trials": 2},
            "sampler": {"name": "grid", "seed": 0},
            "search": {"model.depth": {"choices": [3, 6]}},
        },
    )
    journal = str(tmp_path / "journal.log")
    assert main(["sweep", "--study", str(study), "--storage", journal, "--quiet"]) == 0

    trials = {t.params["model.depth"]: t for t in journal_study(journal, "faulty").get_trials()}
    assert trials[3].state == optuna.trial.TrialState.COMPLETE
    assert trials[6].state == optuna.trial.TrialState.FAIL and trials[6].user_attrs["state"] == "failed"
    assert "divisible by 32" in trials[6].user_attrs["failure"]
    client = MlflowClient(store)
    exp_id = client.get_experiment_by_name("faulty").experiment_id
    (seed_run,) = client.search_runs([exp_id], "tags.role = 'seed' and params.`model.depth` = '6'")
    assert seed_run.info.status == "FAILED" and "divisible by 32" in seed_run.data.tags["failure"]
    trace = client.download_artifacts(seed_run.info.run_id, "traceback.txt", str(tmp_path))
    assert "Traceback" in open(trace).read()
    (parent,) = client.search_runs([exp_id], "tags.role = 'study'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == 1


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path, store):
    exp = write_yaml(
        tmp_path / "exp.yaml",
        {
            "name": "i",
            "data": TINY_DATA,
            "model": {"name": "unet", "width": 2, "depth": 3},
            "train": {**TINY_TRAIN, "epochs": 2000},  # far longer than the wait below: SIGINT lands mid-trial
        },
    )
    study = write_yaml(tmp_path / "interrupt.yaml", {"experiment": str(exp), "budget": {"trials": 1}})
    journal = str(tmp_path / "journal.log")
    cmd = [sys.executable, "-m", "harness", "sweep", "--study", str(study), "--storage", journal, "--quiet"]
    # A terminal's Ctrl-C reaches a process whose SIGINT is not ignored; a test run started in the background
    # (nohup, `cmd &` in a script) passes an ignored SIGINT down to its children, so give the sweep the default.
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    client = MlflowClient(store)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the trial has trained an epoch or two
        exp_obj = (
            client.get_experiment_by_name("interrupt")
            if os.path.exists(store.removeprefix("sqlite:///"))
            else None
        )
        runs = client.search_runs([exp_obj.experiment_id], "tags.role = 'seed'") if exp_obj else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err

    (trial,) = journal_study(journal, "interrupt").get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["state"] == "interrupted"
    exp_id = client.get_experiment_by_name("interrupt").experiment_id
    states = {
        r.data.tags["role"]: (r.info.status, r.data.tags["state"]) for r in client.search_runs([exp_id])
    }
    assert states == {
        "study": ("KILLED", "interrupted"),
        "trial": ("KILLED", "interrupted"),
        "seed": ("KILLED", "interrupted"),
    }

    # the interrupted trial does not use budget: resuming trains one more and finishes the study
    short = [*cmd, "--trials", "1"]
    write_yaml(
        exp,
        {
            "name": "i",
            "data": TINY_DATA,
            "model": {"name": "unet", "width": 2, "depth": 3},
            "train": TINY_TRAIN,
        },
    )
    done = subprocess.run(
        short, env={**os.environ, "MLFLOW_TRACKING_URI": store}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    states = [t.state for t in journal_study(journal, "interrupt").get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    (parent,) = client.search_runs([exp_id], "tags.role = 'study'")
    assert parent.info.status == "FINISHED"


def test_objective_metric_the_task_does_not_log_stops_the_study_in_one_line(tmp_path, store, capsys):
    exp = write_yaml(
        tmp_path / "exp.yaml",
        {
            "name": "m",
            "data": TINY_DATA,
            "model": {"name": "unet", "width": 2, "depth": 3},
            "train": TINY_TRAIN,
        },
    )
    study = write_yaml(
        tmp_path / "wrongmetric.yaml",
        {
            "experiment": str(exp),
            "budget": {"trials": 3},
            "objective": {"metric": "val/accuracy"},
            "search": {"train.lr": {"choices": [0.01]}},
        },
    )
    assert main(["sweep", "--study", str(study), "--storage", str(tmp_path / "j.log"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("error: study wrongmetric: metric ['val/accuracy'] is not logged")
        and "val/miou" in err
    )
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("wrongmetric").experiment_id])
    assert {r.data.tags["role"]: r.info.status for r in runs} == {
        "study": "FAILED",
        "trial": "FAILED",
        "seed": "FINISHED",
    }
