"""Eager mode: ``.delay()`` and ``.apply_async()`` run the task here and now, for tests
without a node.

What still happens as with a node: arguments and the result go through JSON (a ``set``
argument raises at ``.delay()``, as a real enqueue refuses it); the retry policy applies
(``Retry`` and retryable exceptions are retried at once, up to ``max_retries`` - the delays
asked for are recorded, not slept); ``link`` / ``link_error`` callbacks run, looked up by name
among the registered tasks; an idempotency key or id used twice in one ``eager()`` block is a
duplicate that runs nothing. With ``enforce_limits=True`` the soft time limit is raised into a
sync task (SIGALRM, main thread only) and cancels an ``async def`` one. Not imitated: the hard
limit, ``countdown``/``eta``/``expires`` (the task runs at once), queues.

``taskrt.handle(id)`` / ``taskrt.result(id)`` find a run by its id: every run of the active
``eager()`` blocks, and the last ``MAX_UNRECORDED_IDS`` runs outside a block; an id not
among them is :class:`taskrt.NotFound`, as an unknown id is on a node.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import datetime as _dt
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from . import _api, _exec
from ._api import Revoked, TaskRecord
from .context import TaskInfo, _current
from .errors import ApiError, NotFound, TaskFailed
from ._signature import Signature
from ._task import Task, get_task

__all__ = ["AsyncEagerResult", "EagerResult", "EagerSession", "apply_eager", "eager", "find"]

#: ``max_retries=None`` in eager mode: the runtime's default.
RUNTIME_DEFAULT_MAX_RETRIES = 3
#: Runs kept for ``taskrt.handle(id)`` when eager mode is on outside an ``eager()`` block
#: (``configure(eager=True)``, ``TASKRT_EAGER=1``): the oldest are forgotten, as a node forgets
#: a result after ``broker.result_ttl``.
MAX_UNRECORDED_IDS = 10_000


@dataclass
class EagerResult:
    """The outcome of a task run eagerly, with :class:`taskrt.TaskHandle`'s surface (``id``,
    ``duplicate``, ``get()``, ``status()``, ``state``, ``ready()``) plus what a test wants
    to look at: ``result``, ``error``, ``exception``, ``attempts``, ``retries`` (the delay
    each retry asked for, in seconds, ``None`` for the policy's backoff) and ``children``
    (the callbacks run)."""

    id: str
    task: str
    queue: str | None
    #: ``succeeded`` or ``dead``.
    state: str
    result: Any = None
    error: str | None = None
    exception: BaseException | None = None
    traceback: str | None = None
    attempts: int = 0
    retries: list[float | None] = field(default_factory=list)
    children: list[EagerResult] = field(default_factory=list)
    duplicate: bool = False
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def get(self, timeout: float | None = None) -> Any:
        """The result; :class:`TaskFailed` (caused by the task's exception) if it failed."""
        if self.state == "succeeded":
            return self.result
        raise TaskFailed(self.id, self.error, self.state, self) from self.exception

    def ready(self) -> bool:
        return True

    def successful(self) -> bool:
        return self.state == "succeeded"

    def failed(self) -> bool:
        return self.state == "dead"

    def status(self) -> TaskRecord:
        """The record a node would show for it."""
        now = _dt.datetime.now(_dt.timezone.utc)
        return TaskRecord(
            id=self.id, task=self.task, queue=self.queue or "", state=self.state,
            result=self.result if self.state == "succeeded" else None, error=self.error,
            attempts=self.attempts, attempt=self.attempts - 1 if self.attempts else None,
            eta=None, enqueued_at=now, started_at=now, node="eager", updated_at=now,
        )

    def revoke(self, terminate: bool = False) -> Revoked:
        """Like revoking an ended task: an :class:`ApiError` 409."""
        raise ApiError(409, f"task {self.id} has ended ({self.state}): nothing to revoke")

    def as_duplicate(self) -> EagerResult:
        copy = EagerResult(**{f: getattr(self, f) for f in self.__dataclass_fields__})
        copy.duplicate = True
        return copy


class AsyncEagerResult:
    """What ``await task.adelay()`` gives in eager mode: an :class:`EagerResult` behind
    :class:`taskrt.AsyncTaskHandle`'s awaitable methods (``await handle.result()``)."""

    def __init__(self, eager: EagerResult) -> None:
        #: The run itself (``attempts``, ``retries``, ``children``, ...).
        self.eager = eager
        self.id = eager.id
        self.duplicate = eager.duplicate
        self.task: str | None = eager.task

    async def result(self, timeout: float | None = None) -> Any:
        return self.eager.get(timeout)

    get = result

    async def status(self) -> TaskRecord:
        return self.eager.status()

    async def revoke(self, terminate: bool = False) -> Revoked:
        return self.eager.revoke(terminate)

    def __repr__(self) -> str:
        return f"<AsyncEagerResult {self.eager.task} {self.id} {self.eager.state}>"


class EagerSession:
    """One ``eager()`` block: every run (callbacks included) in ``results``, in order, and the
    idempotency keys and ids used."""

    def __init__(self, record: bool = True) -> None:
        self.results: list[EagerResult] = []
        self._record = record
        self._seen: dict[str, EagerResult] = {}
        #: Runs by id (``taskrt.handle(id)``): all of a block's; the last
        #: ``MAX_UNRECORDED_IDS`` of the session eager mode uses outside any block.
        self._by_id: dict[str, EagerResult] = {}

    def _add(self, result: EagerResult, keys: list[str]) -> None:
        self._by_id.pop(result.id, None)  # a block never runs an id twice; outside one, the last
        self._by_id[result.id] = result
        if self._record:
            self.results.append(result)
            for key in keys:
                self._seen.setdefault(key, result)
        elif len(self._by_id) > MAX_UNRECORDED_IDS:
            del self._by_id[next(iter(self._by_id))]  # the oldest

    def _duplicate(self, keys: list[str]) -> EagerResult | None:
        for key in keys:
            if key in self._seen:
                return self._seen[key].as_duplicate()
        return None

    def by_task(self, name: str) -> list[EagerResult]:
        """The runs of the task of that name."""
        return [r for r in self.results if r.task == name]

    def get(self, id: str) -> EagerResult | None:
        """The run of that id in this session, or ``None``."""
        return self._by_id.get(id)


@dataclass
class _Mode:
    enabled: bool
    propagate: bool
    enforce_limits: bool
    session: EagerSession


#: ``eager()`` blocks, innermost last.
_override: list[_Mode] = []
_global_session = EagerSession(record=False)


@contextmanager
def eager(
    enabled: bool = True, *, propagate: bool = True, enforce_limits: bool = False
) -> Iterator[EagerSession]:
    """Run tasks in-process inside the block (``enabled=False`` turns eager mode off inside
    an eager block). ``propagate``: a failed task raises :class:`TaskFailed` from
    ``.delay()`` (else its :class:`EagerResult` says ``dead``). ``enforce_limits``: soft
    time limits fire. Yields the :class:`EagerSession` with every run."""
    mode = _Mode(enabled, propagate, enforce_limits, EagerSession())
    _override.append(mode)
    try:
        yield mode.session
    finally:
        _override.remove(mode)


def find(id: str) -> EagerResult:
    """The eager run of that id: in the active ``eager()`` blocks (innermost first), then
    among the last runs outside any block; :class:`NotFound` if none has it."""
    for mode in reversed(_override):
        found = mode.session.get(id)
        if found is not None:
            return found
    found = _global_session.get(id)
    if found is not None:
        return found
    raise NotFound(
        404,
        f"no task {id}: no eager run has this id (eager mode looks ids up among the runs of "
        f"its eager() blocks, and the last {MAX_UNRECORDED_IDS} runs outside one)",
    )


def _mode() -> _Mode:
    if _override:
        return _override[-1]
    from ._task import _settings

    return _Mode(True, _settings.propagate, _settings.enforce_limits, _global_session)


# ---- one apply ------------------------------------------------------------------------------


class _Run:
    """The attempts of one eager apply: what to run next, and the outcome so far."""

    def __init__(self, task: Task[Any, Any], item: dict[str, Any], id: str, mode: _Mode) -> None:
        self.task = task
        self.item = item
        self.id = id
        self.mode = mode
        self.args: list[Any] = item["args"]
        self.kwargs: dict[str, Any] = item["kwargs"]
        soft = item.get("soft_time_limit_ms")
        self.soft: float | None = soft / 1000 if (soft and mode.enforce_limits) else None
        self.max_retries = task.max_retries if task.max_retries is not None else RUNTIME_DEFAULT_MAX_RETRIES
        self.attempt = 0
        self.done = False
        self.retries: list[float | None] = []
        self.value: Any = None
        self.failure: _exec.Failure | None = None
        self.keys: list[str] = []

    def info(self) -> TaskInfo:
        import time

        deadline = time.monotonic() + self.soft if self.soft is not None else None
        return TaskInfo(
            id=self.id, name=self.task.name, queue=self.item.get("queue"), attempt=self.attempt,
            soft_deadline=deadline, trace_id=self.item.get("trace_id"), eager=True,
        )

    def succeeded(self, value: Any) -> None:
        text, problem = _exec.encode_result(value)
        if problem is not None:
            self._fail(problem)
            return
        import json

        self.value = json.loads(text) if text is not None else None
        self.done = True

    def failed(self, exc: BaseException) -> None:
        found = _exec.classify(self.task, exc, self.attempt)
        if found.kind == "soft_timeout":  # the runtime retries an attempt stopped there
            found = _exec.Failure("retry", found.type, found.message, found.traceback, None, exc)
        if found.kind == "retry" and self.attempt < self.max_retries:
            self.retries.append(None if found.retry_after_ms is None else found.retry_after_ms / 1000)
            self.attempt += 1
            return
        if found.kind == "retry":
            note = f"retries exhausted after {self.attempt + 1} attempts"
            found = _exec.Failure("permanent", found.type, f"{found.message} ({note})", found.traceback, None, exc)
        self._fail(found)

    def _fail(self, found: _exec.Failure) -> None:
        self.failure = found
        self.done = True

    def outcome(self) -> EagerResult:
        base = dict(
            id=self.id, task=self.task.name, queue=self.item.get("queue"),
            attempts=self.attempt + 1, retries=self.retries, args=self.args, kwargs=self.kwargs,
        )
        if self.failure is None:
            return EagerResult(state="succeeded", result=self.value, **base)  # type: ignore[arg-type]
        return EagerResult(
            state="dead", error=self.failure.summary(), exception=self.failure.exception,
            traceback=self.failure.traceback, **base,  # type: ignore[arg-type]
        )

    def callbacks(self, result: EagerResult) -> list[tuple[Task[Any, Any], list[Any], dict[str, Any], dict[str, Any]]]:
        if result.state == "succeeded":
            first: Any = result.result
            entries = self.item.get("link", [])
        else:
            first = {"id": self.id, "task": self.task.name, "error": result.error, "attempts": result.attempts}
            entries = self.item.get("link_error", [])
        out = []
        for entry in entries:
            options = {"queue": entry["queue"]} if "queue" in entry else {}
            out.append((get_task(entry["task"]), [first, *entry["args"]], entry["kwargs"], options))
        return out


def _prepare(
    target: Task[Any, Any] | Signature | str,
    args: list[Any] | None,
    kwargs: dict[str, Any] | None,
    options: Mapping[str, Any],
) -> tuple[Task[Any, Any], dict[str, Any], list[str]]:
    if isinstance(target, Signature):
        task = get_task(target.task)
        args = list(args or ()) + list(target.args)
        kwargs = {**target.kwargs, **(kwargs or {})}
        options = {**target.options, **options}
    elif isinstance(target, str):
        task = get_task(target)
    else:
        task = target
    item = _api.enqueue_item(task, args, kwargs, options)
    for field_ in ("link", "link_error"):
        for n, entry in enumerate(item.get(field_, [])):
            try:
                get_task(entry["task"])
            except KeyError as exc:
                raise type(exc)(f"{field_}[{n}].task: {exc}") from None
    keys = []
    if "idempotency_key" in item:
        keys.append("key:" + item["idempotency_key"])
    if "id" in item:
        keys.append("id:" + item["id"])
    return task, item, keys


def _start(
    target: Task[Any, Any] | Signature | str,
    args: list[Any] | None,
    kwargs: dict[str, Any] | None,
    options: Mapping[str, Any],
) -> tuple[_Run | None, EagerResult | None]:
    mode = _mode()
    task, item, keys = _prepare(target, args, kwargs, options)
    duplicate = mode.session._duplicate(keys)
    if duplicate is not None:
        return None, duplicate
    run = _Run(task, item, item.get("id") or str(uuid.uuid4()), mode)
    run.keys = keys
    return run, None


def _finish(run: _Run, result: EagerResult) -> EagerResult:
    run.mode.session._add(result, run.keys)
    return result


def _raise_if_failed(run: _Run, result: EagerResult) -> EagerResult:
    if result.state == "dead" and run.mode.propagate:
        raise TaskFailed(result.id, result.error, result.state, result) from result.exception
    return result


def apply_eager(
    target: Task[Any, Any] | Signature | str,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> EagerResult:
    """Run ``target`` here, now, as described in this module's documentation."""
    run, duplicate = _start(target, args, kwargs, options or {})
    if run is None:
        assert duplicate is not None
        return duplicate
    while not run.done:
        try:
            run.succeeded(_call(run))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - the policy decides
            run.failed(exc)
    result = _finish(run, run.outcome())
    for task, cb_args, cb_kwargs, cb_options in run.callbacks(result):
        result.children.append(apply_eager(task, cb_args, cb_kwargs, cb_options))
    return _raise_if_failed(run, result)


async def aapply_eager(
    target: Task[Any, Any] | Signature | str,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> EagerResult:
    """``apply_eager`` from async code: an ``async def`` task is awaited in the running
    loop (a sync one runs in place, as it would block in ``apply_eager`` too)."""
    run, duplicate = _start(target, args, kwargs, options or {})
    if run is None:
        assert duplicate is not None
        return duplicate
    while not run.done:
        try:
            if run.task.is_async:
                run.succeeded(await _call_async(run))
            else:
                run.succeeded(_call(run))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - the policy decides
            run.failed(exc)
    result = _finish(run, run.outcome())
    for task, cb_args, cb_kwargs, cb_options in run.callbacks(result):
        result.children.append(await aapply_eager(task, cb_args, cb_kwargs, cb_options))
    return _raise_if_failed(run, result)


def _call(run: _Run) -> Any:
    """One attempt, in this thread (an ``async def`` task on a loop of its own)."""
    args, kwargs = _exec.call_args(run.task, run.args, run.kwargs)
    token = _current.set(run.info())
    try:
        if run.task.is_async:
            coro = run.task.fn(*args, **kwargs)
            runner = _exec.with_soft_cancel(coro, run.soft)
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return asyncio.run(runner)
            # Called from async code: a loop of its own in another thread.
            context = contextvars.copy_context()
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="taskrt-eager") as pool:
                return pool.submit(context.run, asyncio.run, runner).result()
        with _exec.soft_alarm(run.soft):
            return run.task.fn(*args, **kwargs)
    finally:
        _current.reset(token)


async def _call_async(run: _Run) -> Any:
    args, kwargs = _exec.call_args(run.task, run.args, run.kwargs)
    token = _current.set(run.info())
    try:
        coro = run.task.fn(*args, **kwargs)
        return await _exec.with_soft_cancel(coro, run.soft)
    finally:
        _current.reset(token)
