"""A PostgreSQL server of our own, from Debian's binaries: throwaway ones for tests, a persistent one for
``make server`` on a single machine.

It listens on 127.0.0.1 only, with password-less (trust) logins for the user ``harness``, so it is meant
for one machine. For several machines, point workers at a real PostgreSQL (see docs/scale-out.md).

    python -m harness.tracking.postgres --dir mlruns/postgres --port 5433   # foreground; Ctrl-C stops it

PostgreSQL refuses to run as root; as root its binaries are run as the ``postgres`` user (created by
Debian's package) through ``runuser``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from harness.errors import HarnessError

USER = "harness"
INSTALL_HINT = (
    "install it with: apt-get install -y postgresql "
    "(or set PG_BINDIR to the folder holding initdb and pg_ctl)"
)


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` as users write it, with the driver we install named: SQLAlchemy 2.1 (used by
    Optuna and MLflow) otherwise looks for psycopg 3, and our environment has psycopg2."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                return "postgresql+psycopg2://" + url.removeprefix(scheme)
    return url


def find_bindir() -> Path | None:
    """The folder with initdb and pg_ctl: $PG_BINDIR, the newest /usr/lib/postgresql/<ver>/bin, or $PATH."""
    candidates = [Path(os.environ["PG_BINDIR"])] if os.environ.get("PG_BINDIR") else []

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file() and (c / "postgres").is_file():
            return c
    return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix and account to run PostgreSQL's binaries as: ourselves, or 'postgres' as root."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], account
        return ["su", name, "-s", "/bin/sh", "-c", '"$0" "$@"'], account
    raise HarnessError(
        "PostgreSQL refuses to run as root and there is no 'postgres' user; "
        "create one (adduser --system postgres)"
    )


class PostgresServer:
    """One PostgreSQL cluster in ``datadir``, listening on ``host:port``."""

    def __init__(
        self,
        datadir: str | Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        durable: bool = True,
        password: str | None = None,
    ):
        bindir = find_bindir()
        if bindir is None:
            raise HarnessError(f"PostgreSQL binaries not found; {INSTALL_HINT}")
        self.bindir = bindir
        self.datadir = Path(datadir).resolve()
        self.host = host
        self.port = port or free_port()
        self.durable = durable  # False: fsync off, for throwaway test servers
        self.password = password  # None: trust logins; else TCP logins need it (scram-sha-256)
        self.prefix, self.account = _run_as()

    @property
    def version(self) -> str:
        out = subprocess.run(
            [str(self.bindir / "postgres"), "--version"], capture_output=True, text=True
        ).stdout
        found = re.search(r"\d+(\.\d+)+", out)
        return found.group(0) if found else out.strip()

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@{self.host}:{self.port}/{database}"

    def _cmd(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.prefix, str(self.bindir / name), *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise HarnessError(
                f"{name} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}"
            )
        return proc

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    def init(self) -> None:
        """Create the cluster (once): superuser 'harness', trust logins, UTF-8."""
        if self.initialized():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self.account is not None:
            os.chown(self.datadir, self.account.pw_uid, self.account.pw_gid)
        self.datadir.chmod(0o700)
        auth = ["--auth=trust"]
        if self.password:
            fd, name = tempfile.mkstemp(prefix="harness-pg-pw-")  # mode 0600, removed after initdb
            pwfile = Path(name)
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
            if self.account is not None:
                os.chown(pwfile, self.account.pw_uid, self.account.pw_gid)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            self._cmd(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                USER,
                *auth,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            )
        finally:
            if self.password:
                pwfile.unlink(missing_ok=True)

    def running(self) -> bool:
        return self._cmd("pg_ctl", "-D", str(self.datadir), "status", check=False).returncode == 0

    def start(self, timeout: int = 60) -> None:
        opts = f"-h {self.host} -p {self.port} -k {self.datadir}"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        proc = self._cmd(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.datadir / "server.log"),
            "-w",
            "-t",
            str(timeout),
            "-o",
            opts,
            "start",
            check=False,
        )
        if proc.returncode != 0:
            log = self.datadir / "server.log"
            tail = log.read_text(errors="replace")[-800:] if log.is_file() else proc.stderr
            raise HarnessError(f"PostgreSQL did not start on {self.host}:{self.port}: {tail.strip()}")

    def stop(self) -> None:
        if self.initialized():
            self._cmd("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop", check=False)

    def create_database(self, name: str) -> str:
        """Create ``name`` unless it exists; returns its URL."""
        import psycopg2

        conn = psycopg2.connect(
            host=self.host, port=self.port, user=USER, dbname="postgres", password=self.password
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


@contextlib.contextmanager
def throwaway(
    databases: tuple[str, ...] = ("optuna", "mlflow"), port: int | None = None, password: str | None = None
):
    """A fresh server in a temporary folder on a free loopback port, with ``databases`` created;
    removed afterwards. With ``password``, TCP logins need it."""
    tmp = Path(tempfile.mkdtemp(prefix="harness-pg-"))
    server = PostgresServer(tmp, port=port, durable=False, password=password)
    try:
        server.init()
        server.start()
        for name in databases:
            server.create_database(name)
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def persistent(datadir: str | Path, port: int, databases: tuple[str, ...] = ("optuna", "mlflow")):
    """The server in ``datadir`` (created on first use), started for the block and stopped after it."""
    server = PostgresServer(datadir, port=port)
    server.init()
    if server.running():
        raise HarnessError(
            f"a PostgreSQL server already runs on {server.datadir}; stop it or use another --dir"
        )
    server.start()
    try:
        for name in databases:
            server.create_database(name)
        yield server
    finally:
        server.stop()


def _interrupt(*_) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so servers we started are stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m harness.tracking.postgres",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dir", default="mlruns/postgres", help="data folder (created on first use)")
    p.add_argument("--port", type=int, default=5433)
    p.add_argument("--db", action="append", help="databases to create (default: optuna and mlflow)")
    args = p.parse_args(argv)
    try:
        with persistent(args.dir, args.port, tuple(args.db or ("optuna", "mlflow"))) as server:
            for name in args.db or ("optuna", "mlflow"):
                print(f"{name}: {server.url(name)}", flush=True)
            print(f"PostgreSQL {server.version} in {server.datadir}; Ctrl-C stops it", flush=True)
            signal.signal(signal.SIGTERM, _interrupt)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except HarnessError as exc:
        print(f"error: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
