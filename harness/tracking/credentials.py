"""A worker's login to an authenticated tracking server, and one clear line when it is refused.

MLflow's client sends ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` with every request.
When they are not set, the login is read from a netrc-style file (``HARNESS_NETRC``, default
``~/.netrc``): a line ``machine HOST login USER password PASSWORD`` for the server's host. It is put in
this process's environment, so worker processes started from here inherit it (never on a command line).
For https servers with a private CA, ``MLFLOW_TRACKING_SERVER_CERT_PATH`` names the CA file."""

from __future__ import annotations

import contextlib
import netrc
import os
import stat
from pathlib import Path
from urllib.parse import urlsplit

from harness.errors import ConfigError, HarnessError

LOGIN_HINT = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or put a line "
    "'machine HOST login USER password PASSWORD' in ~/.netrc (or the file $HARNESS_NETRC names)"
)


def netrc_path() -> Path:
    return Path(os.environ.get("HARNESS_NETRC") or Path.home() / ".netrc")


def use_login(uri: str) -> None:
    """For an http(s) tracking URI without a login in the environment: the netrc file's, if it has one."""
    if not uri.startswith(("http://", "https://")) or os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return
    path = netrc_path()
    if not path.is_file():
        if os.environ.get("HARNESS_NETRC"):
            raise ConfigError(f"HARNESS_NETRC={path}: no such file; {LOGIN_HINT}")
        return
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} is readable by other users; protect it with: chmod 600 {path}")
    try:
        found = netrc.netrc(str(path)).authenticators(urlsplit(uri).hostname or "")
    except netrc.NetrcParseError as exc:
        raise ConfigError(f"{path}: {exc.msg} (line {exc.lineno}); {LOGIN_HINT}") from None
    if found and found[0] and found[2]:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = found[0], found[2]


def refusal(exc: Exception, uri: str) -> HarnessError | None:
    """The one line for a request the server refused for its login (401) or permissions (403)."""
    code = getattr(exc, "get_http_status_code", lambda: None)()
    text = str(exc)
    who = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == 401 or "error code 401" in text:
        login = f"the login '{who}'" if who else "no login"
        return ConfigError(f"tracking server {uri} refused {login} (401 Unauthorized); {LOGIN_HINT}")
    if code == 403 or "error code 403" in text:
        return ConfigError(
            f"tracking server {uri}: user '{who}' may not write there (403 Permission denied); give it "
            "the worker role: python -m harness.tracking.users add USER --role worker"
        )
    return None


@contextlib.contextmanager
def explained(uri: str):
    """Turns a refused login or permission inside the block into a one-line error."""
    try:
        yield
    except Exception as exc:
        found = refusal(exc, uri)
        if found is None:
            raise
        raise found from None


def check_login(client, uri: str) -> None:
    """One cheap request to an http(s) server, so a missing or wrong login stops here in one line."""
    if uri.startswith(("http://", "https://")):
        with explained(uri):
            client.search_experiments(max_results=1)
