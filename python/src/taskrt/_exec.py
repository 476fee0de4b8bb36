"""Running one attempt of a task, shared by the worker and eager mode: binding arguments,
the soft time limit (SIGALRM for sync code in the main thread, cancellation for coroutines),
the retry policy, and the checks on a result. Standard library only."""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Iterator

from . import _json
from .errors import Permanent, Retry, SoftTimeLimitExceeded

if TYPE_CHECKING:
    from ._task import Task

__all__ = [
    "Failure",
    "bind",
    "call_args",
    "classify",
    "encode_result",
    "soft_alarm",
    "with_soft_cancel",
]

#: Longest ``message`` and ``traceback`` sent (their ends are kept).
MAX_MESSAGE = 8 * 1024
MAX_TRACEBACK = 64 * 1024
#: Longest ``retry_after_ms`` (365 days, the runtime's cap on a delay).
MAX_RETRY_AFTER_MS = 365 * 24 * 3600 * 1000


class ArgumentsMismatch(TypeError):
    """The arguments sent do not fit the function's signature."""


@dataclass(frozen=True)
class Failure:
    """How an attempt failed, as the protocol's ``error`` object says it."""

    #: ``retry``, ``permanent`` or ``soft_timeout``.
    kind: str
    type: str
    message: str
    traceback: str
    retry_after_ms: int | None = None
    #: The exception itself (not sent).
    exception: BaseException | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "type": _clean(self.type, 200),
            "message": _clean(self.message, MAX_MESSAGE),
            "traceback": _clean(self.traceback, MAX_TRACEBACK, keep_end=True),
            "retry_after_ms": self.retry_after_ms,
        }

    def summary(self) -> str:
        """``ValueError: boom`` (how the error reads in a record)."""
        return f"{self.type}: {self.message}" if self.message else self.type


def _clean(text: str, limit: int, keep_end: bool = False) -> str:
    """``text`` as valid UTF-8 (lone surrogates escaped), at most ``limit`` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    if keep_end:
        return f"[{cut} characters cut]\n" + text[-limit:]
    return text[:limit] + f" [{cut} characters cut]"


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def failure(kind: str, exc: BaseException, message: str | None = None, after_ms: int | None = None) -> Failure:
    return Failure(
        kind=kind,
        type=type(exc).__name__,
        message=str(exc) if message is None else message,
        traceback=format_traceback(exc) if exc.__traceback__ is not None else "",
        retry_after_ms=after_ms,
        exception=exc,
    )


def simple_failure(kind: str, type_: str, message: str) -> Failure:
    return Failure(kind=kind, type=type_, message=message, traceback="")


def classify(task: Task[Any, Any], exc: BaseException, attempt: int) -> Failure:
    """The outcome the policy gives ``exc``: ``Retry``, ``Permanent`` and
    ``SoftTimeLimitExceeded`` first; then ``permanent_for``, then ``retry_for``; anything
    else is permanent. A retry at ``attempt >= max_retries`` is permanent instead."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return failure("soft_timeout", exc)
    if isinstance(exc, ArgumentsMismatch):
        found = failure("permanent", exc)
        return Failure("permanent", "TypeError", found.message, found.traceback, None, exc)
    if isinstance(exc, Permanent):
        return failure("permanent", exc)
    if isinstance(exc, Retry):
        after_ms = None
        if exc.after is not None:
            after_ms = min(round(exc.after * 1000), MAX_RETRY_AFTER_MS)
        message = exc.reason
        context = exc.__cause__ or exc.__context__
        if not message and context is not None:
            message = f"{type(context).__name__}: {context}"
        return _retry_or_exhausted(task, failure("retry", exc, message or str(exc), after_ms), attempt)
    if task.permanent_for and isinstance(exc, task.permanent_for):
        return failure("permanent", exc)
    if task.retry_for and isinstance(exc, task.retry_for):
        return _retry_or_exhausted(task, failure("retry", exc), attempt)
    return failure("permanent", exc)


