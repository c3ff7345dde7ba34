"""``mlflow server`` processes: one on a free loopback port for the duration of a block (local
multi-worker sweeps, tests), and ``python -m harness.tracking.server`` behind ``make server`` (scale-out,
docs/scale-out.md).

Secrets never go on the server's command line: the backend URL travels as ``MLFLOW_BACKEND_STORE_URI``
(its password as ``PGPASSWORD``), the admin password as ``MLFLOW_AUTH_ADMIN_PASSWORD`` (``auth.py``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness.errors import ConfigError, HarnessError
from harness.tracking.auth import PASSWORD_HINT, admin_password, auth_environment, is_loopback
from harness.tracking.postgres import free_port, sqlalchemy_url
from harness.tracking.urls import password_env, redact


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
    artifacts: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int | None = None,
    allowed_hosts: str | None = None,
    proxied: bool = True,
    auth: bool = False,
) -> list[str]:
    """``mlflow server`` (its backend comes from ``server_env``) that stores artifacts under ``artifacts``;
    with ``auth``, MLflow's basic-auth app: every request needs a login. ``proxied``: it serves
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
    if auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def server_env(backend: str) -> dict[str, str]:
    """The environment that names the server's backend database (and hands libpq its password)."""
    url, env = password_env(sqlalchemy_url(backend))
    return {"MLFLOW_BACKEND_STORE_URI": url, **env}


@contextlib.contextmanager
def serve(
    backend: str,
    artifacts: str | Path,
    port: int | None = None,
    workers: int = 2,
    log: str | Path | None = None,
    proxied: bool = True,
    admin_password: str | None = None,
):
    """An ``mlflow server`` on a free loopback port for the block; yields its URL. With
    ``admin_password``, the basic-auth app with that password for the user ``admin``."""
    port = port or free_port()
    out = open(log, "ab") if log else subprocess.DEVNULL
    auth = bool(admin_password)
    cmd = server_command(artifacts, port=port, workers=workers, proxied=proxied, auth=auth)
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        env = {**os.environ, **server_env(backend)}
        if auth:
            env.update(stack.enter_context(auth_environment(backend, admin_password)))
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env)
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
    the Optuna storage URL for workers. Bound to another interface than loopback it requires logins (MLflow's
    basic-auth app; admin password from MLFLOW_AUTH_ADMIN_PASSWORD or --admin-password-file) unless
    --insecure; add users with ``python -m harness.tracking.users``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m harness.tracking.server",
        description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--backend",
        default=os.environ.get("BACKEND") or None,
        help="MLflow's database, e.g. postgresql://user@dbhost:5432/mlflow; keep its password out of "
        "the command line: $BACKEND, PGPASSWORD or ~/.pgpass (default: a PostgreSQL of our own)",
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
    p.add_argument(
        "--admin-password-file",
        default=os.environ.get("ADMIN_PASSWORD_FILE") or None,
        help="file whose first line is the admin password (or set MLFLOW_AUTH_ADMIN_PASSWORD); "
        "with either, the server requires logins",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve another interface than loopback without logins (a network you trust)",
    )
    args = p.parse_args(argv)
    try:
        password = admin_password(args.admin_password_file)
        if not is_loopback(args.host) and not password and not args.insecure:
            raise ConfigError(
                f"--host {args.host} serves runs to other machines, and without logins anyone who reaches "
                f"it can read and change them; {PASSWORD_HINT} to require logins, or pass --insecure "
                "on a network you trust"
            )
        return _serve_until_stopped(args, password)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def _serve_until_stopped(args, password: str | None) -> int:
    import signal

    from harness.tracking.postgres import _interrupt, persistent

    def run(backend: str) -> int:
        cmd = server_command(
            args.artifacts, args.host, args.port, args.workers, args.allowed_hosts, auth=bool(password)
        )
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print("mlflow " + " ".join(cmd[3:]) + f"  (backend {redact(backend)})", flush=True)
        with contextlib.ExitStack() as stack:
            env = {**os.environ, **server_env(backend)}
            if password:
                env.update(stack.enter_context(auth_environment(backend, password)))
                print(
                    "logins required (MLflow basic auth); add users with: python -m harness.tracking.users "
                    f"--tracking-uri http://{host}:{args.port} add NAME --role worker|reader",
                    flush=True,
                )
            print(f"tracking server: TRACKING=http://{host}:{args.port}  (Ctrl-C stops it)", flush=True)
            proc = subprocess.Popen(cmd, env=env)
            try:
                return proc.wait()
            except KeyboardInterrupt:
                _stop(proc)
                return 0

    signal.signal(signal.SIGTERM, _interrupt)  # stop PostgreSQL on `kill` as on Ctrl-C
    if args.backend:
        return run(args.backend)
    with persistent(args.pg_dir, args.pg_port) as pg:
        print(f"PostgreSQL {pg.version} on 127.0.0.1:{pg.port}, data in {pg.datadir}", flush=True)
        print(f"Optuna storage for workers: STORAGE={pg.url('optuna')}", flush=True)
        return run(pg.url("mlflow"))


if __name__ == "__main__":
    raise SystemExit(main())
