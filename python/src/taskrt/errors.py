"""Exceptions of taskrt.

Two families:

* raised *by task code* to steer the outcome of an attempt: :class:`Retry`,
  :class:`Permanent`, and :class:`SoftTimeLimitExceeded` (raised *into* task code at the
  soft time limit);
* raised *to callers* of the client, ``.delay()`` and ``.get()``: :class:`TaskrtError` and
  its subclasses.

No exception here ever carries the admin token: messages name URLs without their userinfo
and query string.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

__all__ = [
    "ApiError",
    "EncodeError",
    "NotFound",
    "NotRegistered",
    "Permanent",
    "ResultTimeout",
    "Retry",
    "SoftTimeLimitExceeded",
    "TaskFailed",
    "TaskrtError",
    "Unreachable",
]


# ---- raised by (or into) task code --------------------------------------------------------


class Retry(Exception):
    """Raise in a task to have this attempt retried.

    ``after`` (seconds, or a :class:`datetime.timedelta`) asks for at least that delay before
    the next attempt; ``None`` leaves the delay to the runtime's backoff. Retries count
    against ``max_retries``. Raised inside an ``except`` block, the error it reports names
    the exception being handled unless ``reason`` is given::

        try:
            send(msg)
        except ConnectionError:
            raise Retry(after=30)
    """

    def __init__(self, after: float | _dt.timedelta | None = None, reason: str = "") -> None:
        if isinstance(after, _dt.timedelta):
            seconds: float | None = after.total_seconds()
        elif after is None:
            seconds = None
        elif isinstance(after, bool) or not isinstance(after, (int, float)):
            raise TypeError(
                f"Retry(after=...): expected seconds or a timedelta, got {type(after).__name__}"
            )
        else:
            seconds = float(after)
        if seconds is not None and not (seconds >= 0 and seconds != float("inf")):
            raise ValueError(f"Retry(after=...): expected a finite delay >= 0, got {seconds!r}")
        self.after: float | None = seconds
        self.reason: str = reason
        super().__init__(reason or (f"retry in {seconds:g}s" if seconds is not None else "retry"))


class Permanent(Exception):
    """Raise in a task to fail it for good: no retry, its ``link_error`` callbacks run."""


class SoftTimeLimitExceeded(Exception):
    """Raised into a running task when its soft time limit passes.

    A sync task (concurrency 1, or eager mode with ``enforce_limits=True``) sees it wherever
    it is executing; an ``async def`` task sees :class:`asyncio.CancelledError` at its next
    ``await`` and the attempt is reported as this. Catch it to clean up; the hard limit
    follows.
    """


# ---- raised to callers ----------------------------------------------------------------------


class TaskrtError(Exception):
    """Base class of the errors the client, ``.delay()`` and ``.get()`` raise."""


class EncodeError(TaskrtError, TypeError):
    """A value cannot travel as JSON (``args``, ``kwargs``, a callback's arguments).

    The message names the place: ``args[0]: a set is not JSON-serialisable``.
    """


class NotRegistered(TaskrtError, KeyError):
    """No task of that name is registered in this process."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ApiError(TaskrtError):
    """The node answered with an error (4xx/5xx), or with something that is not the answer
    the API documents (``status`` is then the HTTP status it sent)."""

    def __init__(self, status: int, message: str) -> None:
        self.status: int = status
        self.message: str = message
        super().__init__(f"HTTP {status}: {message}")


class NotFound(ApiError):
    """404: no such task (unknown id, or ended more than ``broker.result_ttl`` ago)."""


class Unreachable(TaskrtError, ConnectionError):
    """Nothing answered at the node's URL (connection refused, DNS, or a timeout)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url: str = url
        self.reason: str = reason
        super().__init__(f"cannot reach the node at {url}: {reason}")


class ResultTimeout(TaskrtError, TimeoutError):
    """The task had not ended (succeeded or dead) when the wait ran out.

    Also a builtin :class:`TimeoutError`, and exported as ``taskrt.TimeoutError`` like
    Celery's ``celery.exceptions.TimeoutError``.
    """

    def __init__(self, id: str, state: str, timeout: float | None) -> None:
        self.id: str = id
        self.state: str = state
        self.timeout: float | None = timeout
        if timeout is None:
            text = f"task {id} has not ended (state: {state}); pass timeout= to wait for it"
        else:
            text = f"task {id} did not end within {timeout:g}s (state: {state})"
        super().__init__(text)


class TaskFailed(TaskrtError):
    """The task failed for good (``dead``: permanent error, retries exhausted, expired,
    revoked, ...). ``error`` is the runtime's reason; in eager mode ``__cause__`` is the
    exception the task raised."""

    def __init__(self, id: str, error: str | None, state: str = "dead", record: Any = None) -> None:
        self.id: str = id
        self.error: str | None = error
        self.state: str = state
        #: The :class:`taskrt.TaskRecord` (client) or :class:`taskrt.EagerResult` (eager).
        self.record: Any = record
        super().__init__(f"task {id} failed ({state}): {error or 'no error recorded'}")