def _retry_or_exhausted(task: Task[Any, Any], found: Failure, attempt: int) -> Failure:
    if task.max_retries is None or attempt < task.max_retries:
        return found
    note = f"not retried: attempt {attempt} reached max_retries={task.max_retries} of @task"
    message = f"{found.message} ({note})" if found.message else note
    return Failure("permanent", found.type, message, found.traceback, None, found.exception)


def bind(task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """``args``/``kwargs`` bound to the function's signature (``ArgumentsMismatch``, a
    ``TypeError``, when they do not fit)."""
    try:
        return task.signature_.bind(*args, **kwargs)
    except TypeError as exc:
        plain = task.signature_.replace(
            parameters=[p.replace(annotation=p.empty) for p in task.signature_.parameters.values()],
            return_annotation=inspect.Signature.empty,
        )
        raise ArgumentsMismatch(f"arguments do not fit {task.name}{plain}: {exc}") from None


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class _Plan:
    """What a signature takes, to see at once that arguments fit it - and call with them as
    :func:`bind` would - without ``inspect.Signature.bind`` (which costs more than a no-op
    task). ``ok`` is False for a signature of another shape than a ``def`` has: :func:`bind`
    then decides every call."""

    __slots__ = ("signature", "ok", "min_pos", "max_pos", "var_pos", "keyword_required", "names", "required", "order")

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        params = list(signature.parameters.values())
        positional = [p for p in params if p.kind in _POSITIONAL]
        keyword_only = [p for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
        self.max_pos = len(positional)
        self.min_pos = sum(1 for p in positional if p.default is p.empty)
        self.var_pos = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
        self.keyword_required = any(p.default is p.empty for p in keyword_only)
        #: The names a keyword may give: positional-or-keyword ones with their index,
        #: keyword-only ones with -1.
        self.names = {p.name: n for n, p in enumerate(positional) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD}
        self.names.update((p.name, -1) for p in keyword_only)
        #: The required parameters (name, index or -1), a call's keywords must give those
        #: its positional arguments do not.
        self.required = [(p.name, n) for n, p in enumerate(positional) if p.default is p.empty]
        self.required += [(p.name, -1) for p in keyword_only if p.default is p.empty]
        #: Positional names, then keyword-only ones (the order of ``BoundArguments.kwargs``).
        self.order = [p.name for p in positional] + [p.name for p in keyword_only]
        # The positional parameters first, the required ones before the others.
        self.ok = params[: len(positional)] == positional and all(
            p.default is p.empty for p in positional[: self.min_pos]
        )


def _plan(task: Task[Any, Any]) -> _Plan:
    plan = task.__dict__.get("_taskrt_plan")
    if type(plan) is not _Plan or plan.signature is not task.signature_:
        plan = _Plan(task.signature_)
        task.__dict__["_taskrt_plan"] = plan
    return plan


def call_args(
    task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...] | list[Any], dict[str, Any]]:
    """What to call the task's function with: ``bind(task, args, kwargs)``'s ``.args`` and
    ``.kwargs`` (or its ``ArgumentsMismatch``). Arguments that plainly fit the signature
    (each positional one and keyword a parameter, every required one given, none twice) are
    taken as they are, without ``inspect.Signature.bind``."""
    plan = _plan(task)
    count = len(args)
    if plan.ok and (count <= plan.max_pos or plan.var_pos):
        if not kwargs:
            if count >= plan.min_pos and not plan.keyword_required:
                return args, {}
        elif _keywords_fit(plan, count, kwargs):
            # As BoundArguments does: the keywords of the positional parameters right after
            # the given ones become positional; the rest stay keywords, in signature order.
            positional = list(args)
            order = plan.order
            at = min(count, plan.max_pos)
            while at < plan.max_pos and order[at] in kwargs:
                positional.append(kwargs[order[at]])
                at += 1
            return positional, {name: kwargs[name] for name in order[at:] if name in kwargs}
    bound = bind(task, args, kwargs)
    return bound.args, bound.kwargs


def _keywords_fit(plan: _Plan, count: int, kwargs: dict[str, Any]) -> bool:
    names = plan.names
    for key in kwargs:
        at = names.get(key)
        if at is None or 0 <= at < count:  # no parameter of that name, or given twice
            return False
    for name, at in plan.required:
        if (at < 0 or at >= count) and name not in kwargs:
            return False
    return True


def encode_result(value: Any) -> tuple[str | None, Failure | None]:
    """The result's JSON text, or the permanent failure of a result that has none
    (``result of type set is not JSON-serialisable``)."""
    try:
        return _json.dumps(value), None
    except (TypeError, ValueError, RecursionError) as exc:
        where = _json.find_problem(value, "result")
        message = f"result of type {type(value).__name__} is not JSON-serialisable"
        if where is None:
            message += f" ({exc})"
        elif not where.startswith("result: "):
            message += f" ({where})"
        elif not where.endswith("is not JSON-serialisable"):
            message += f" ({where.removeprefix('result: ')})"
        return None, simple_failure("permanent", "EncodeError", message)


# ---- the soft time limit ----------------------------------------------------------------------


class _Alarm:
    """The SIGALRM soft limits armed in the main thread, innermost last (eager mode can nest
    tasks: the nearest deadline is the one armed)."""

    def __init__(self) -> None:
        self.stack: list[tuple[float, str]] = []
        self.previous: Any = None

    def arm(self) -> None:
        if not self.stack:
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        deadline = min(d for d, _ in self.stack)
        signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.0005))


