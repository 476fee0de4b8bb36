"""``taskrt.Client`` and ``taskrt.AsyncClient``: enqueue tasks, read their records and
results, revoke them, over the runtime's HTTP API.

The two have the same methods (only ``await`` differs). Requests are built and answers
checked by :mod:`taskrt._api`; this module only moves bytes, both clients through
:mod:`taskrt._http` (the standard library's ``http.client``): the asyncio client runs each
request on a small pool of threads of its own, so the event loop never blocks on the network.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import http.client
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from . import _api
from ._api import Enqueued, Request, Revoked, TaskRecord
from .errors import ApiError, ResultTimeout, TaskFailed, Unreachable

if TYPE_CHECKING:
    import concurrent.futures

    from ._http import Connections

__all__ = ["AsyncClient", "AsyncTaskHandle", "Client", "TaskHandle"]

_USER_AGENT = "taskrt-python/0.1"
#: Requests an :class:`AsyncClient` has on the wire at once (more wait for a thread).
MAX_THREADS = 16


def _env_args(base_url: str | None, token: str | None, from_env: bool) -> tuple[str, str | None]:
    import os

    url = base_url or os.environ.get("TASKRT_URL") or _api.DEFAULT_URL
    if token is None and from_env:
        token = os.environ.get("TASKRT_TOKEN")
    return _api.check_base_url(url), _api.check_token(token)


def _headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
    return float(timeout)


def _unreachable(url: str, exc: Exception, timed_out: bool) -> Unreachable:
    reason = str(exc) or type(exc).__name__
    if timed_out:
        reason = f"timed out ({type(exc).__name__}: {reason})"
    return Unreachable(url, reason)


def _items(
    tasks: Iterable[Any], context: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    from ._signature import Signature

    items = []
    for n, entry in enumerate(tasks):
        where = f"[{n}]"
        if isinstance(entry, Mapping):
            entry = dict(entry)
            if "task" not in entry:
                raise TypeError(f"{where}: a mapping needs `task` (and enqueue's keywords)")
            target = entry.pop("task")
            args = entry.pop("args", None)
            kwargs = entry.pop("kwargs", None)
            items.append(_api.enqueue_item(target, args, kwargs, entry, where, context))
        elif isinstance(entry, Signature) or isinstance(entry, str) or hasattr(entry, "_taskrt_defaults"):
            items.append(_api.enqueue_item(entry, None, None, {}, where, context))
        else:
            raise TypeError(
                f"{where}: expected a Signature, a task, a name or a mapping of enqueue's "
                f"keywords, got {type(entry).__name__}"
            )
    return items


def _context() -> dict[str, Any] | None:
    from .context import current_task

    info = current_task()
    return info.enqueue_context() if info is not None and not info.eager else None


def _outcome(record: TaskRecord) -> Any:
    if record.state == "succeeded":
        return record.result
    if record.state == "dead":
        raise TaskFailed(record.id, record.error, record.state, record)
    return _PENDING


_PENDING = object()


class _Base:
    """What both clients share: settings, URL, the request/answer plumbing."""

    def __init__(
        self,
        base_url: str | None,
        token: str | None,
        timeout: float,
        max_response_bytes: int,
    ) -> None:
        self.base_url, self._token = _env_args(base_url, token, from_env=True)
        self.timeout = _check_timeout(timeout)
        if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int) or max_response_bytes < 1024:
            raise ValueError("max_response_bytes: expected an integer >= 1024")
        self.max_response_bytes = max_response_bytes
        self._shown_url = _api.redact_url(self.base_url)
        from ._http import Connections

        self._http: Connections = Connections(self.base_url, self.timeout, _headers(self._token))

    def _exchange(self, request: Request) -> Any:
        """Sends ``request`` and decodes its answer (blocking)."""
        from ._http import TooLarge

        try:
            status, body = self._http.request(
                request.method, request.path, request.body, self.max_response_bytes
            )
        except TooLarge as exc:
            raise self._too_large(request, exc.status) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _unreachable(self._shown_url, exc, isinstance(exc, TimeoutError)) from None
        return _api.decode(status, body, request.what)

    def _too_large(self, request: Request, status: int) -> ApiError:
        return ApiError(
            status,
            f"the answer to {request.what} is over {self.max_response_bytes} bytes "
            "(max_response_bytes); not read",
        )

    def __repr__(self) -> str:
        token = "<set>" if self._token else None
        return f"{type(self).__name__}(base_url={self._shown_url!r}, token={token}, timeout={self.timeout:g})"


class Client(_Base):
    """A blocking client of a runtime node.

    ``Client(base_url=None, token=None, timeout=10.0)``: ``base_url`` defaults to env
    ``TASKRT_URL``, else ``http://127.0.0.1:7070``; ``token`` (the admin token, sent as
    ``Authorization: Bearer``) to env ``TASKRT_TOKEN``. ``timeout`` (seconds) bounds the
    connect and each read. One client may be shared by threads (it keeps a few keep-alive
    connections). Use it as a context manager, or ``close()`` it.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        *,
        max_response_bytes: int = _api.MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(base_url, token, timeout, max_response_bytes)

    # ---- plumbing -------------------------------------------------------------------------

    def _send(self, request: Request) -> Any:
        return self._exchange(request)

    # ---- API ------------------------------------------------------------------------------

    def enqueue(
        self,
        task: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | _dt.timedelta | None = None,
        eta: _dt.datetime | str | None = None,
        expires: _dt.datetime | float | _dt.timedelta | str | None = None,
        idempotency_key: str | None = None,
        id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        time_limit: float | _dt.timedelta | None = None,
        soft_time_limit: float | _dt.timedelta | None = None,
        trace_id: str | None = None,
    ) -> TaskHandle:
        """Enqueue one task (``POST /tasks``). ``task``: a name, a ``@task`` function or a
        :class:`Signature`. Times and limits in seconds (or timedelta/datetime); see
        ``Task.apply_async`` for each option."""
        options = dict(
            queue=queue, countdown=countdown, eta=eta, expires=expires,
            idempotency_key=idempotency_key, id=id, link=link, link_error=link_error,
            time_limit=time_limit, soft_time_limit=soft_time_limit, trace_id=trace_id,
        )
        item = _api.enqueue_item(task, args, kwargs, options, "", _context())
        request = _api.enqueue_request([item], batch=False)
        (answer,) = _api.parse_enqueued(self._send(request), 1, batch=False)
        return TaskHandle(self, answer, item["task"])

    def enqueue_many(self, tasks: Iterable[Any]) -> list[TaskHandle]:
        """Enqueue a batch in one ``POST /tasks`` (all or nothing). Each item is a
        :class:`Signature` (``add.s(1, 2).set(countdown=5)``), a task or name, or a mapping
        of ``enqueue``'s keywords with ``task`` (``{"task": "add", "args": [1, 2]}``)."""
        items = _items(tasks, _context())
        request = _api.enqueue_request(items, batch=True)
        answers = _api.parse_enqueued(self._send(request), len(items), batch=True)
        return [TaskHandle(self, a, item["task"]) for a, item in zip(answers, items)]

    def status(self, id: str) -> TaskRecord:
        """The task's record (``GET /tasks/{id}``); :class:`NotFound` for an unknown id."""
        request = _api.record_request(id)
        return _api.parse_record(self._send(request), request.what)

    def result(self, id: str, timeout: float | None = None) -> Any:
        """The task's result once it succeeded. ``timeout=None`` reads once; else it reads
        again (every 10 ms, backing off to 250 ms) for up to ``timeout`` seconds. A dead task
        raises :class:`TaskFailed`; one not ended in time :class:`ResultTimeout`."""
        waits = _api.backoff(timeout)
        while True:
            record = self.status(id)
            value = _outcome(record)
            if value is not _PENDING:
                return value
            pause = next(waits, None)
            if pause is None:
                raise ResultTimeout(id, record.state, timeout)
            time.sleep(pause)

    def revoke(self, id: str, terminate: bool = False) -> Revoked:
        """Revoke a task (``POST /tasks/{id}/revoke``): a waiting one never runs; a running
        one finishes and is not retried, or, with ``terminate``, is stopped. ``was`` says
        what it was. An ended task is an :class:`ApiError` 409."""
        request = _api.revoke_request(id, terminate)
        return _api.parse_revoked(self._send(request), request.what)

    def handle(self, id: str) -> TaskHandle:
        """A handle of a task enqueued elsewhere (Celery's ``AsyncResult(id)``)."""
        return TaskHandle(self, Enqueued(_api.check_id(id), False), None)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio client: :class:`Client`'s methods, awaited (``async with AsyncClient()
    as client: handle = await client.enqueue("add", [1, 2])``).

    Each request runs on a thread of the client's own (at most :data:`MAX_THREADS`, started as
    needed), through the same keep-alive connections as :class:`Client`: the event loop only
    waits. A request whose caller is cancelled still completes on its thread (a ``POST /tasks``
    already sent may enqueue; use an ``idempotency_key`` to retry safely)."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        *,
        max_response_bytes: int = _api.MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(base_url, token, timeout, max_response_bytes)
        import concurrent.futures

        self._threads: concurrent.futures.ThreadPoolExecutor = concurrent.futures.ThreadPoolExecutor(
            MAX_THREADS, thread_name_prefix="taskrt-http"
        )

    async def _send(self, request: Request) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._exchange, request)

    async def enqueue(
        self,
        task: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | _dt.timedelta | None = None,
        eta: _dt.datetime | str | None = None,
        expires: _dt.datetime | float | _dt.timedelta | str | None = None,
        idempotency_key: str | None = None,
        id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        time_limit: float | _dt.timedelta | None = None,
        soft_time_limit: float | _dt.timedelta | None = None,
        trace_id: str | None = None,
    ) -> AsyncTaskHandle:
        """See :meth:`Client.enqueue`."""
        options = dict(
            queue=queue, countdown=countdown, eta=eta, expires=expires,
            idempotency_key=idempotency_key, id=id, link=link, link_error=link_error,
            time_limit=time_limit, soft_time_limit=soft_time_limit, trace_id=trace_id,
        )
        item = _api.enqueue_item(task, args, kwargs, options, "", _context())
        request = _api.enqueue_request([item], batch=False)
        (answer,) = _api.parse_enqueued(await self._send(request), 1, batch=False)
        return AsyncTaskHandle(self, answer, item["task"])

    async def enqueue_many(self, tasks: Iterable[Any]) -> list[AsyncTaskHandle]:
        """See :meth:`Client.enqueue_many`."""
        items = _items(tasks, _context())
        request = _api.enqueue_request(items, batch=True)
        answers = _api.parse_enqueued(await self._send(request), len(items), batch=True)
        return [AsyncTaskHandle(self, a, item["task"]) for a, item in zip(answers, items)]

    async def status(self, id: str) -> TaskRecord:
        """See :meth:`Client.status`."""
        request = _api.record_request(id)
        return _api.parse_record(await self._send(request), request.what)

    async def result(self, id: str, timeout: float | None = None) -> Any:
        """See :meth:`Client.result`."""
        waits = _api.backoff(timeout)
        while True:
            record = await self.status(id)
            value = _outcome(record)
            if value is not _PENDING:
                return value
            pause = next(waits, None)
            if pause is None:
                raise ResultTimeout(id, record.state, timeout)
            await asyncio.sleep(pause)

    async def revoke(self, id: str, terminate: bool = False) -> Revoked:
        """See :meth:`Client.revoke`."""
        request = _api.revoke_request(id, terminate)
        return _api.parse_revoked(await self._send(request), request.what)

    def handle(self, id: str) -> AsyncTaskHandle:
        """See :meth:`Client.handle`."""
        return AsyncTaskHandle(self, Enqueued(_api.check_id(id), False), None)

    async def aclose(self) -> None:
        # Requests on their way finish on their threads; their connections are closed then.
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class TaskHandle:
    """An enqueued task (Celery's ``AsyncResult``): ``id``, ``duplicate``, ``get()``,
    ``status()``, ``state``, ``revoke()``."""

    def __init__(self, client: Client, answer: Enqueued, task: str | None) -> None:
        self._client = client
        self.id: str = answer.id
        #: True when this enqueue was a duplicate (its key or id was taken): nothing new
        #: runs, and ``id`` is the first task's.
        self.duplicate: bool = answer.duplicate
        #: The task's name, when this handle comes from an enqueue.
        self.task: str | None = task

    def get(self, timeout: float | None = None) -> Any:
        """The result: waits up to ``timeout`` seconds (``None``: reads once). Raises
        :class:`TaskFailed` if the task is dead, :class:`ResultTimeout` if not ended."""
        return self._client.result(self.id, timeout=timeout)

    def status(self) -> TaskRecord:
        """The whole record, read now."""
        return self._client.status(self.id)

    @property
    def state(self) -> str:
        """The state, read now (``queued`` ... ``succeeded``, ``dead``)."""
        return self.status().state

    def ready(self) -> bool:
        return self.status().ready

    def revoke(self, terminate: bool = False) -> Revoked:
        return self._client.revoke(self.id, terminate=terminate)

    def __repr__(self) -> str:
        dup = ", duplicate" if self.duplicate else ""
        return f"<TaskHandle {self.task or '?'} {self.id}{dup}>"


