"""``@task``: register a function as a task, and enqueue it with ``.delay()`` /
``.apply_async()`` (through the default client, or in-process in eager mode)."""

from __future__ import annotations

import datetime as _dt
import enum
import functools
import inspect
import os
import threading
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Generic,
    Mapping,
    ParamSpec,
    Sequence,
    TypeVar,
    overload,
)

from . import _api
from .context import current_task
from .errors import NotRegistered
from ._signature import Signature

if TYPE_CHECKING:
    from .client import AsyncClient, AsyncTaskHandle, Client, TaskHandle
    from ._eager import AsyncEagerResult, EagerResult

__all__ = [
    "Task",
    "ahandle",
    "aresult",
    "configure",
    "dispatch",
    "get_task",
    "handle",
    "registry",
    "result",
    "shared_task",
    "task",
]

P = ParamSpec("P")
R = TypeVar("R")

_registry: dict[str, Task[Any, Any]] = {}
_registry_lock = threading.Lock()
#: Every registered task by name (read-only).
registry: Mapping[str, Task[Any, Any]] = MappingProxyType(_registry)

ExcTypes = type[BaseException] | tuple[type[BaseException], ...]


def _exc_tuple(value: Any, field: str) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, (tuple, list)) else (value,)
    out = []
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"@task {field}: expected exception classes, got {item!r}")
        out.append(item)
    return tuple(out)


def _limit(value: Any, field: str) -> float | None:
    if value is None:
        return None
    return _api.millis(value, f"@task {field}") / 1000