_alarm = _Alarm()


def _on_alarm(signum: int, frame: Any) -> None:
    if not _alarm.stack:
        return
    now = time.monotonic()
    due = [(d, m) for d, m in _alarm.stack if d <= now + 0.0005]
    if not due:  # woke early: arm again for the nearest
        _alarm.arm()
        return
    # The innermost due limit fires; it is spent (the outer ones stay armed).
    deadline, message = due[-1]
    _alarm.stack.remove((deadline, message))
    _alarm.arm()
    raise SoftTimeLimitExceeded(message)


def soft_message(seconds: float) -> str:
    return f"soft time limit ({seconds:g}s) exceeded"


@contextmanager
def soft_alarm(seconds: float | None) -> Iterator[bool]:
    """Raise :class:`SoftTimeLimitExceeded` in this (main) thread after ``seconds``; yields
    whether it could be armed (not outside the main thread, nor without a limit)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield False
        return
    entry = (time.monotonic() + max(seconds, 0.0), soft_message(seconds))
    if not _alarm.stack:
        _alarm.previous = signal.signal(signal.SIGALRM, _on_alarm)
    _alarm.stack.append(entry)
    _alarm.arm()
    try:
        yield True
    finally:
        # SIGALRM blocked while disarming, so it cannot fire half-way through; a pending one
        # that was this limit's is consumed rather than left to the previous handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            if entry in _alarm.stack:
                _alarm.stack.remove(entry)
            _alarm.arm()
            if not _alarm.stack:
                if hasattr(signal, "sigtimedwait"):
                    signal.sigtimedwait({signal.SIGALRM}, 0)
                signal.signal(signal.SIGALRM, _alarm.previous or signal.SIG_DFL)
                _alarm.previous = None
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


async def with_soft_cancel(awaitable: Awaitable[Any], seconds: float | None) -> Any:
    """Await ``awaitable`` as its own asyncio task, cancelled after ``seconds``: the
    cancellation it did not swallow is reported as :class:`SoftTimeLimitExceeded`."""
    inner = asyncio.ensure_future(awaitable)
    if seconds is None:
        return await inner
    fired = False

    def fire() -> None:
        nonlocal fired
        if not inner.done():
            fired = True
            inner.cancel()

    handle = asyncio.get_running_loop().call_later(max(seconds, 0.0), fire)
    try:
        return await inner
    except asyncio.CancelledError:
        # Python 3.11+: was the task awaiting this cancelled too (then it is not the limit)?
        cancelling = getattr(asyncio.current_task(), "cancelling", None)
        outer_cancelled = bool(cancelling()) if callable(cancelling) else False
        if fired and not outer_cancelled:
            raise SoftTimeLimitExceeded(soft_message(seconds)) from None
        raise
    finally:
        handle.cancel()