class AsyncTaskHandle:
    """:class:`TaskHandle` for asyncio: ``await handle.result(timeout=...)``."""

    def __init__(
        self,
        client: AsyncClient | None,
        answer: Enqueued,
        task: str | None,
        client_args: Mapping[str, Any] | None = None,
    ) -> None:
        self._client = client
        self._client_args = dict(client_args or {})
        self.id: str = answer.id
        self.duplicate: bool = answer.duplicate
        self.task: str | None = task

    def detached(self, client_args: Mapping[str, Any]) -> AsyncTaskHandle:
        """This handle, reading through a client of its own per call (the client that
        enqueued it is closed)."""
        return AsyncTaskHandle(None, Enqueued(self.id, self.duplicate), self.task, client_args)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._client is not None:
            return await getattr(self._client, method)(*args, **kwargs)
        async with AsyncClient(**self._client_args) as client:
            return await getattr(client, method)(*args, **kwargs)

    async def result(self, timeout: float | None = None) -> Any:
        """See :meth:`TaskHandle.get`."""
        return await self._call("result", self.id, timeout=timeout)

    get = result

    async def status(self) -> TaskRecord:
        record: TaskRecord = await self._call("status", self.id)
        return record

    async def revoke(self, terminate: bool = False) -> Revoked:
        revoked: Revoked = await self._call("revoke", self.id, terminate=terminate)
        return revoked

    def __repr__(self) -> str:
        dup = ", duplicate" if self.duplicate else ""
        return f"<AsyncTaskHandle {self.task or '?'} {self.id}{dup}>"
