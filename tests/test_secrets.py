"""Secrets never leak: a sweep of two local workers on a PostgreSQL that needs a password (given in the
storage URL) and an authenticated tracking server (login in the environment) leaves neither password in
the MLflow store, the Optuna storage, the artifacts, the captured output or the server's log, and no
process the harness starts (workers, the mlflow server) carries one on its command line."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import pytest

from harness.tracking.postgres import find_bindir, throwaway
from harness.tracking.server import serve
from tests.servers import harness_cmd, start, stop_all, tiny_study, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
PG_PASSWORD = "pg-" + secrets.token_hex(8)
ADMIN_PASSWORD = "admin-" + secrets.token_hex(8)


def command_lines(exclude: int) -> list[str]:
    """Every process's command line but the test's own sweep command (given the URL as a user would);
    that one must show the password, or ``ps`` would not show whole command lines."""
    out = subprocess.run(["ps", "-wweo", "pid=,args="], capture_output=True, text=True, timeout=30).stdout
    lines = [line.strip() for line in out.splitlines()]
    own = [line for line in lines if line.split(None, 1)[0] == str(exclude) and "<defunct>" not in line]
    assert not own or PG_PASSWORD in own[0]
    return [line for line in lines if line.split(None, 1)[0] != str(exclude)]


def dump(pg, database: str) -> str:
    cmd = [str(pg.bindir / "pg_dump"), "-h", pg.host, "-p", str(pg.port), "-U", "harness", database]
    env = {**worker_env(), "PGPASSWORD": PG_PASSWORD}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True).stdout


def test_no_password_in_stores_artifacts_output_or_command_lines(tmp_path):
    if find_bindir() is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    with throwaway(password=PG_PASSWORD) as pg:
        url = f"postgresql://harness:{PG_PASSWORD}@{pg.host}:{pg.port}"
        artifacts, log = tmp_path / "artifacts", tmp_path / "server.log"
        with serve(f"{url}/mlflow", artifacts, workers=1, log=log, admin_password=ADMIN_PASSWORD) as server:
            study = tiny_study(tmp_path, "secret", trials=2, epochs=1)
            cmd = harness_cmd(
                "sweep", "--study", str(study), "--storage", f"{url}/optuna", "--tracking-uri", server,
                "--workers", "2", "--quiet",
            )  # fmt: skip
            env = worker_env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
            sweep = start(cmd, tmp_path, env)
            seen, lines = 0, []
            try:
                deadline = time.time() + 300
                while sweep.poll() is None and time.time() < deadline:
                    found = command_lines(exclude=sweep.pid)
                    seen = max(seen, sum(" worker --study" in line for line in found))
                    lines += [line for line in found if PG_PASSWORD in line or ADMIN_PASSWORD in line]
                    time.sleep(0.5)
                output, _ = sweep.communicate(timeout=max(1, deadline - time.time()))
            finally:
                stop_all([sweep])
        assert sweep.returncode == 0, output[-3000:]
        assert seen == 2, "the two worker processes were not seen running"
        assert lines == [], "a password on a command line"
        stores = {"mlflow": dump(pg, "mlflow"), "optuna": dump(pg, "optuna")}
    assert "COPY public.runs" in stores["mlflow"] and "trial_values" in stores["optuna"]
    assert f"harness:***@{pg.host}:{pg.port}/optuna" in stores["mlflow"]  # the storage tag, redacted
    files = {str(p): p.read_bytes().decode(errors="replace") for p in artifacts.rglob("*") if p.is_file()}
    assert any(name.endswith("model.pt") for name in files) and any(n.endswith("config.yaml") for n in files)
    texts = {**stores, **files, "sweep output": output, "server log": Path(log).read_text()}
    for secret in (PG_PASSWORD, ADMIN_PASSWORD):
        leaked = [where for where, text in texts.items() if secret in text]
        assert leaked == [], f"a password is in {leaked}"


def test_worker_processes_get_the_storage_password_by_environment():
    from harness.sweep.workers import child_storage
    from harness.tracking.urls import redact

    assert child_storage("postgresql://u:p%40ss@h:5432/optuna") == (
        "postgresql://u@h:5432/optuna",
        {"PGPASSWORD": "p@ss"},
    )
    assert child_storage("postgresql://u@h/optuna") == ("postgresql://u@h/optuna", {})
    assert child_storage("mlruns/optuna/journal.log") == ("mlruns/optuna/journal.log", {})
    assert child_storage(None) == (None, {})
    assert redact("postgresql+psycopg2://u:secret@h:1/db") == "postgresql+psycopg2://u:***@h:1/db"
