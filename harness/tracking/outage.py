"""A tracking server that goes away for a while: every call of the Tracker's MLflow client is retried
(``retry.py``) until it answers again, for up to ``HARNESS_TRACKING_RETRY_S`` seconds (default 120).

Past the limit the call raises :class:`TrackingUnavailable` (one line: the server, how long, why); from then
on each call tries once and fails at once, so a run that cannot log stops quickly instead of waiting the
limit again for every call, until a call succeeds. The sweep fails the running trial once and queues its
parameters again (``sweep/trial.py``).

Retried: refused or reset connections, timeouts, and answers 408, 429, 500, 502, 503, 504 (a server whose
database restarts answers 500 meanwhile). Not retried: refused logins (401, 403), bad requests, anything
raised before a request was sent. MLflow's own per-request retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
7 with exponential backoff: minutes) are set to 0 unless the environment sets them, so this limit is the
one that holds; a request that hangs still waits up to ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (120 s) itself.
"""

from __future__ import annotations

import functools
import os
import re

from harness.tracking.retry import ServerUnavailable, limit_from, retried, short
from harness.tracking.urls import redact

RETRY_VARIABLE = "HARNESS_TRACKING_RETRY_S"
DEFAULT_LIMIT = 120.0
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})
# how MLflow's REST client words a request that got no usable answer
NO_ANSWER = re.compile(r"^API request to \S+ failed with (exception|timeout exception|error code (\d+))")


class TrackingUnavailable(ServerUnavailable):
    """The tracking server stayed unreachable past ``HARNESS_TRACKING_RETRY_S``."""


def transient(exc: BaseException) -> bool:
    """Whether an error from MLflow's client means the server is away (worth retrying)."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    if isinstance(exc, requests.exceptions.HTTPError):  # artifact uploads and downloads
        return exc.response is not None and exc.response.status_code in TRANSIENT_STATUS
    if isinstance(exc, RestException):  # the server answered with an MLflow error
        return exc.error_code in TRANSIENT_CODES
    if isinstance(exc, MlflowException):
        found = NO_ANSWER.match(str(exc))
        return bool(found) and (found.group(2) is None or int(found.group(2)) in TRANSIENT_STATUS)
    return False


class RetryingClient:
    """An ``MlflowClient`` whose every method is retried while the server is away."""

    def __init__(self, client, uri: str, limit: float | None = None):
        self._client, self._uri = client, uri
        self.limit = limit_from(RETRY_VARIABLE, DEFAULT_LIMIT) if limit is None else limit
        self.gave_up = False  # the limit passed once: try each call once until one succeeds

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            limit = 0.0 if self.gave_up else self.limit
            result = retried(lambda: attr(*args, **kwargs), transient, limit, self._failure(name))
            self.gave_up = False
            return result

        return call

    def _failure(self, name: str):
        def failure(exc: BaseException, waited: float) -> TrackingUnavailable:
            self.gave_up = True
            return TrackingUnavailable(
                f"tracking server {redact(self._uri)} unreachable for {max(waited, self.limit):.0f} s "
                f"({name}: {short(exc)}); the limit is {RETRY_VARIABLE}={self.limit:.0f}; start the server "
                "again, then run the same command"
            )

        return failure


def retrying_client(client, uri: str):
    """The client as it is for a local store; for an http(s) tracking server, a :class:`RetryingClient`."""
    if not uri.startswith(("http://", "https://")):
        return client
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return RetryingClient(client, uri)
