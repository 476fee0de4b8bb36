"""The runtime's HTTP API without I/O: request builders and answer parsers.

:class:`taskrt.Client` and :class:`taskrt.AsyncClient` only move bytes; everything they send
is built here and everything they receive is checked here. Answers are treated as hostile:
a body that is not JSON, or JSON of the wrong shape, is an :class:`ApiError` naming the
route and the field.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from . import _json
from .errors import ApiError, EncodeError, NotFound
from ._signature import ENQUEUE_OPTIONS, Signature

__all__ = [
    "DEFAULT_URL",
    "Enqueued",
    "MAX_BATCH",
    "Request",
    "Revoked",
    "TaskRecord",
    "backoff",
]

#: The runtime's default ``http.bind``.
DEFAULT_URL = "http://127.0.0.1:7070"
#: Most tasks one ``POST /tasks`` may carry.
MAX_BATCH = 10_000
#: Largest answer body read (a task's result is at most ``broker.max_entry_bytes``).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: How much of an unexpected body an error message quotes.
_QUOTE = 200
#: Task id rules (the runtime's ``check_id``).
MAX_ID_BYTES = 256

_ENDED = frozenset({"succeeded", "dead"})
_CELERY_STATES = {
    "queued": "PENDING",
    "scheduled": "PENDING",
    "running": "STARTED",
    "retrying": "RETRY",
    "succeeded": "SUCCESS",
    "dead": "FAILURE",
}


@dataclass(frozen=True)
class Request:
    """One HTTP request: ``path`` is percent-encoded; ``what`` names it in messages."""

    method: str
    path: str
    body: bytes | None
    what: str


@dataclass(frozen=True)
class Enqueued:
    """The node's answer to one enqueued task."""

    id: str
    #: True when nothing was enqueued: the idempotency key or the chosen id was taken.
    duplicate: bool


@dataclass(frozen=True)
class Revoked:
    """The answer of ``POST /tasks/{id}/revoke``: what the task was when revoked."""

    id: str
    #: ``queued``, ``scheduled``, ``retrying``, ``running``, ``unknown`` or ``revoked``
    #: (revoked already).
    was: str
    terminate: bool


@dataclass(frozen=True)
class TaskRecord:
    """A task's record (``GET /tasks/{id}``), from its enqueue until ``broker.result_ttl``
    after it ended."""

    id: str
    task: str
    queue: str
    #: ``queued``, ``scheduled``, ``running``, ``retrying``, ``succeeded`` or ``dead``.
    state: str
    #: The task's return value (succeeded), else ``None``.
    result: Any
    #: The last error (retrying, dead, ...); ``"revoked"`` for a revoked task.
    error: str | None
    #: Attempts started, the running one included.
    attempts: int
    #: Index of the latest attempt (``attempts - 1``), ``None`` while none started.
    attempt: int | None
    eta: _dt.datetime | None
    enqueued_at: _dt.datetime | None
    started_at: _dt.datetime | None
    node: str | None
    updated_at: _dt.datetime | None

    @property
    def ready(self) -> bool:
        """It has ended: ``succeeded`` or ``dead``."""
        return self.state in _ENDED

    @property
    def successful(self) -> bool:
        return self.state == "succeeded"

    @property
    def failed(self) -> bool:
        return self.state == "dead"

    @property
    def celery_state(self) -> str:
        """Celery's name of the state: ``PENDING``, ``STARTED``, ``RETRY``, ``SUCCESS``,
        ``FAILURE`` or ``REVOKED``."""
        if self.state == "dead" and self.error == "revoked":
            return "REVOKED"
        return _CELERY_STATES.get(self.state, "PENDING")


# ---- values ---------------------------------------------------------------------------------


def check_id(id: Any, field: str = "id") -> str:
    """A task id as the runtime accepts it: 1-256 bytes of UTF-8, no control character, not
    ``.`` or ``..``."""
    if not isinstance(id, str):
        raise TypeError(f"{field}: expected a string, got {type(id).__name__}")
    if not id:
        raise ValueError(f"{field}: is empty")
    try:
        size = len(id.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{field}: holds a lone surrogate (not UTF-8)") from None
    if size > MAX_ID_BYTES:
        raise ValueError(f"{field}: is {size} bytes, over the limit of {MAX_ID_BYTES}")
    for ch in id:
        if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            raise ValueError(f"{field}: holds a control character (U+{ord(ch):04X})")
    if id in (".", ".."):
        raise ValueError(f"{field}: `{id}` cannot be used as an id")
    return id


def _check_str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field}: expected a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{field}: is empty")
    return value


def _seconds(value: Any, field: str) -> float:
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field}: expected seconds or a timedelta, got {type(value).__name__}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{field}: expected a finite number of seconds, got {seconds!r}")
    return seconds


