"""Calls to a server that may be away for a while (a restart, a network blip): retried with capped
exponential backoff until a time limit, then one clear error.

Used by the MLflow tracker (every call of its client, ``HARNESS_TRACKING_RETRY_S``, default 120 s) and by the
Optuna RDB storage (``sweep/optuna_study.py``, ``HARNESS_STORAGE_RETRY_S``, default 60 s). What is retried
is decided by the caller's ``transient`` predicate: a refused connection, a timeout, a 5xx answer; never a
refused login or bad input. The waits are 0.5, 1, 2, 4 s, then 5 s, each with up to 25% jitter, so a
server that comes back is noticed within about 5 s.

The calls retried must be safe to repeat: MLflow's ``log_batch`` sends the same metrics (same timestamp,
step, value: the store keeps one row per such metric) and params; tags and run states are overwritten.
A request that reached a server which died before answering may, in rare cases, be applied twice when it
creates something (a run, a trial); that is the price of not losing it.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from harness.errors import HarnessError

T = TypeVar("T")
FIRST_WAIT, MAX_WAIT = 0.5, 5.0


class ServerUnavailable(HarnessError):
    """A server stayed unreachable past its retry limit."""


def limit_from(variable: str, default: float) -> float:
    """Seconds to keep retrying: ``$variable`` if set, else ``default``."""
    value = os.environ.get(variable)
    try:
        return float(value) if value else default
    except ValueError:
        raise HarnessError(f"{variable}={value!r}: give a number of seconds") from None


def waits(first: float = FIRST_WAIT, cap: float = MAX_WAIT):
    """Backoff waits: first, 2 x first, ... capped at ``cap``, each with up to 25% jitter."""
    wait = first
    while True:
        yield wait * (1 + random.random() / 4)
        wait = min(2 * wait, cap)


def retried(
    call: Callable[[], T],
    transient: Callable[[BaseException], bool],
    limit: float,
    failure: Callable[[BaseException, float], ServerUnavailable],
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, retried while it raises a ``transient`` error and ``limit`` seconds have not passed;
    past the limit, ``failure(last error, seconds waited)`` is raised. Other errors pass through at once."""
    start = time.monotonic()
    for wait in waits():
        try:
            return call()
        except Exception as exc:
            waited = time.monotonic() - start
            if not transient(exc):
                raise
            if waited + wait > limit:
                raise failure(exc, waited) from exc
        sleep(wait)
    raise AssertionError("unreachable")


def causes(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during, innermost last."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def short(exc: BaseException, width: int = 160) -> str:
    """The last line of an error's message, shortened, for a one-line report."""
    text = str(exc).strip().splitlines()
    line = text[-1] if text else type(exc).__name__
    return line if len(line) <= width else line[: width - 3] + "..."