class Task(Generic[P, R]):
    """A registered task. Calling it runs the function here; ``.delay()`` and
    ``.apply_async()`` enqueue it; ``.s()`` makes a :class:`Signature`."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int | None = 3,
        retry_for: ExcTypes = (Exception,),
        permanent_for: ExcTypes = (),
        time_limit: float | _dt.timedelta | None = None,
        soft_time_limit: float | _dt.timedelta | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@task: expected a function, got {type(fn).__name__}")
        if name is None:
            name = f"{fn.__module__}.{fn.__qualname__}"
        if not isinstance(name, str) or not name or any(c.isspace() or not c.isprintable() for c in name):
            raise ValueError(f"@task name: expected a non-empty name without spaces, got {name!r}")
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise ValueError(f"@task queue: expected a queue name, got {queue!r}")
        if max_retries is not None and (
            isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0
        ):
            raise ValueError(f"@task max_retries: expected an integer >= 0 or None, got {max_retries!r}")
        self.fn: Callable[P, R] = fn
        self.name: str = name
        self.queue: str | None = queue
        self.max_retries: int | None = max_retries
        self.retry_for: tuple[type[BaseException], ...] = _exc_tuple(retry_for, "retry_for")
        self.permanent_for: tuple[type[BaseException], ...] = _exc_tuple(permanent_for, "permanent_for")
        self.time_limit: float | None = _limit(time_limit, "time_limit")
        self.soft_time_limit: float | None = _limit(soft_time_limit, "soft_time_limit")
        if (
            self.time_limit is not None
            and self.soft_time_limit is not None
            and self.soft_time_limit >= self.time_limit
        ):
            raise ValueError(
                f"@task soft_time_limit: {self.soft_time_limit:g}s is not below time_limit "
                f"{self.time_limit:g}s: the soft limit would never fire"
            )
        self.is_async: bool = inspect.iscoroutinefunction(fn)
        self.signature_: inspect.Signature = inspect.signature(fn)
        functools.update_wrapper(self, fn)

    # ---- running it here ----------------------------------------------------------------

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function in this process, now (not a task: no retry, no limit)."""
        return self.fn(*args, **kwargs)

    # ---- enqueuing ------------------------------------------------------------------------

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle | EagerResult:
        """Enqueue with these arguments (``apply_async(args, kwargs)``)."""
        return dispatch(self, list(args), dict(kwargs), {})

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | _dt.timedelta | None = None,
        eta: _dt.datetime | str | None = None,
        expires: _dt.datetime | float | _dt.timedelta | str | None = None,
        queue: str | None = None,
        idempotency_key: str | None = None,
        id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        time_limit: float | _dt.timedelta | None = None,
        soft_time_limit: float | _dt.timedelta | None = None,
        trace_id: str | None = None,
    ) -> TaskHandle | EagerResult:
        """Enqueue with options (Celery's names): ``countdown`` seconds or an ``eta``
        (aware datetime or RFC 3339), ``expires`` (datetime, seconds from now, or RFC 3339),
        another ``queue``, an ``idempotency_key`` or a chosen ``id`` (a second enqueue of
        either is a duplicate and runs nothing), ``link`` / ``link_error`` callbacks (a
        task, a ``Signature``, or a list of them), time limits in seconds."""
        options = dict(
            countdown=countdown, eta=eta, expires=expires, queue=queue,
            idempotency_key=idempotency_key, id=id, link=link, link_error=link_error,
            time_limit=time_limit, soft_time_limit=soft_time_limit, trace_id=trace_id,
        )
        return dispatch(self, list(args or ()), dict(kwargs or {}), options)

    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncTaskHandle | AsyncEagerResult:
        """``delay`` for async code (FastAPI): the enqueue does not block the event loop."""
        return await adispatch(self, list(args), dict(kwargs), {})

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncTaskHandle | AsyncEagerResult:
        """``apply_async`` for async code (same options)."""
        return await adispatch(self, list(args or ()), dict(kwargs or {}), options)

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> EagerResult:
        """Run it here and now as eager mode does (JSON round trip, retries, callbacks),
        whatever the mode (Celery's ``apply()``); ``options`` as for ``apply_async``."""
        from ._eager import apply_eager

        return apply_eager(self, list(args or ()), dict(kwargs or {}), options)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A :class:`Signature` of this task (for ``link=``, ``enqueue_many``, later)."""
        return Signature(self.name, args, kwargs)

    def signature(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Signature:
        return Signature(self.name, tuple(args), dict(kwargs or {}), **options)

    def _taskrt_defaults(self) -> dict[str, Any]:
        """What an enqueue of this task uses unless it says otherwise."""
        return {
            "queue": self.queue,
            "time_limit": self.time_limit,
            "soft_time_limit": self.soft_time_limit,
        }

    def __repr__(self) -> str:
        return f"<@task {self.name}>"


def _register(t: Task[Any, Any]) -> None:
    with _registry_lock:
        found = _registry.get(t.name)
        if found is not None and found.fn is not t.fn:
            same = (found.fn.__module__, found.fn.__qualname__) == (t.fn.__module__, t.fn.__qualname__)
            if not same:
                raise ValueError(
                    f"task name `{t.name}` is registered already by "
                    f"{found.fn.__module__}.{found.fn.__qualname__}; "
                    f"{t.fn.__module__}.{t.fn.__qualname__} cannot take it (pass another name=)"
                )
        _registry[t.name] = t


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    *,
    name: str | None = None,
    queue: str | None = None,
    max_retries: int | None = 3,
    retry_for: ExcTypes = (Exception,),
    permanent_for: ExcTypes = (),
    time_limit: float | _dt.timedelta | None = None,
    soft_time_limit: float | _dt.timedelta | None = None,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str | None = None,
    max_retries: int | None = 3,
    retry_for: ExcTypes = (Exception,),
    permanent_for: ExcTypes = (),
    time_limit: float | _dt.timedelta | None = None,
    soft_time_limit: float | _dt.timedelta | None = None,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Register a function (plain or ``async def``) as a task.

    ``name`` defaults to ``module.qualname`` (as Celery's does); give the name the runtime's
    config defines (``[tasks.NAME]``). ``queue`` and the time limits (seconds) are sent with
    each enqueue unless it says otherwise. Policy of a failed attempt: ``Retry`` and
    ``Permanent`` decide; else an exception in ``permanent_for`` fails for good, one in
    ``retry_for`` is retried, anything else fails for good. After ``max_retries`` retries
    (``None``: as many as the runtime allows) a retryable failure is permanent.
    """

    def wrap(f: Callable[P, R]) -> Task[P, R]:
        t: Task[P, R] = Task(
            f, name=name, queue=queue, max_retries=max_retries, retry_for=retry_for,
            permanent_for=permanent_for, time_limit=time_limit, soft_time_limit=soft_time_limit,
        )
        _register(t)
        return t

    if fn is not None:
        return wrap(fn)
    return wrap


