"""Database and tracking URLs without their secrets: a password is split off to travel in the
environment (libpq's ``PGPASSWORD``, MLflow's ``MLFLOW_TRACKING_PASSWORD``), never on a command line
or in a log line, and URLs shown to people are redacted."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit


def split_password(url: str) -> tuple[str, str | None]:
    """``(url without its password, the password)``; ``(url, None)`` when it has none."""
    if "://" not in url or "@" not in url.split("://", 1)[1]:
        return url, None
    parts = urlsplit(url)
    login, host = parts.netloc.rsplit("@", 1)
    if ":" not in login:
        return url, None
    user, password = login.split(":", 1)
    return urlunsplit(parts._replace(netloc=f"{user}@{host}")), unquote(password)


def redact(url: str | None) -> str | None:
    """A URL fit for a log line or a tag: its password, if any, replaced by ``***``."""
    if not url:
        return url
    bare, password = split_password(url)
    if password is None:
        return url
    scheme, rest = bare.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:***@{host}"


def password_env(url: str) -> tuple[str, dict[str, str]]:
    """A PostgreSQL URL without its password, and the environment that hands the password to libpq."""
    bare, password = split_password(url)
    return bare, ({} if password is None else {"PGPASSWORD": password})
