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


def _task_info(
    id: str,
    name: str,
    queue: str | None,
    attempt: int,
    soft_deadline: float | None,
    trace_id: str | None,
    root_id: str | None,
    eager: bool = False,
) -> TaskInfo:
    """``TaskInfo(...)`` of these fields, made as the worker makes one per task: without
    the frozen dataclass's ``__init__`` (a ``object.__setattr__`` per field), which costs
    it more than a no-op task's own code. The same object in every respect."""
    info = _new(TaskInfo)
    _setattr(info, "__dict__", {
        "id": id, "name": name, "queue": queue, "attempt": attempt,
        "soft_deadline": soft_deadline, "trace_id": trace_id, "root_id": root_id, "eager": eager,
    })
    return info


_new = object.__new__
_setattr = object.__setattr__

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
