"""``taskrt.current_task()``: what is running, per task (a context variable, so it is right
in threads of the worker's pool and in concurrent ``async def`` tasks alike)."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

__all__ = ["TaskInfo", "current_task"]


@dataclass(frozen=True)
class TaskInfo:
    """The running task, as ``taskrt.current_task()`` returns it."""

    #: The task id (the runtime's, or the eager run's).
    id: str
    #: The registered name.
    name: str
    #: The queue it came from (``None`` in eager mode unless it was given).
    queue: str | None
    #: Index of this attempt: 0 for the first run, 1 for the first retry, ...
    attempt: int
    #: The soft limit's deadline, ``time.monotonic()`` based, if one is set.
    soft_deadline: float | None = None
    #: The trace and parent ids, when the runtime sends them (sub-tasks enqueued from this
    #: task inherit the trace and name this task as their parent).
    trace_id: str | None = None
    root_id: str | None = None
    #: True in eager mode.
    eager: bool = False

    @property
    def retries(self) -> int:
        """Celery's ``self.request.retries``: the same as ``attempt``."""
        return self.attempt

    def enqueue_context(self) -> dict[str, Any]:
        """What an enqueue from inside this task inherits."""
        out: dict[str, Any] = {"parent_id": self.id, "root_id": self.root_id or self.id}
        if self.trace_id:
            out["trace_id"] = self.trace_id
        return out


_current: contextvars.ContextVar[TaskInfo | None] = contextvars.ContextVar(
    "taskrt_current_task", default=None
)


def current_task() -> TaskInfo | None:
    """The task running in this context (``id``, ``name``, ``queue``, ``attempt``), or
    ``None`` outside a task."""
    return _current.get()


def _set(info: TaskInfo | None) -> contextvars.Token[TaskInfo | None]:
    return _current.set(info)


def _reset(token: contextvars.Token[TaskInfo | None]) -> None:
    _current.reset(token)