def millis(value: Any, field: str) -> int:
    """Seconds (float, int or timedelta) as whole milliseconds, at least 1."""
    seconds = _seconds(value, field)
    ms = round(seconds * 1000)
    if ms < 1:
        raise ValueError(f"{field}: must be at least 1 ms, got {seconds:g} seconds")
    return ms


def rfc3339(value: _dt.datetime, field: str) -> str:
    """An aware datetime in RFC 3339 (UTC shown as ``Z``); a naive one is refused."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{field}: a naive datetime has no time zone; give an aware one "
            "(datetime.now(timezone.utc), or Django's timezone.now())"
        )
    text = value.isoformat(timespec="milliseconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _time(value: Any, field: str, *, relative: bool) -> str:
    if isinstance(value, _dt.datetime):
        return rfc3339(value, field)
    if isinstance(value, str):
        return _check_str(value, field)
    if relative and (isinstance(value, (int, float, _dt.timedelta)) and not isinstance(value, bool)):
        seconds = _seconds(value, field)
        try:
            at = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"{field}: {seconds:g} seconds from now is out of range") from None
        return rfc3339(at, field)
    kinds = "a datetime, seconds, a timedelta or an RFC 3339 string" if relative else (
        "a datetime or an RFC 3339 string"
    )
    raise TypeError(f"{field}: expected {kinds}, got {type(value).__name__}")


_TIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_time(value: str) -> _dt.datetime:
    """An RFC 3339 time as an aware datetime (``ValueError`` if it is not one)."""
    m = _TIME.match(value)
    if not m:
        raise ValueError(f"`{value[:_QUOTE]}` is not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    micros = int((m.group(7) or "0")[:6].ljust(6, "0"))
    zone = m.group(8)
    if zone in ("Z", "z"):
        tz = _dt.timezone.utc
    else:
        sign = 1 if zone[0] == "+" else -1
        tz = _dt.timezone(sign * _dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    return _dt.datetime(year, month, day, hour, minute, min(second, 59), micros, tzinfo=tz)


# ---- POST /tasks ----------------------------------------------------------------------------


def _name_of(task: Any, field: str) -> tuple[str, dict[str, Any]]:
    """The name of a task given as a name, a ``Task`` or a ``Signature``, and its defaults."""
    if isinstance(task, str):
        return _check_str(task, field), {}
    if isinstance(task, Signature):
        return task.task, _registered_defaults(task.task)
    name = getattr(task, "name", None)
    defaults = getattr(task, "_taskrt_defaults", None)
    if isinstance(name, str) and callable(defaults):
        found = defaults()
        return name, dict(found) if isinstance(found, dict) else {}
    raise TypeError(f"{field}: expected a task, a Signature or a task name, got {type(task).__name__}")


def _registered_defaults(name: str) -> dict[str, Any]:
    """The defaults of the task registered here under ``name`` (none if there is none)."""
    from ._task import registry

    found = registry.get(name)
    return found._taskrt_defaults() if found is not None else {}


def _callbacks(value: Any, field: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for n, item in enumerate(items):
        where = f"{field}[{n}]"
        if isinstance(item, Signature):
            sig = item
        else:
            name, _ = _name_of(item, where)
            sig = Signature(name)
        queue = _registered_defaults(sig.task).get("queue")
        if queue is not None and "queue" not in sig.options:
            sig = sig.set(queue=queue)
        out.append(sig.to_callback(where))
    return out


def enqueue_item(
    task: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    where: str = "",
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``POST /tasks`` item. ``task`` is a name, a ``Task`` (its ``queue`` and time
    limits are defaults) or a ``Signature`` (its arguments come first, its options are
    defaults); ``options`` are enqueue's keyword options that were given. ``context`` is
    the running task's (``trace_id``, ``parent_id``, ``root_id``) when called from one."""
    at = f"{where}." if where else ""
    unknown = sorted(set(options) - ENQUEUE_OPTIONS)
    if unknown:
        raise TypeError(f"{at}unknown option(s): {', '.join(unknown)}")
    name, defaults = _name_of(task, f"{at}task")
    if isinstance(task, Signature):
        defaults = {**defaults, **{k: v for k, v in task.options.items() if v is not None}}
        args = list(args or ()) + list(task.args)
        kwargs = {**task.kwargs, **(kwargs or {})}
    if args is None:
        args = []
    if kwargs is None:
        kwargs = {}
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
        raise TypeError(f"{at}args: expected a list or tuple, got {type(args).__name__}")
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{at}kwargs: expected a dict, got {type(kwargs).__name__}")
    for key in kwargs:
        if not isinstance(key, str):
            raise TypeError(f"{at}kwargs: keys must be strings, got {type(key).__name__}")
    merged = {**defaults, **{k: v for k, v in options.items() if v is not None}}
    item: dict[str, Any] = {
        "task": name,
        "args": _json.roundtrip(list(args), f"{at}args", EncodeError),
        "kwargs": _json.roundtrip(dict(kwargs), f"{at}kwargs", EncodeError),
    }
    if merged.get("queue") is not None:
        item["queue"] = _check_str(merged["queue"], f"{at}queue")
    if merged.get("id") is not None:
        item["id"] = check_id(merged["id"], f"{at}id")
    if merged.get("countdown") is not None and merged.get("eta") is not None:
        raise ValueError(f"{at}countdown: give eta or countdown, not both")
    if merged.get("countdown") is not None:
        countdown = _seconds(merged["countdown"], f"{at}countdown")
        if countdown < 0:
            raise ValueError(f"{at}countdown: must be >= 0 seconds, got {countdown:g}")
        item["countdown"] = countdown
    if merged.get("eta") is not None:
        item["eta"] = _time(merged["eta"], f"{at}eta", relative=False)
    if merged.get("expires") is not None:
        item["expires"] = _time(merged["expires"], f"{at}expires", relative=True)
    if merged.get("idempotency_key") is not None:
        item["idempotency_key"] = _check_str(merged["idempotency_key"], f"{at}idempotency_key")
    if merged.get("time_limit") is not None:
        item["time_limit_ms"] = millis(merged["time_limit"], f"{at}time_limit")
    if merged.get("soft_time_limit") is not None:
        item["soft_time_limit_ms"] = millis(merged["soft_time_limit"], f"{at}soft_time_limit")
    if "time_limit_ms" in item and "soft_time_limit_ms" in item:
        given = {k for k, v in options.items() if v is not None}
        if (
            item["soft_time_limit_ms"] >= item["time_limit_ms"]
            and "time_limit" in given
            and "soft_time_limit" not in given
        ):
            # A shorter hard limit given for this call drops the task's default soft one
            # (as the runtime does with its configured soft limit).
            del item["soft_time_limit_ms"]
        elif item["soft_time_limit_ms"] >= item["time_limit_ms"]:
            raise ValueError(
                f"{at}soft_time_limit: {item['soft_time_limit_ms']} ms is not below "
                f"time_limit {item['time_limit_ms']} ms: the soft limit would never fire"
            )
    link = _callbacks(merged.get("link"), f"{at}link")
    if link:
        item["link"] = link
    link_error = _callbacks(merged.get("link_error"), f"{at}link_error")
    if link_error:
        item["link_error"] = link_error
    context = context or {}
    trace_id = merged.get("trace_id") or context.get("trace_id")
    if trace_id is not None:
        item["trace_id"] = _check_str(trace_id, f"{at}trace_id")
    for key in ("parent_id", "root_id"):
        if context.get(key):
            item[key] = context[key]
    return item


