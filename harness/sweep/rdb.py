"""Optuna's RDB storage (PostgreSQL) for studies that outlive a database restart.

Two things make a restart harmless to workers that run trials meanwhile:

* ``pool_pre_ping``: SQLAlchemy checks a pooled connection before using it, so the connections the restart
  cut are replaced silently once the server is back;
* every storage call (ask, tell, report, user attrs, trial lists, heartbeats) that finds the server away
  (a refused or lost connection: SQLAlchemy's ``OperationalError`` / ``InterfaceError``) is retried with
  backoff (``tracking/retry.py``: 0.5 s doubling to 5 s) for up to ``HARNESS_STORAGE_RETRY_S`` seconds
  (default 60), then fails with one line, :class:`StorageUnavailable`.

Storage writes are safe to repeat (attributes, params and intermediate values are overwritten), except a
trial's end: if a tell committed just before its connection dropped, its retry finds the trial finished in
the state it asked for and takes that as done. A trial created just before the connection dropped may, in
rare cases, be created twice; the extra one never holds a lease and is failed, uncounted, by lease recovery.
Keep outages shorter than the lease grace (``HARNESS_LEASE_GRACE``, 60 s): past it other workers take the
running trials for dead and queue them again.
"""

from __future__ import annotations

import functools
import random
import time
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from harness.tracking.postgres import sqlalchemy_url
from harness.tracking.retry import ServerUnavailable, causes, limit_from, retried, short
from harness.tracking.urls import redact

RETRY_VARIABLE = "HARNESS_STORAGE_RETRY_S"
DEFAULT_LIMIT = 60.0
# the storage calls a study makes; the rest of RDBStorage (versions, sessions) is left as it is
RETRIED = (
    *(n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")),
    "record_heartbeat",
    "_get_stale_trial_ids",
)
NOT_RETRIED = ("check_trial_is_updatable", "remove_session")


class StorageUnavailable(ServerUnavailable):
    """The Optuna storage's database stayed unreachable past ``HARNESS_STORAGE_RETRY_S``."""


def transient(exc: BaseException) -> bool:
    """A refused or lost database connection (the server restarting), not a bad query."""
    from sqlalchemy import exc as sa

    return any(
        isinstance(e, sa.OperationalError | sa.InterfaceError)
        or (isinstance(e, sa.DBAPIError) and e.connection_invalidated)
        for e in causes(exc)
    )


def failure(url: str, name: str):
    def make(exc: BaseException, waited: float) -> StorageUnavailable:
        limit = limit_from(RETRY_VARIABLE, DEFAULT_LIMIT)
        return StorageUnavailable(
            f"Optuna storage {redact(url)} unreachable for {max(waited, limit):.0f} s ({name}: {short(exc)}); "
            f"the limit is {RETRY_VARIABLE}={limit:.0f}; start the database again, then run the same command"
        )

    return make


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` with pooled connections checked before use and calls retried while the server is away."""

    def __init__(self, url: str, **kwargs: Any):
        super().__init__(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)


def _retrying(name: str, method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        attempts = 0

        def once():
            nonlocal attempts
            attempts += 1
            try:
                return method(self, *args, **kwargs)
            except UpdateFinishedTrialError:
                if name == "set_trial_state_values" and attempts > 1:
                    trial_id, state = args[0], args[1] if len(args) > 1 else kwargs["state"]
                    if optuna.storages.RDBStorage.get_trial(self, trial_id).state == state:
                        return True  # the earlier attempt committed before its connection dropped
                raise

        limit = limit_from(RETRY_VARIABLE, DEFAULT_LIMIT)
        return retried(once, transient, limit, failure(self.url, name))

    return call


for _name in RETRIED:
    if _name not in NOT_RETRIED:
        setattr(RetryingRDBStorage, _name, _retrying(_name, getattr(optuna.storages.RDBStorage, _name)))


def open_rdb(url: str, **kwargs: Any) -> RetryingRDBStorage:
    """The storage at ``url`` (``postgresql://...`` as users write it), waiting for a database that is
    restarting; workers started together that race to create a fresh schema try again."""
    full = sqlalchemy_url(url)
    limit = limit_from(RETRY_VARIABLE, DEFAULT_LIMIT)
    for attempt in range(5):
        try:
            return retried(
                lambda: RetryingRDBStorage(full, **kwargs), transient, limit, failure(full, "connect")
            )
        except StorageUnavailable:
            raise
        except Exception as exc:
            if attempt == 4 or "IntegrityError" not in type(exc).__name__ + repr(exc.__cause__):
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")
