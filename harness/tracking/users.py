"""Users of an authenticated tracking server (``make server`` with logins), managed by its admin.

    python -m harness.tracking.users --tracking-uri http://host:5000 add alice --role worker --netrc-out alice.netrc
    python -m harness.tracking.users --tracking-uri http://host:5000 add bob --role reader --password-file pw.txt
    python -m harness.tracking.users --tracking-uri http://host:5000 remove alice

The admin logs in like any client: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or ~/.netrc.
A ``worker`` may create experiments and write every run (role ``harness-workers``: EDIT on all
experiments); a ``reader`` may read every run (the server's default permission) and write none (MLflow
still lets any user create an empty experiment of their own). A new user's password comes from
``--password-file`` or $HARNESS_USER_PASSWORD; without either one is generated and written, with the login,
to ``--netrc-out`` (mode 0600): the file to copy to the worker machine as ~/.netrc. Passwords are never
printed."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

from harness.errors import ConfigError, HarnessError
from harness.tracking.auth import WORKER_ROLE
from harness.tracking.credentials import explained, use_login

WORKSPACE = "default"


def _client(uri: str):
    import warnings

    warnings.filterwarnings("ignore", message="starlette")  # its deprecation, on importing mlflow.server
    from mlflow.server.auth.client import AuthServiceClient

    use_login(uri)
    if not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        raise ConfigError(
            "no admin login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.netrc)"
        )
    return AuthServiceClient(uri)


def worker_role(client) -> int:
    """The id of the role that lets workers write every experiment, created on first use."""
    for role in client.list_roles(WORKSPACE):
        if role.name == WORKER_ROLE:
            return role.id
    role = client.create_role(WORKSPACE, WORKER_ROLE, "kd-harness workers: log trials to every experiment")
    client.add_role_permission(role.id, "experiment", "*", "EDIT")
    return role.id


def new_password(args) -> str:
    if args.password_file:
        lines = (
            Path(args.password_file).read_text().splitlines() if Path(args.password_file).is_file() else []
        )
        if not lines or not lines[0].strip():
            raise ConfigError(f"--password-file {args.password_file}: missing or empty")
        return lines[0].strip()
    if os.environ.get("HARNESS_USER_PASSWORD"):
        return os.environ["HARNESS_USER_PASSWORD"]
    if not args.netrc_out:
        raise ConfigError(
            "no password for the new user: give --password-file FILE, set HARNESS_USER_PASSWORD, or "
            "--netrc-out FILE to have one generated and written there"
        )
    return secrets.token_urlsafe(18)


def write_netrc(path: str, uri: str, user: str, password: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"machine {urlsplit(uri).hostname} login {user} password {password}\n")


def add(args) -> str:
    client = _client(args.tracking_uri)
    password = new_password(args)
    client.create_user(args.name, password)
    if args.role == "worker":
        client.assign_role(args.name, worker_role(client))
    if args.netrc_out:
        write_netrc(args.netrc_out, args.tracking_uri, args.name, password)
    where = f"; its login is in {args.netrc_out}" if args.netrc_out else ""
    return f"user {args.name} added as {args.role}{where}"


def remove(args) -> str:
    _client(args.tracking_uri).delete_user(args.name)
    return f"user {args.name} removed"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m harness.tracking.users",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="the server")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="create a user")
    a.add_argument("name")
    a.add_argument("--role", choices=("worker", "reader"), required=True)
    a.add_argument("--password-file", help="file whose first line is the new user's password")
    a.add_argument("--netrc-out", help="write the login as a netrc line to this file (mode 0600)")
    a.set_defaults(func=add)
    r = sub.add_parser("remove", help="delete a user")
    r.add_argument("name")
    r.set_defaults(func=remove)
    args = p.parse_args(argv)
    try:
        if not args.tracking_uri or not args.tracking_uri.startswith(("http://", "https://")):
            raise ConfigError("--tracking-uri: give the server's http(s) URL, e.g. http://host:5000")
        with explained(args.tracking_uri):
            print(args.func(args))
        return 0
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # the server's answer, e.g. a user that exists already
        text = str(exc)
        if "already exists" in text:
            text = f"user {args.name} exists already; remove it first or choose another name"
        print(f"error: {text.splitlines()[0][:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