def enqueue_request(items: list[dict[str, Any]], batch: bool) -> Request:
    if batch and not 1 <= len(items) <= MAX_BATCH:
        raise ValueError(f"enqueue_many: expected 1 to {MAX_BATCH} tasks, got {len(items)}")
    payload: Any = items if batch else items[0]
    return Request("POST", "/tasks", _json.dumps(payload).encode("utf-8"), "POST /tasks")


def _field(obj: Mapping[str, Any], key: str, kinds: tuple[type, ...], what: str, where: str, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise _BadAnswer(what, f"{where}`{key}` is missing")
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in kinds)
        raise _BadAnswer(what, f"{where}`{key}`: expected {names}, got {_kind(value)}")
    return value


class _BadAnswer(ApiError):
    """An answer of the wrong shape (a 2xx whose body is not what the API documents)."""

    def __init__(self, what: str, why: str, status: int = 200) -> None:
        super().__init__(status, f"unexpected answer to {what}: {why}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def parse_enqueued(body: Any, count: int, batch: bool, what: str = "POST /tasks") -> list[Enqueued]:
    if batch:
        if not isinstance(body, list):
            raise _BadAnswer(what, f"expected an array of {count}, got {_kind(body)}", 202)
        if len(body) != count:
            raise _BadAnswer(what, f"expected {count} answers, got {len(body)}", 202)
        items = body
    else:
        items = [body]
    out = []
    for n, item in enumerate(items):
        where = f"[{n}]." if batch else ""
        if not isinstance(item, dict):
            at = f"{where[:-1]}: " if where else ""
            raise _BadAnswer(what, f"{at}expected an object, got {_kind(item)}", 202)
        out.append(
            Enqueued(
                id=_field(item, "id", (str,), what, where),
                duplicate=_field(item, "duplicate", (bool,), what, where),
            )
        )
    return out


# ---- GET /tasks/{id}, POST /tasks/{id}/revoke -----------------------------------------------


def task_path(id: str) -> str:
    return "/tasks/" + urllib.parse.quote(check_id(id), safe="")


def record_request(id: str) -> Request:
    path = task_path(id)
    return Request("GET", path, None, f"GET {path}")


def parse_record(body: Any, what: str) -> TaskRecord:
    if not isinstance(body, dict):
        raise _BadAnswer(what, f"expected an object, got {_kind(body)}")

    def time(key: str, optional: bool = True) -> _dt.datetime | None:
        raw = _field(body, key, (str,), what, "", optional=optional)
        if raw is None:
            return None
        try:
            return parse_time(raw)
        except ValueError as exc:
            raise _BadAnswer(what, f"`{key}`: {exc}") from None

    attempts = _field(body, "attempts", (int,), what, "")
    attempt = _field(body, "attempt", (int,), what, "", optional=True)
    if attempts < 0 or (attempt is not None and attempt < 0):
        raise _BadAnswer(what, "`attempts`/`attempt`: negative")
    return TaskRecord(
        id=_field(body, "id", (str,), what, ""),
        task=_field(body, "task", (str,), what, ""),
        queue=_field(body, "queue", (str,), what, ""),
        state=_field(body, "state", (str,), what, ""),
        result=body.get("result"),
        error=_field(body, "error", (str,), what, "", optional=True),
        attempts=attempts,
        attempt=attempt,
        eta=time("eta"),
        enqueued_at=time("enqueued_at"),
        started_at=time("started_at"),
        node=_field(body, "node", (str,), what, "", optional=True),
        updated_at=time("updated_at"),
    )


def revoke_request(id: str, terminate: bool) -> Request:
    if not isinstance(terminate, bool):
        raise TypeError(f"terminate: expected a bool, got {type(terminate).__name__}")
    path = task_path(id) + "/revoke"
    body = _json.dumps({"terminate": terminate}).encode("utf-8")
    return Request("POST", path, body, f"POST {path}")


def parse_revoked(body: Any, what: str) -> Revoked:
    if not isinstance(body, dict):
        raise _BadAnswer(what, f"expected an object, got {_kind(body)}")
    return Revoked(
        id=_field(body, "id", (str,), what, ""),
        was=_field(body, "was", (str,), what, ""),
        terminate=_field(body, "terminate", (bool,), what, ""),
    )


# ---- answers --------------------------------------------------------------------------------


def _quote(body: bytes) -> str:
    text = body[:_QUOTE].decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    more = "…" if len(body) > _QUOTE else ""
    return f"{text!r}{more}" if text else "an empty body"


def decode(status: int, body: bytes, what: str) -> Any:
    """The JSON of an answer; for a 4xx/5xx, :class:`ApiError` (:class:`NotFound` for 404)
    with the node's ``{"error": ...}``, or naming what came instead."""
    try:
        value: Any = _json_loads(body)
        parsed = True
    except ValueError:
        value, parsed = None, False
    if 200 <= status < 300:
        if not parsed:
            raise _BadAnswer(what, f"not JSON: {_quote(body)}", status)
        return value
    error = NotFound if status == 404 else ApiError
    if parsed and isinstance(value, dict) and isinstance(value.get("error"), str):
        raise error(status, value["error"])
    raise error(status, f"{what} answered without a JSON error: {_quote(body)}")


def _json_loads(body: bytes) -> Any:
    import json

    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    try:
        return json.loads(body.decode("utf-8"), parse_constant=refuse)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


def backoff(timeout: float | None) -> Iterator[float]:
    """The pauses between reads while waiting for a task: 10 ms doubling to 250 ms, cut to
    what is left of ``timeout``; ends when the time is up (at once for ``None``)."""
    if timeout is None:
        return
    deadline = time.monotonic() + max(0.0, timeout)
    pause = 0.01
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        yield min(pause, left)
        pause = min(pause * 2, 0.25)


def redact_url(url: str) -> str:
    """A URL without userinfo, query and fragment (what messages show)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_base_url(url: Any) -> str:
    if not isinstance(url, str):
        raise TypeError(f"base_url: expected a string, got {type(url).__name__}")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"base_url: not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url: expected http://HOST:PORT or https://…, got {redact_url(url)!r}")
    if parts.query or parts.fragment:
        raise ValueError("base_url: must not have a query or fragment")
    return url.rstrip("/")


def check_token(token: Any) -> str | None:
    """The admin token, checked without ever echoing it."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise TypeError(f"token: expected a string, got {type(token).__name__}")
    if not token:
        return None
    if token != token.strip():
        raise ValueError("token: has whitespace around it")
    if any(not (0x20 <= ord(ch) <= 0x7E) for ch in token):
        raise ValueError("token: holds a control or non-ASCII character")
    return token
