"""Studies that survive their servers failing (real processes on loopback, bounded in time):

* PostgreSQL, the Optuna storage and the MLflow server's database, restarted while two workers run trials:
  both carry on (``sweep/rdb.py``, the tracker's retries) and the study ends with its exact budget;
* the MLflow tracking server stopped for 20 s mid-trial and started again: the trial's runs end FINISHED
  with every epoch logged once (``tracking/outage.py``);
* the tracking server frozen past ``HARNESS_TRACKING_RETRY_S``: the trial fails once, with one line, its
  parameters are queued again, and the same command trains them once the server is back;
* a worker killed while writing its checkpoint, or while copying it into the artifact store: no partial
  file is ever read back as a model, and the re-run trains the trial again; a stored model.pt that no
  longer matches its digest is refused in one line and the teacher trained again.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from harness.tracking.postgres import find_bindir, throwaway
from tests.servers import (
    TrackingServer,
    harness_cmd,
    killed_while_writing,
    load,
    start,
    stop_all,
    tiny_study,
    wait_all,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.slow
EPOCHS = 30  # long enough that the servers fail while the trial trains


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A PostgreSQL (Optuna's and MLflow's databases) and an MLflow server over it, both restartable."""
    if find_bindir() is None:
        pytest.skip(
            "PostgreSQL server binaries not found (apt-get install postgresql; .ci/run installs them)"
        )
    folder = tmp_path_factory.mktemp("faults")
    with throwaway(databases=("mlflow",)) as pg:
        tracking = TrackingServer(pg.url("mlflow"), folder)
        tracking.start()
        try:
            yield pg, tracking
        finally:
            tracking.stop()


def worker(study: Path, storage: str, tracking: str, index: int = 0) -> list[str]:
    return harness_cmd(
        "worker", "--study", str(study), "--storage", storage, "--tracking-uri", tracking, "--quiet",
        "--worker-index", str(index),
    )  # fmt: skip


