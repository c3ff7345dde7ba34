"""Scale-out on a real PostgreSQL (Debian's server binaries, a throwaway cluster on a free loopback port):
Optuna storage in one database, an ``mlflow server`` over another, and ``python -m harness worker``
processes sharing one study. Workers crash with ``kill -9``; heartbeats re-queue their trial."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.tracking.postgres import find_bindir, sqlalchemy_url, throwaway
from harness.tracking.server import serve
from tests.servers import REPO, load, tiny_study, wait_all

HEARTBEAT = 2  # seconds; a dead worker's trial is stale after 2 x HEARTBEAT


@pytest.fixture(scope="module")
def pg():
    if find_bindir() is None:
        pytest.skip(
            "PostgreSQL server binaries not found (apt-get install postgresql; .ci/run installs them)"
        )
    with throwaway(databases=("mlflow",)) as server:
        yield server


@pytest.fixture(scope="module")
def tracking(pg, tmp_path_factory):
    """An mlflow server over PostgreSQL, serving artifacts from a temporary folder."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    with serve(pg.url("mlflow"), tmp / "artifacts", log=tmp / "server.log") as url:
        yield url


def start_workers(n: int, study: Path, storage: str, tracking: str, cwd: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable,
        "-m",
        "harness",
        "worker",
        "--study",
        str(study),
        "--storage",
        storage,
        "--tracking-uri",
        tracking,
        "--heartbeat",
        str(HEARTBEAT),
        "--quiet",
    ]
    return [
        subprocess.Popen(
            [*cmd, "--worker-index", str(i)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]


def trial_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.role = 'trial'", max_results=1000)


def check_one_finished_run_per_trial(study: optuna.Study, client: MlflowClient, name: str) -> None:
    complete = {t.number: t for t in study.trials if t.state == TrialState.COMPLETE}
    runs = trial_runs(client, name)
    numbers = Counter(int(r.data.tags["optuna.trial"]) for r in runs)
    assert all(c == 1 for c in numbers.values()), f"a trial number has several runs: {numbers}"
    finished = {int(r.data.tags["optuna.trial"]): r for r in runs if r.info.status == "FINISHED"}
    assert sorted(finished) == sorted(complete)
    for number, trial in complete.items():
        run = finished[number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.data.tags["state"] == "finished"
        assert float(run.data.metrics["val/miou"]) == pytest.approx(trial.value)
    parents = client.search_runs(
        [client.get_experiment_by_name(name).experiment_id], filter_string="tags.role = 'study'"
    )
    assert len(parents) == 1, "workers started together must share one parent run"
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs)
    # the workers that saw the budget spent closed the parent run with the study's summary
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials_finished"] == len(complete)


@pytest.mark.postgres
@pytest.mark.slow
def test_waiting_worker_retries_a_dead_workers_trial(pg):
    """The last trial of the budget runs in a worker that died: the survivor neither starts surplus trials
    nor stops, but waits until the heartbeat marks the trial stale, then trains its re-queued copy."""
    from harness.sweep.config import StudyConfig
    from harness.sweep.optuna_study import SurplusTrial, open_storage, optimize, used_budget
    from harness.sweep.trial import sample

    cfg = StudyConfig.model_validate(
        {
            "name": "wait",
            "experiment": "unused.yaml",
            "budget": {"trials": 2},
            "search": {"train.lr": {"low": 1.0e-3, "high": 1.0e-1, "log": True}},
        }
    )
    storage = open_storage(pg.create_database("optuna_wait"), heartbeat=1)
    study = optuna.create_study(study_name="wait", storage=storage, direction="maximize")

    def finished(trial):
        trial.set_user_attr("state", "finished")
        return sample(trial, cfg)["train.lr"]

    study.optimize(finished, n_trials=1)  # trial 0
    with pytest.warns(UserWarning, match="Heartbeat"):
        dead = study.ask()  # trial 1: its worker records one heartbeat, then dies
    dead_params = sample(dead, cfg)
    storage.record_heartbeat(dead._trial_id)

    seen = []

    def runner(trial):
        if used_budget(trial.study, before=trial.number) >= 2:
            trial.set_user_attr("state", "surplus")
            raise SurplusTrial()
        seen.append((trial.number, sample(trial, cfg)))
        return 0.0

    start = time.monotonic()
    optimize(cfg, study, runner, trials=2, timeout=60)
    assert 2 <= time.monotonic() - start < 30  # waited for the grace period (2 s), not for the timeout
    assert seen == [(2, dead_params)]  # the re-queued copy, with the dead trial's parameters
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[2].system_attrs["retry_history"] == [1]


@pytest.mark.postgres
@pytest.mark.slow
def test_three_workers_share_one_study(pg, tracking, tmp_path):
    storage = pg.create_database("optuna_three")
    study_file = tiny_study(tmp_path, "three", trials=6, epochs=1)
    results = wait_all(start_workers(3, study_file, storage, tracking, tmp_path))
    assert [code for code, _ in results] == [0, 0, 0], "\n\n".join(text[-3000:] for _, text in results)

    study = load(storage, "three")
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] == 6
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    # no trial beyond the budget was trained: extra trials, if any, stopped at once as surplus
    extra = [t for t in study.trials if t.state != TrialState.COMPLETE]
    assert all(t.user_attrs.get("state") == "surplus" for t in extra), [
        (t.number, t.user_attrs) for t in extra
    ]
    assert len(extra) <= 3
    assert len({t.user_attrs["worker"] for t in study.trials if t.state == TrialState.COMPLETE}) >= 2
    check_one_finished_run_per_trial(study, MlflowClient(tracking), "three")


@pytest.fixture(scope="module")
def killed_study(pg, tracking, tmp_path_factory):
    """Two workers on a study of three trials; one worker is killed with SIGKILL in the middle of a trial."""
    tmp = tmp_path_factory.mktemp("killed")
    storage = pg.create_database("optuna_killed")
    study_file = tiny_study(tmp, "killed", trials=3, epochs=12, train_images=96)
    procs = start_workers(2, study_file, storage, tracking, tmp)
    by_worker = {p.pid: p for p in procs}
    victim = number = None
    deadline = time.time() + 240
    while victim is None and time.time() < deadline:
        time.sleep(0.3)
        try:
            trials = load(storage, "killed").get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # study not created yet
            continue
        for t in trials:
            pid = int(t.user_attrs.get("worker", ":0").rsplit(":", 1)[1])
            if pid in by_worker and "mlflow_run_id" in t.user_attrs:  # training has started
                victim, number = by_worker[pid], t.number
                victim.send_signal(signal.SIGKILL)
                break
    assert victim is not None, "no trial started within 240 s"
    dead = [t for t in load(storage, "killed").trials if t.number == number][0]
    assert dead.state in (TrialState.RUNNING, TrialState.FAIL), "the trial ended before the kill; lengthen it"
    results = wait_all(procs, timeout=300)
    return {
        "storage": storage,
        "procs": procs,
        "victim": victim,
        "killed": number,
        "results": results,
        "folder": tmp,
    }


@pytest.mark.postgres
@pytest.mark.slow
def test_killed_worker_trial_is_retried(killed_study, tracking):
    storage, victim, killed = killed_study["storage"], killed_study["victim"], killed_study["killed"]
    assert victim.returncode == -signal.SIGKILL
    ((survivor_code, text),) = [
        r for p, r in zip(killed_study["procs"], killed_study["results"]) if p is not victim
    ]
    assert survivor_code == 0, text[-3000:]

    study = load(storage, "killed")
    trials = {t.number: t for t in study.trials}
    assert Counter(t.state for t in study.trials)[TrialState.COMPLETE] == 3  # the budget was still met
    dead = trials[killed]
    # failed and not counted: by the harness's lease (same host, process gone) or by Optuna's heartbeat,
    # whichever looks first; either way one copy with the same parameters is queued again
    assert dead.state == TrialState.FAIL and dead.user_attrs.get("state", "abandoned") == "abandoned"
    retries = [
        t
        for t in study.trials
        if t.system_attrs.get("failed_trial") == killed or t.user_attrs.get("retry_of") == killed
    ]
    assert len(retries) == 1
    retry = retries[0]
    assert (
        retry.state == TrialState.COMPLETE and retry.params == dead.params
    )  # same configuration, trained again
    surplus = [t for t in study.trials if t.user_attrs.get("state") == "surplus"]
    assert len(surplus) <= 1, "a worker waiting for the last trials must not spin out surplus trials"

    client = MlflowClient(tracking)
    check_one_finished_run_per_trial(study, client, "killed")
    exp = client.get_experiment_by_name("killed").experiment_id
    dead_runs = client.search_runs([exp], filter_string=f"tags.`optuna.trial` = '{killed}'")
    assert dead_runs and all(r.info.status != "RUNNING" for r in dead_runs)
    assert {r.data.tags["state"] for r in dead_runs} == {"abandoned"}


@pytest.mark.postgres
@pytest.mark.slow
def test_report_reads_scale_out_study(killed_study, tracking):
    if (
        importlib.util.find_spec("harness.report") is None
        or not (REPO / "harness" / "report" / "__main__.py").exists()
    ):
        pytest.skip("harness.report is not there yet")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(REPO)}
    out = killed_study["folder"] / "reports"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.report",
            "--study",
            "killed",
            "--out",
            str(out),
            "--tracking-uri",
            tracking,
        ],
        cwd=killed_study["folder"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = [p for p in out.rglob("*") if p.suffix in (".md", ".csv")]
    assert written, proc.stdout[-2000:]


def test_gpu_slots_and_one_worker_per_slot(monkeypatch):
    from harness.sweep import workers

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert workers.gpu_slots(1) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert workers.gpu_slots(1) == ["2", "3"]
    assert workers.gpu_slots(2) == ["2", "2", "3", "3"]

    started = []

    class Proc:
        def __init__(self, cmd, env):
            started.append((cmd, env["CUDA_VISIBLE_DEVICES"]))

        def wait(self):
            return 0

    monkeypatch.setattr(workers.subprocess, "Popen", Proc)
    from harness.cli import build_parser

    args = build_parser().parse_args(
        [
            "worker",
            "--study",
            "s.yaml",
            "--storage",
            "postgresql://h/optuna",
            "--tracking-uri",
            "http://t:5000",
            "--per-gpu",
            "2",
            "--worker-index",
            "1",
        ]
    )
    assert workers.run_gpu_workers(args, workers.gpu_slots(args.per_gpu)) == 0
    assert [gpu for _, gpu in started] == ["2", "2", "3", "3"]
    for i, (cmd, _) in enumerate(started):
        assert cmd[cmd.index("--per-gpu") + 1] == "1"  # each child runs one worker on its one GPU
        assert cmd[cmd.index("--storage") + 1] == "postgresql://h/optuna"
        assert cmd[cmd.index("--tracking-uri") + 1] == "http://t:5000"
        assert cmd[cmd.index("--worker-index") + 1] == str(100 + i)


def test_urls():
    from harness.tracking.urls import redact

    assert sqlalchemy_url("postgresql://u@h:5432/optuna").startswith("postgresql+psycopg")
    assert sqlalchemy_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert sqlalchemy_url("sqlite:///x.db") == "sqlite:///x.db"
    assert redact("postgresql://u:secret@h:5432/optuna") == "postgresql://u:***@h:5432/optuna"
    assert redact("postgresql://u@h/optuna") == "postgresql://u@h/optuna"
