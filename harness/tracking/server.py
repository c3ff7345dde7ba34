"""``mlflow server`` processes: one on a free loopback port for the duration of a block (local
multi-worker sweeps, tests), and ``python -m harness.tracking.server`` behind ``make server`` (scale-out,
docs/scale-out.md)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness.errors import HarnessError
from harness.tracking.postgres import free_port, sqlalchemy_url


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"mlflow server exited with code {proc.returncode}; run it by hand to see why")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise HarnessError(f"mlflow server at {url} not healthy after {timeout:.0f} s")


def server_command(
    backend: str,
    artifacts: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int | None = None,
    allowed_hosts: str | None = None,
    proxied: bool = True,
) -> list[str]:
    """``mlflow server`` over ``backend`` that stores artifacts under ``artifacts``. ``proxied``: it serves
    them to clients (``--serve-artifacts``), so workers on other machines upload and download through the
    server and only the server needs the artifact folder (a local disk, a shared file system or an object
    store URI); otherwise clients on this machine write to the folder themselves."""
    destination = str(artifacts) if "://" in str(artifacts) else Path(artifacts).resolve().as_uri()
    where = ["--artifacts-destination", destination, "--serve-artifacts"]
    if not proxied:
        where = ["--default-artifact-root", destination]
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        sqlalchemy_url(backend),
        *where,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if workers:
        cmd += ["--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


@contextlib.contextmanager
def serve(
    backend: str,
    artifacts: str | Path,
    port: int | None = None,
    workers: int = 2,
    log: str | Path | None = None,
    proxied: bool = True,
):
    """An ``mlflow server`` on a free loopback port for the block; yields its URL."""
    port = port or free_port()
    out = open(log, "ab") if log else subprocess.DEVNULL
    cmd = server_command(backend, artifacts, port=port, workers=workers, proxied=proxied)
    proc = subprocess.Popen(cmd, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=180)  # schema migrations on a fresh database, on a busy machine
        yield url
    finally:
        _stop(proc)
        if log:
            out.close()


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def local_server(backend_uri: str):
    """Yields a tracking URI. A SQLite store gets a server in front of it; other URIs are used as they are."""
    if not backend_uri.startswith("sqlite:///"):
        yield backend_uri
        return
    artifacts = Path(backend_uri.removeprefix("sqlite:///")).resolve().parent / "artifacts"
    with serve(backend_uri, artifacts, proxied=False) as url:
        yield url


def main(argv: list[str] | None = None) -> int:
    """``make server``: an MLflow tracking server for workers on this and other machines.

    With ``--backend`` it runs ``mlflow server`` over that database. Without, it first starts a PostgreSQL of
    its own (data in ``--pg-dir``, on 127.0.0.1 only) with databases ``mlflow`` and ``optuna``, and prints
    the Optuna storage URL for workers."""
    import argparse
    import os

    p = argparse.ArgumentParser(
        prog="python -m harness.tracking.server",
        description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--backend",
        default=os.environ.get("BACKEND") or None,
        help=(
            "MLflow's database, e.g. postgresql://user:pw@dbhost:5432/mlflow "
            "(default: a PostgreSQL of our own)"
        ),
    )
    p.add_argument(
        "--artifacts", default="mlruns/server-artifacts", help="artifact folder or URI, served to clients"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=None, help="server processes (mlflow's default: 4)")
    p.add_argument(
        "--allowed-hosts", default=None, help="Host headers to accept beyond localhost and private IPs"
    )
    p.add_argument(
        "--pg-dir", default="mlruns/postgres", help="data folder of our own PostgreSQL (no --backend)"
    )
    p.add_argument(
        "--pg-port", type=int, default=5433, help="port of our own PostgreSQL, on 127.0.0.1 (no --backend)"
    )
    args = p.parse_args(argv)

    def run(backend: str) -> int:
        cmd = server_command(backend, args.artifacts, args.host, args.port, args.workers, args.allowed_hosts)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print("mlflow " + " ".join(cmd[3:]), flush=True)
        print(f"tracking server: TRACKING=http://{host}:{args.port}  (Ctrl-C stops it)", flush=True)
        proc = subprocess.Popen(cmd)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            return 0

    import signal

    from harness.tracking.postgres import _interrupt, persistent

    signal.signal(signal.SIGTERM, _interrupt)  # stop PostgreSQL on `kill` as on Ctrl-C
    try:
        if args.backend:
            return run(args.backend)

        with persistent(args.pg_dir, args.pg_port) as pg:
            print(f"PostgreSQL {pg.version} on 127.0.0.1:{pg.port}, data in {pg.datadir}", flush=True)
            print(f"Optuna storage for workers: STORAGE={pg.url('optuna')}", flush=True)
            return run(pg.url("mlflow"))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
