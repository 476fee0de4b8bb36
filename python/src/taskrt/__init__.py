"""taskrt: Python tasks for the actor-supervision task runtime.

* ``@task`` / ``@shared_task`` register a function; ``.delay()`` / ``.apply_async()`` enqueue it
  on a node (or run it here in eager mode); ``.s()`` makes a callback signature.
* ``taskrt.handle(id)`` / ``taskrt.result(id)`` (``ahandle`` / ``aresult``) read a task by
  its id (Celery's ``AsyncResult(id)``) through the default client, or in eager mode.
* :class:`Client` / :class:`AsyncClient` talk to a node's HTTP API.
* ``python -m taskrt.worker`` is the worker process the runtime's Python pool starts.
* ``taskrt.eager()`` and the pytest fixtures ``taskrt_eager`` / ``taskrt_node`` are for tests.

taskrt needs nothing beyond the standard library.
"""

from ._api import Enqueued, Revoked, TaskRecord
from .client import AsyncClient, AsyncTaskHandle, Client, TaskHandle
from .context import TaskInfo, current_task
from ._eager import AsyncEagerResult, EagerResult, EagerSession, eager
from .errors import (
    ApiError,
    EncodeError,
    NotFound,
    NotRegistered,
    Permanent,
    ResultTimeout,
    Retry,
    SoftTimeLimitExceeded,
    TaskFailed,
    TaskrtError,
    Unreachable,
)
from ._signature import Signature, signature
from ._task import (
    Task,
    ahandle,
    aresult,
    configure,
    get_task,
    handle,
    registry,
    result,
    shared_task,
    task,
)

#: Celery's ``celery.exceptions.TimeoutError`` (also a builtin ``TimeoutError``).
TimeoutError = ResultTimeout  # noqa: A001 - the name Celery users catch

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncEagerResult",
    "AsyncTaskHandle",
    "Client",
    "EagerResult",
    "EagerSession",
    "EncodeError",
    "Enqueued",
    "NotFound",
    "NotRegistered",
    "Permanent",
    "ResultTimeout",
    "Retry",
    "Revoked",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskFailed",
    "TaskHandle",
    "TaskInfo",
    "TaskRecord",
    "TaskrtError",
    "TimeoutError",
    "Unreachable",
    "ahandle",
    "aresult",
    "configure",
    "current_task",
    "eager",
    "get_task",
    "handle",
    "registry",
    "result",
    "shared_task",
    "signature",
    "task",
]