#: Celery's spelling.
shared_task = task


def get_task(name: str) -> Task[Any, Any]:
    """The registered task of that name (:class:`NotRegistered` naming the known ones)."""
    found = _registry.get(name)
    if found is None:
        known = ", ".join(sorted(_registry)) or "none"
        raise NotRegistered(f"no task named `{name}` is registered (registered: {known})")
    return found


# ---- configuration and the default client -------------------------------------------------


class _Unset(enum.Enum):
    UNSET = 0


UNSET = _Unset.UNSET


class _Settings:
    def __init__(self) -> None:
        self.url: str | None = None
        self.token: str | None = None
        self.token_set = False
        self.timeout: float = 10.0
        self.eager: bool | None = None
        self.propagate = True
        self.enforce_limits = False
        self.client: Client | None = None
        self.own_client = False
        self.async_client: AsyncClient | None = None


_settings = _Settings()
_settings_lock = threading.RLock()


def configure(
    *,
    url: str | None | _Unset = UNSET,
    token: str | None | _Unset = UNSET,
    timeout: float | _Unset = UNSET,
    eager: bool | None | _Unset = UNSET,
    propagate: bool | _Unset = UNSET,
    enforce_limits: bool | _Unset = UNSET,
    client: Client | None | _Unset = UNSET,
    async_client: AsyncClient | None | _Unset = UNSET,
) -> None:
    """Set up what ``.delay()`` / ``.apply_async()`` use; only the arguments given change.

    ``url`` and ``token`` of the node (default: env ``TASKRT_URL``, else
    ``http://127.0.0.1:7070``; env ``TASKRT_TOKEN``), ``timeout`` per request (10 s), or a
    ready ``client`` (and ``async_client`` for ``adelay()``, which otherwise opens a client
    per call; you close the clients you give). ``eager=True`` runs tasks in-process instead (env ``TASKRT_EAGER=1``;
    ``None`` goes back to the environment), with ``propagate`` (raise a failure, default
    True) and ``enforce_limits`` (soft limits, default False).
    """
    with _settings_lock:
        old = _settings.client if _settings.own_client else None
        if url is not UNSET:
            _settings.url = None if url is None else _api.check_base_url(url)
        if token is not UNSET:
            _settings.token = _api.check_token(token)
            _settings.token_set = token is not None
        if timeout is not UNSET:
            _settings.timeout = float(timeout)
        if eager is not UNSET:
            _settings.eager = eager
        if propagate is not UNSET:
            _settings.propagate = bool(propagate)
        if enforce_limits is not UNSET:
            _settings.enforce_limits = bool(enforce_limits)
        if async_client is not UNSET:
            _settings.async_client = async_client
        if client is not UNSET:
            _settings.client, _settings.own_client = client, False
        elif url is not UNSET or token is not UNSET or timeout is not UNSET:
            _settings.client, _settings.own_client = None, False
        if old is not None and old is not _settings.client:
            old.close()


def _client_args() -> dict[str, Any]:
    return {
        "base_url": _settings.url or os.environ.get("TASKRT_URL") or _api.DEFAULT_URL,
        "token": _settings.token if _settings.token_set else os.environ.get("TASKRT_TOKEN"),
        "timeout": _settings.timeout,
    }


def default_client() -> Client:
    """The client ``.delay()`` uses (made on first use from :func:`configure` and the
    environment)."""
    with _settings_lock:
        if _settings.client is None:
            from .client import Client

            _settings.client = Client(**_client_args())
            _settings.own_client = True
        return _settings.client


