"""Signatures: a task name with arguments and options, to enqueue later or to pass as a
``link`` / ``link_error`` callback (Celery's ``task.s(...)``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._eager import EagerResult
    from .client import TaskHandle

__all__ = ["ENQUEUE_OPTIONS", "Signature", "signature"]

#: The keyword options of ``enqueue`` / ``apply_async`` a signature may carry.
ENQUEUE_OPTIONS = frozenset(
    {
        "queue",
        "countdown",
        "eta",
        "expires",
        "idempotency_key",
        "id",
        "link",
        "link_error",
        "time_limit",
        "soft_time_limit",
        "trace_id",
    }
)


class Signature:
    """A task invocation not sent yet: ``task`` (the name), ``args``, ``kwargs`` and
    ``options`` (any of :data:`ENQUEUE_OPTIONS`).

    As a ``link`` callback, the parent's result is put *before* ``args`` (Celery's partial
    arguments): ``add.s(10)`` linked to a task that returns 5 runs ``add(5, 10)``. A
    ``link_error`` callback gets ``{"id", "task", "error", "attempts"}`` there instead.
    Only the ``queue`` option applies to a callback.
    """

    __slots__ = ("task", "args", "kwargs", "options")

    def __init__(
        self,
        task: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(task, str) or not task:
            raise TypeError(f"Signature: task must be a non-empty name, got {task!r}")
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"Signature: args must be a list or tuple, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"Signature: kwargs must be a dict, got {type(kwargs).__name__}")
        unknown = sorted(set(options) - ENQUEUE_OPTIONS)
        if unknown:
            raise TypeError(
                f"Signature: unknown option(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(ENQUEUE_OPTIONS))})"
            )
        self.task: str = task
        self.args: tuple[Any, ...] = tuple(args)
        self.kwargs: dict[str, Any] = dict(kwargs or {})
        self.options: dict[str, Any] = options

    def set(self, **options: Any) -> Signature:
        """A copy with these options added (``add.s(1).set(queue="background")``)."""
        return Signature(self.task, self.args, self.kwargs, **{**self.options, **options})

    def clone(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Signature:
        """A copy with ``args`` put before its own and ``kwargs`` merged over its own."""
        return Signature(
            self.task, tuple(args) + self.args, {**self.kwargs, **(kwargs or {})}, **self.options
        )

    def delay(self, *args: Any, **kwargs: Any) -> TaskHandle | EagerResult:
        """Enqueue it (through the default client, or eagerly in eager mode), ``args`` put
        before its own."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> TaskHandle | EagerResult:
        """Enqueue it with more arguments and options (see ``Task.apply_async``)."""
        from ._task import dispatch

        return dispatch(self.clone(tuple(args or ()), kwargs).set(**options))

    def to_callback(self, where: str) -> dict[str, Any]:
        """The ``{"task", "args", "kwargs"[, "queue"]}`` of a ``link`` entry."""
        from ._json import roundtrip
        from .errors import EncodeError

        other = sorted(set(self.options) - {"queue"})
        if other:
            raise ValueError(
                f"{where}: a callback takes no option but queue (got {', '.join(other)})"
            )
        out: dict[str, Any] = {
            "task": self.task,
            "args": roundtrip(list(self.args), f"{where}.args", EncodeError),
            "kwargs": roundtrip(self.kwargs, f"{where}.kwargs", EncodeError),
        }
        queue = self.options.get("queue")
        if queue is not None:
            if not isinstance(queue, str):
                raise TypeError(f"{where}.queue: expected a string, got {type(queue).__name__}")
            out["queue"] = queue
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Signature):
            return NotImplemented
        return (self.task, self.args, self.kwargs, self.options) == (
            other.task,
            other.args,
            other.kwargs,
            other.options,
        )

    def __hash__(self) -> int:
        return hash((self.task, self.args))

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        text = f"{self.task}.s({', '.join(parts)})"
        if self.options:
            opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
            text += f".set({opts})"
        return text


def signature(task: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any) -> Signature:
    """``Signature`` of a task object or a task name (Celery's ``signature(...)``)."""
    name = task if isinstance(task, str) else getattr(task, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"signature: expected a task or a task name, got {type(task).__name__}")
    return Signature(name, args, kwargs, **options)
