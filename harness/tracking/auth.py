"""Logins for the tracking server: the settings ``mlflow server --app-name basic-auth`` reads.

MLflow's basic-auth app keeps its users in a store of its own; ours is the tracking server's backend
database (its tables have their own migration history, ``alembic_version_auth``). The admin password
comes from ``MLFLOW_AUTH_ADMIN_PASSWORD`` or a file, and reaches the server through its environment:
never its command line, never a log line. The configuration file MLflow wants is written to a private
temporary folder and holds no secret (a database password travels as ``PGPASSWORD``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from harness.errors import ConfigError
from harness.tracking.postgres import sqlalchemy_url
from harness.tracking.urls import password_env

ADMIN = "admin"
WORKER_ROLE = "harness-workers"  # EDIT on every experiment: what workers need to log trials
AUTH_CACHE_SECONDS = 60  # a checked login is trusted this long per server process (password hashing is slow)
PASSWORD_HINT = "set MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more) or pass --admin-password-file FILE"


def admin_password(password_file: str | None = None) -> str | None:
    """The admin password from ``password_file`` (its first line) or ``MLFLOW_AUTH_ADMIN_PASSWORD``."""
    if password_file:
        path = Path(password_file)
        if not path.is_file():
            raise ConfigError(f"--admin-password-file {password_file}: no such file; {PASSWORD_HINT}")
        lines = path.read_text().splitlines()
        if not lines or not lines[0].strip():
            raise ConfigError(f"--admin-password-file {password_file} is empty; {PASSWORD_HINT}")
        return lines[0].strip()
    return os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or None


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


@contextlib.contextmanager
def auth_environment(backend: str, password: str, username: str | None = None):
    """The environment variables of a basic-auth server over ``backend`` for the block."""
    if len(password) < 12:
        raise ConfigError(f"the admin password is shorter than 12 characters; {PASSWORD_HINT}")
    database, env = password_env(sqlalchemy_url(backend))
    folder = Path(tempfile.mkdtemp(prefix="harness-auth-"))  # mode 0700
    ini = folder / "basic_auth.ini"
    text = "\n".join(
        [
            "[mlflow]",
            "default_permission = READ",
            f"database_uri = {database}",
            f"admin_username = {username or os.environ.get('MLFLOW_AUTH_ADMIN_USERNAME') or ADMIN}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}",
            "",
        ]
    )
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text.replace("%", "%%"))
    env.update(
        {
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            # one key for all of the server's processes: CSRF tokens of the user pages must check in any
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
            or secrets.token_urlsafe(32),
        }
    )
    try:
        yield env
    finally:
        shutil.rmtree(folder, ignore_errors=True)