def eager_enabled() -> bool:
    from ._eager import _override

    if _override:
        return _override[-1].enabled
    if _settings.eager is not None:
        return _settings.eager
    return os.environ.get("TASKRT_EAGER", "").strip().lower() in ("1", "true", "yes", "on")


def _context() -> dict[str, Any] | None:
    info = current_task()
    return info.enqueue_context() if info is not None and not info.eager else None


def dispatch(
    target: Task[Any, Any] | Signature,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> TaskHandle | EagerResult:
    """Enqueue ``target`` through the default client, or run it eagerly in eager mode."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if eager_enabled():
        from ._eager import apply_eager

        return apply_eager(target, args, kwargs, options)
    return default_client().enqueue(target, args or (), kwargs, **options)


async def adispatch(
    target: Task[Any, Any] | Signature,
    args: list[Any] | None,
    kwargs: dict[str, Any] | None,
    options: Mapping[str, Any],
) -> AsyncTaskHandle | AsyncEagerResult:
    options = {k: v for k, v in options.items() if v is not None}
    if eager_enabled():
        from ._eager import AsyncEagerResult, aapply_eager

        return AsyncEagerResult(await aapply_eager(target, args, kwargs, options))
    from .client import AsyncClient

    with _settings_lock:
        client_args = _client_args()
        given = _settings.async_client
    if given is not None:
        return await given.enqueue(target, args or (), kwargs, **options)
    async with AsyncClient(**client_args) as client:
        handle = await client.enqueue(target, args or (), kwargs, **options)
    # The handle outlives the client of this call: it reads with a client of its own.
    return handle.detached(client_args)


# ---- a task by id ---------------------------------------------------------------------------


def _check_wait(timeout: Any) -> float | None:
    """``timeout`` of :func:`result`: ``None`` (read once) or seconds >= 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout: expected seconds or None, got {type(timeout).__name__}")
    if not (timeout >= 0 and timeout != float("inf")):
        raise ValueError(f"timeout: expected a finite number of seconds >= 0, got {timeout!r}")
    return float(timeout)


def handle(id: str) -> TaskHandle | EagerResult:
    """The task of this id (Celery's ``AsyncResult(id)``): ``get()``, ``status()``,
    ``state``, ``ready()``, ``revoke()``.

    Through the default client (:func:`configure`, env ``TASKRT_URL`` / ``TASKRT_TOKEN``);
    nothing is read until a method is called (an unknown id is :class:`NotFound` then). In
    eager mode, the run of that id (:class:`EagerResult`): :class:`NotFound` at once if no
    eager run has it. An id the runtime would refuse is a ``TypeError`` / ``ValueError``.
    """
    _api.check_id(id)
    if eager_enabled():
        from ._eager import find

        return find(id)
    return default_client().handle(id)


def result(id: str, timeout: float | None = None) -> Any:
    """The result of the task of this id, as ``handle(id).get(timeout)``: ``timeout=None``
    reads once, else waits up to ``timeout`` seconds. :class:`TaskFailed` if it died,
    :class:`ResultTimeout` if it has not ended, :class:`NotFound` for an unknown id."""
    wait = _check_wait(timeout)
    return handle(id).get(wait)


def ahandle(id: str) -> AsyncTaskHandle | AsyncEagerResult:
    """:func:`handle` for async code: a handle whose methods are awaited
    (``await taskrt.ahandle(id).result(timeout=5)``). It reads through the ``async_client``
    given to :func:`configure`, else through a client of its own per call. Not a coroutine:
    nothing is read until a method is awaited."""
    _api.check_id(id)
    if eager_enabled():
        from ._eager import AsyncEagerResult, find

        return AsyncEagerResult(find(id))
    from ._api import Enqueued
    from .client import AsyncTaskHandle

    with _settings_lock:
        client_args = _client_args()
        given = _settings.async_client
    if given is not None:
        return given.handle(id)
    return AsyncTaskHandle(None, Enqueued(id, False), None, client_args)


async def aresult(id: str, timeout: float | None = None) -> Any:
    """:func:`result` for async code (the wait does not block the event loop)."""
    wait = _check_wait(timeout)
    return await ahandle(id).result(wait)
