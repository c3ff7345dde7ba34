"""An authenticated tracking server (MLflow's basic-auth app) on loopback: no login is refused (401), a
worker user logs a whole trial, a read-only user builds a report but cannot write; the server refuses to
serve other machines without logins unless --insecure."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from harness.errors import ConfigError
from harness.tracking import Tracker
from harness.tracking.server import serve
from tests.servers import harness_cmd, tiny_study, worker_env

ADMIN_PASSWORD = "admin-pw-for-tests-7Hq2"
READER_PASSWORD = "reader-pw-for-tests-3Kd9"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth-server")
    backend = f"sqlite:///{tmp / 'mlflow.db'}"
    with serve(
        backend, tmp / "artifacts", workers=1, log=tmp / "server.log", admin_password=ADMIN_PASSWORD
    ) as url:
        yield url


def as_user(name: str | None, password: str | None = None, **extra: str) -> dict[str, str]:
    env = worker_env()
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HARNESS_NETRC"):
        env.pop(key, None)
    env.update(extra)
    if name:
        env.update(MLFLOW_TRACKING_USERNAME=name, MLFLOW_TRACKING_PASSWORD=password)
    return env


def users(server: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "harness.tracking.users", "--tracking-uri", server, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_no_login_is_refused(server, monkeypatch):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    assert refused.value.code == 401
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.setenv("HARNESS_NETRC", os.devnull + "-missing")
    with pytest.raises(ConfigError, match="no such file"):
        Tracker(server)
    monkeypatch.delenv("HARNESS_NETRC")
    monkeypatch.setenv("HOME", str(os.devnull))  # no ~/.netrc either
    with pytest.raises(
        ConfigError, match=r"refused no login \(401 Unauthorized\); set MLFLOW_TRACKING_USERNAME"
    ):
        Tracker(server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
    with pytest.raises(ConfigError, match="refused the login 'admin'"):
        Tracker(server)


def test_worker_logs_a_trial_and_a_reader_reports_but_cannot_write(server, tmp_path):
    admin = as_user("admin", ADMIN_PASSWORD)
    netrc = tmp_path / "worker.netrc"
    added = users(server, "add", "worker1", "--role", "worker", "--netrc-out", str(netrc), env=admin)
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == f"user worker1 added as worker; its login is in {netrc}"
    assert stat.S_IMODE(netrc.stat().st_mode) == 0o600
    assert netrc.read_text().startswith("machine 127.0.0.1 login worker1 password ")
    reader = users(
        server, "add", "reader1", "--role", "reader", env={**admin, "HARNESS_USER_PASSWORD": READER_PASSWORD}
    )
    assert reader.returncode == 0, reader.stderr
    again = users(
        server, "add", "reader1", "--role", "reader", env={**admin, "HARNESS_USER_PASSWORD": "x" * 16}
    )
    assert (
        again.returncode == 1
        and again.stderr.strip()
        == "error: user reader1 exists already; remove it first or choose another name"
    )

    # the worker logs in through its netrc file only (no password in its environment or command line)
    study = tiny_study(tmp_path, "authed", trials=1, epochs=2)
    journal = str(tmp_path / "journal.log")
    sweep = harness_cmd(
        "sweep", "--study", str(study), "--storage", journal, "--tracking-uri", server, "--quiet"
    )
    done = subprocess.run(
        sweep,
        cwd=tmp_path,
        env=as_user(None, HARNESS_NETRC=str(netrc)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
    try:
        client = MlflowClient(server)
        exp = client.get_experiment_by_name("authed").experiment_id
        runs = {r.data.tags["role"]: r for r in client.search_runs([exp])}
        assert {role: r.info.status for role, r in runs.items()} == {
            "study": "FINISHED",
            "trial": "FINISHED",
            "seed": "FINISHED",
        }
        seed = runs["seed"]
        assert [m.step for m in client.get_metric_history(seed.info.run_id, "train/loss")] == [0, 1]
        assert {"model.pt", "config.yaml"} <= {a.path for a in client.list_artifacts(seed.info.run_id)}
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")

    as_reader = as_user("reader1", READER_PASSWORD)
    report = [
        sys.executable,
        "-m",
        "harness.report",
        "--study",
        "authed",
        "--out",
        str(tmp_path / "reports"),
        "--tracking-uri",
        server,
        "--no-plots",
        "--no-log",
    ]
    built = subprocess.run(report, cwd=tmp_path, env=as_reader, capture_output=True, text=True, timeout=180)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert list((tmp_path / "reports").rglob("*.md"))

    # the reader may not write into the study's experiment: one line, exit 2, nothing logged
    train = harness_cmd(
        "train",
        "--config",
        str(tmp_path / "experiments" / "authed.yaml"),
        "--experiment",
        "authed",
        "--tracking-uri",
        server,
        "--quiet",
    )
    refused = subprocess.run(train, cwd=tmp_path, env=as_reader, capture_output=True, text=True, timeout=180)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    (line,) = refused.stderr.strip().splitlines()
    assert "user 'reader1' may not write there (403 Permission denied)" in line
    os.environ.update(MLFLOW_TRACKING_USERNAME="reader1", MLFLOW_TRACKING_PASSWORD=READER_PASSWORD)
    try:
        with pytest.raises(Exception, match="403"):
            MlflowClient(server).log_metric(seed.info.run_id, "sneaky", 1.0)
        assert len(MlflowClient(server).search_runs([exp])) == 3
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")


def test_other_machines_are_refused_without_logins(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
    cmd = [
        sys.executable,
        "-m",
        "harness.tracking.server",
        "--backend",
        f"sqlite:///{tmp_path}/m.db",
        "--host",
        "0.0.0.0",
    ]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: --host 0.0.0.0 serves runs to other machines") and "--insecure" in line
    empty = tmp_path / "pw.txt"
    empty.write_text("\n")
    refused = subprocess.run(
        [*cmd, "--admin-password-file", str(empty)], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "is empty" in refused.stderr and not (tmp_path / "m.db").exists()