def runs(client: MlflowClient, experiment: str, role: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.role = '{role}'", max_results=1000)


def epochs_logged(client: MlflowClient, experiment: str) -> int:
    """The most epochs any seed run of the experiment has logged so far."""
    return max((len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs(client, experiment, "seed")), default=0)  # fmt: skip


def check_every_epoch_once(client: MlflowClient, seed_run) -> None:
    """Each epoch's metrics logged exactly once (steps 0..E-1; val/ also at step E: the selected model)."""
    steps = [m.step for m in client.get_metric_history(seed_run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(EPOCHS)), steps
    steps = [m.step for m in client.get_metric_history(seed_run.info.run_id, "val/miou")]
    assert sorted(steps) == list(range(EPOCHS + 1)), steps


def journal(path: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


@pytest.mark.postgres
def test_postgres_restart_under_two_workers(servers, tmp_path):
    pg, tracking = servers
    storage = pg.create_database("optuna_restart")
    study_file = tiny_study(tmp_path, "pgrestart", trials=4, epochs=EPOCHS)
    procs = [start(worker(study_file, storage, tracking.url, i), tmp_path) for i in range(2)]
    try:

        def both_training():
            running = load(storage, "pgrestart").get_trials(states=(TrialState.RUNNING,))
            training = [t.number for t in running if "mlflow_run_id" in t.user_attrs]
            return training if len(training) == 2 else None

        during = wait_for(both_training, 180, what="two trials training")
        pg.stop()  # fast shutdown: every open connection is cut
        time.sleep(3)
        pg.start()
        results = wait_all(procs, timeout=240)
    finally:
        stop_all(procs)
    assert [code for code, _ in results] == [0, 0], "\n\n".join(text[-3000:] for _, text in results)

    study = load(storage, "pgrestart")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4  # the exact budget
    others = [t for t in study.trials if t.state != TrialState.COMPLETE]
    assert all(t.user_attrs.get("state") == "surplus" for t in others), [
        (t.number, t.user_attrs) for t in others
    ]
    assert not [t for t in study.trials if "retry_of" in t.user_attrs]  # nobody was taken for dead
    assert set(during) <= {t.number for t in complete}  # the trials that trained through it finished
    client = MlflowClient(tracking.url)
    trial_runs = runs(client, "pgrestart", "trial")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trial_runs) == sorted(t.number for t in complete)
    assert {r.info.status for r in trial_runs} == {"FINISHED"}
    seeds = runs(client, "pgrestart", "seed")
    assert len(seeds) == 4 and {r.info.status for r in seeds} == {"FINISHED"}
    for run in seeds:
        check_every_epoch_once(client, run)


def test_tracking_server_stopped_20_s_mid_trial(servers, tmp_path):
    _, tracking = servers
    study_file = tiny_study(tmp_path, "outage", trials=1, epochs=EPOCHS, train_images=96)
    proc = start(worker(study_file, str(tmp_path / "outage" / "journal.log"), tracking.url), tmp_path)
    client = MlflowClient(tracking.url)
    try:
        wait_for(lambda: epochs_logged(client, "outage") >= 1, 180, what="first epoch logged")
        before = epochs_logged(client, "outage")
        tracking.stop()
        stopped = time.time()
        time.sleep(20)
        tracking.start()
        back = time.time()
        ((code, out),) = wait_all([proc], timeout=240)
    finally:
        stop_all([proc])
    assert code == 0, out[-3000:]
    assert before < EPOCHS  # the server went away mid-trial

    (seed,) = runs(client, "outage", "seed")
    (trial_run,) = runs(client, "outage", "trial")
    assert (seed.info.status, trial_run.info.status) == ("FINISHED", "FINISHED")
    check_every_epoch_once(client, seed)
    logged_at = [m.timestamp / 1000 for m in client.get_metric_history(seed.info.run_id, "train/loss")]
    assert sum(t < stopped for t in logged_at) < EPOCHS  # epochs after the outage were logged too
    assert seed.info.end_time / 1000 > back - 1
    (trial,) = journal(tmp_path / "outage" / "journal.log", "outage").trials
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(seed.data.metrics["val/miou"])
    from harness.engine.teacher import load_run_checkpoint
    from harness.tracking import Tracker

    load_run_checkpoint(Tracker(tracking.url), seed.info.run_id, __import__("torch").device("cpu"))


def test_tracking_server_away_past_the_limit_fails_the_trial_once(servers, tmp_path):
    """A frozen server (SIGSTOP: requests hang) past HARNESS_TRACKING_RETRY_S=4: one line, the trial
    failed uncounted and queued again; with the server back the same command trains its parameters."""
    _, tracking = servers
    study_file = tiny_study(tmp_path, "gone", trials=1, epochs=EPOCHS, train_images=96)
    path = tmp_path / "gone" / "journal.log"
    cmd = worker(study_file, str(path), tracking.url)
    env = worker_env(HARNESS_TRACKING_RETRY_S="4", MLFLOW_HTTP_REQUEST_TIMEOUT="3")
    client = MlflowClient(tracking.url)
    procs = [start(cmd, tmp_path, env)]
    try:
        wait_for(lambda: epochs_logged(client, "gone") >= 1, 180, what="first epoch logged")
        tracking.signal(signal.SIGSTOP)
        frozen = time.time()
        try:
            ((code, out),) = wait_all(procs, timeout=90)
        finally:
            tracking.signal(signal.SIGCONT)
        gave_up = time.time() - frozen
        procs.append(start(cmd, tmp_path))  # the server is back: the same command
        ((again, out_again),) = wait_all(procs[1:], timeout=180)
    finally:
        stop_all(procs)

    errors = [line for line in out.splitlines() if "error:" in line]
    assert code == 1 and "Traceback" not in out, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    assert f"tracking server {tracking.url} unreachable" in errors[0]
    assert (
        "HARNESS_TRACKING_RETRY_S=4" in errors[0]
        and "trial 0 failed and its parameters are queued again" in errors[0]
    )
    assert gave_up < 45
    assert again == 0, out_again[-3000:]

    first, retry = journal(path, "gone").trials
    assert first.state == TrialState.FAIL and first.user_attrs["state"] == "abandoned"  # not counted
    assert "tracking server" in first.user_attrs["failure"]
    assert retry.state == TrialState.COMPLETE and retry.params == first.params
    assert retry.user_attrs["retry_of"] == 0
    by_trial = {}
    for role in ("trial", "seed"):
        for r in runs(client, "gone", role):
            by_trial.setdefault(int(r.data.tags["optuna.trial"]), []).append(r)
    assert {r.info.status for r in by_trial[0]} == {"KILLED"}  # closed by the retry, not left RUNNING
    assert {r.data.tags["state"] for r in by_trial[0]} == {"abandoned"}
    assert {r.info.status for r in by_trial[1]} == {"FINISHED"} and len(by_trial[1]) == 2
    check_every_epoch_once(client, next(r for r in by_trial[1] if r.data.tags["role"] == "seed"))


def test_worker_killed_while_writing_its_checkpoint(tmp_path):
    """Killed in torch.save of model.pt, then (the re-run) while copying model.pt into the artifact store:
    no model.pt under its final name is ever partial, and the third run trains the trial to the end."""
    import torch

    from harness.engine.teacher import CHECKPOINT_TAG, load_checkpoint, load_run_checkpoint
    from harness.tracking import Tracker

    study_file = tiny_study(tmp_path, "ckpt", trials=1, epochs=2)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = worker_env(TMPDIR=str(scratch))  # where the run writes model.pt before uploading it
    sweep = ("sweep", "--study", str(study_file), "--quiet")
    procs = [start(killed_while_writing("save", "model.pt", *sweep), tmp_path, env)]
    try:
        ((code, out),) = wait_all(procs, timeout=180)
        assert code == -signal.SIGKILL, out[-3000:]
        partial = list(scratch.rglob("*model.pt*"))
        assert [p.name.startswith(".model.pt.") and p.name.endswith(".tmp") for p in partial] == [True]
        assert not list(tmp_path.rglob("model.pt"))  # the final name never held a partial file

        procs.append(start(killed_while_writing("upload", "model.pt", *sweep), tmp_path, env))
        ((code, out),) = wait_all(procs[1:], timeout=180)
        assert code == -signal.SIGKILL, out[-3000:]
        for path in (tmp_path / "mlruns").rglob("model.pt"):  # whatever reached the store is whole
            load_checkpoint(path, torch.device("cpu"))

        procs.append(start(harness_cmd(*sweep), tmp_path, env))
        ((code, out),) = wait_all(procs[2:], timeout=180)
    finally:
        stop_all(procs)
    assert code == 0, out[-3000:]

    trials = journal(tmp_path / "mlruns" / "optuna" / "journal.log", "ckpt").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert [t.user_attrs["state"] for t in trials] == ["abandoned", "abandoned", "finished"]
    assert trials[2].params == trials[1].params == trials[0].params  # the same trial, trained again
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    seeds = {int(r.data.tags["optuna.trial"]): r for r in runs(tracker._client, "ckpt", "seed")}
    assert [seeds[n].info.status for n in (0, 1, 2)] == ["KILLED", "KILLED", "FINISHED"]
    assert [CHECKPOINT_TAG in seeds[n].data.tags for n in (0, 1, 2)] == [False, False, True]
    load_run_checkpoint(tracker, seeds[2].info.run_id, torch.device("cpu"))  # verified against its digest


def test_a_stored_checkpoint_that_does_not_verify_is_never_loaded(store, tiny_experiment, capsys):
    """A teacher's model.pt changed in the store after its run finished: one line, that run is failed and
    the teacher trained again; a changed byte in a file of the right length is caught by the digest."""
    import torch

    from harness.cli import main
    from harness.engine.teacher import CHECKPOINT_TAG, CorruptCheckpoint, load_checkpoint

    assert main(["train", "--config", str(tiny_experiment), "--set", "kd.method=response", "--quiet"]) == 0
    client = MlflowClient(store)
    (teacher,) = client.search_runs([client.get_experiment_by_name("teachers").experiment_id])
    stored = Path(teacher.info.artifact_uri.removeprefix("file://")) / "model.pt"
    digest = teacher.data.tags[CHECKPOINT_TAG]
    whole = stored.read_bytes()
    flipped = stored.with_name("flipped.pt")
    flipped.write_bytes(whole[:100] + bytes([whole[100] ^ 1]) + whole[101:])
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        load_checkpoint(flipped, torch.device("cpu"), digest)
    stored.write_bytes(whole[: len(whole) // 2])  # the store lost the end of the file
    capsys.readouterr()

    assert main(["train", "--config", str(tiny_experiment), "--set", "kd.method=response", "--quiet"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and teacher.info.run_id in warnings[0] and "trains again" in warnings[0], err
    assert "Traceback" not in err
    old = client.get_run(teacher.info.run_id)
    assert old.info.status == "FAILED" and "does not verify" in old.data.tags["failure"]
    teachers = client.search_runs([client.get_experiment_by_name("teachers").experiment_id])
    new = [r for r in teachers if r.info.run_id != teacher.info.run_id]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    students = client.search_runs([client.get_experiment_by_name("tiny_student").experiment_id])
    latest = max(students, key=lambda r: r.info.start_time)
    assert latest.data.tags["teacher.found_in"] == f"teachers/{new[0].info.run_id}"


def test_what_counts_as_a_server_away():
    from mlflow.exceptions import MlflowException, RestException

    from harness.sweep.rdb import transient as db_transient
    from harness.tracking.outage import transient

    refused = "API request to http://h:5000/api/2.0/mlflow/runs/log-batch failed with exception "
    assert transient(MlflowException(refused + "HTTPConnectionPool(...): Connection refused"))
    assert transient(
        MlflowException("API request to /api/x failed with error code 503 != 200. Response body: ''")
    )
    assert not transient(MlflowException("API request to /api/x failed with error code 404 != 200. Body: ''"))
    assert transient(RestException({"error_code": "INTERNAL_ERROR", "message": "db gone"}))
    assert not transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}))
    assert not transient(MlflowException("Invalid metric name"))  # raised before any request
    from sqlalchemy.exc import IntegrityError, OperationalError

    assert db_transient(OperationalError("SELECT 1", {}, Exception("server closed the connection")))
    assert not db_transient(IntegrityError("INSERT", {}, Exception("duplicate key")))
