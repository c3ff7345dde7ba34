"""A real tiny study through Optuna (journal storage) and MLflow (SQLite): parent and child runs, a pruned
and a diverged trial, seeds averaged, the teacher trained once, and resuming."""

from __future__ import annotations

import statistics

import optuna
import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from tests.conftest import write_yaml

pytestmark = pytest.mark.slow


@pytest.fixture
def study_file(tmp_path, tiny_experiment):
    # The grid runs in order: lr 0.05 (learns), 1e-12 (frozen at its initial weights: a higher validation
    # loss than the first trial on each of the four seeds, which the Wilcoxon pruner can call after the
    # fourth), 1e30 (diverges).
    return write_yaml(
        tmp_path / "studies" / "e2e.yaml",
        {
            "experiment": str(tiny_experiment),
            "objective": {"metric": "val/loss", "direction": "minimize"},
            "budget": {"trials": 3},
            "sampler": {"name": "grid", "seed": 1},
            "pruner": {"name": "wilcoxon"},
            "seeds": [0, 1, 2, 3],
            "fixed": {"kd.method": "response", "kd.temperature": 2.0},
            "search": {"train.lr": {"choices": [0.05, 1.0e-12, 1.0e30]}},
        },
    )


def runs_by_role(client, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        out.setdefault(run.data.tags.get("role"), []).append(run)
    return out


def test_study_end_to_end_with_resume(tmp_path, store, study_file):
    journal = str(tmp_path / "journal.log")
    args = ["sweep", "--study", str(study_file), "--storage", journal, "--quiet"]
    assert main([*args, "--trials", "2"]) == 0  # stop after two trials ...
    assert main(args) == 0  # ... and resume to the budget of three

    study = optuna.load_study(
        study_name="e2e",
        storage=optuna.storages.journal.JournalStorage(optuna.storages.journal.JournalFileBackend(journal)),
    )
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.params["train.lr"] for t in trials] == [0.05, 1e-12, 1e30]
    assert [t.state for t in trials] == [
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.FAIL,
    ]
    assert trials[2].user_attrs["state"] == "diverged"

    client = MlflowClient(store)
    roles = runs_by_role(client, "e2e")
    (parent,) = roles["study"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_finished"] == 1 and parent.data.metrics["trials_pruned"] == 1
    assert parent.data.metrics["trials_diverged"] == 1

    trial_runs = {int(r.data.tags["optuna.trial"]): r for r in roles["trial"]}
    assert sorted(trial_runs) == [0, 1, 2]  # resuming did not train a trial twice
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trial_runs.values())
    status = {n: (r.info.status, r.data.tags["state"]) for n, r in trial_runs.items()}
    assert status == {0: ("FINISHED", "finished"), 1: ("KILLED", "pruned"), 2: ("FAILED", "diverged")}
    assert "diverged" in trial_runs[2].data.tags["failure"]
    assert (
        trial_runs[0].data.params["train.lr"] == "0.05"
        and trial_runs[0].data.params["kd.method"] == "response"
    )

    # the finished trial's metrics are the mean and spread of its seed runs
    seeds = [r for r in roles["seed"] if r.data.tags["mlflow.parentRunId"] == trial_runs[0].info.run_id]
    assert sorted(r.data.tags["seed"] for r in seeds) == ["0", "1", "2", "3"]
    per_seed = [r.data.metrics["val/loss"] for r in seeds]
    assert trial_runs[0].data.metrics["val/loss"] == pytest.approx(statistics.fmean(per_seed))
    assert trial_runs[0].data.metrics["val/loss_std"] == pytest.approx(statistics.stdev(per_seed))
    assert trials[0].value == pytest.approx(statistics.fmean(per_seed))
    for run in seeds:
        history = client.get_metric_history(run.info.run_id, "train/kd")
        assert [m.step for m in history] == [0, 1]  # the KD term per epoch
        assert run.data.metrics["params"] > 0 and run.data.metrics["ms_per_image"] > 0
        assert run.data.tags["teacher.source"].startswith("run ")
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
            "config.yaml",
            "model.pt",
            "predictions.png",
        }

    # the teacher was trained once, before the trials, and reused by all of them
    teacher_runs = runs_by_role(client, "teachers")["teacher"]
    assert len(teacher_runs) == 1
    assert all(teacher_runs[0].info.run_id in r.data.tags["teacher.source"] for r in roles["seed"])


def test_two_local_workers_share_one_study(tmp_path, store, tiny_teacher):
    """WORKERS=2: two processes on the journal storage, logging through one local MLflow server."""
    study = write_yaml(
        tmp_path / "studies" / "two.yaml",
        {
            "experiment": str(tiny_teacher),
            "budget": {"trials": 4},
            "sampler": {"name": "random", "seed": 0},
            "search": {"train.lr": {"low": 0.001, "high": 0.05, "log": True}},
        },
    )
    journal = str(tmp_path / "journal.log")
    assert main(["sweep", "--study", str(study), "--storage", journal, "--workers", "2", "--quiet"]) == 0
    trials = optuna.load_study(
        study_name="two",
        storage=optuna.storages.journal.JournalStorage(optuna.storages.journal.JournalFileBackend(journal)),
    ).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert (
        len(complete) == 4 and len({t.params["train.lr"] for t in complete}) == 4
    )  # no duplicated proposals
    roles = runs_by_role(MlflowClient(store), "two")
    assert len(roles["study"]) == 1 and roles["study"][0].info.status == "FINISHED"
    assert sorted(
        int(r.data.tags["optuna.trial"]) for r in roles["trial"] if r.data.tags["state"] == "finished"
    ) == sorted(t.number for t in complete)
