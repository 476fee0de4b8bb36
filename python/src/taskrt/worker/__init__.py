"""``python -m taskrt.worker``: a worker process of the runtime's Python pool.

It speaks JSON lines over the AF_UNIX stream socket whose number is in ``RT_WORKER_FD``
(see the runtime's Python worker protocol): ``ready`` once the modules of
``RT_WORKER_MODULES`` are imported, then one ``done`` per ``run``. stdout and stderr are only
logs. Standard library and taskrt's own non-HTTP modules only (httpx is never imported here).

Environment:

=========================  =======================================================================
``RT_WORKER_FD``           the protocol socket (inherited; made non-inheritable at once)
``RT_WORKER_MODULES``      comma-separated modules to import (they register their ``@task``\\s)
``RT_WORKER_CONCURRENCY``  tasks at once: 1 (default) one at a time in the main thread; N > 1 an
                           asyncio loop, ``async def`` tasks as asyncio tasks and sync ones in
                           a pool of N threads (where a soft time limit cannot be delivered)
``RT_WORKER_DB_CLOSE``     ``stale`` (default): Django's ``close_old_connections()`` before and
                           after each task; ``always``: close every connection
``RT_WORKER_MAX_MESSAGE_BYTES``  largest line sent (default 16 MiB, the runtime's default
                           ``max_message_bytes``); a larger result fails the task instead
=========================  =======================================================================
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import importlib
import json
import os
import platform
import signal
import socket
import stat
import struct
import sys
import threading
import traceback
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import _exec, _json
from ..context import TaskInfo, _current, _task_info
from .._task import Task, registry

__all__ = ["main"]

#: Exit status after a ``fatal`` message (the runtime counts a startup failure).
EXIT_FATAL = 3
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
#: Largest line read from the runtime (its envelopes are far smaller).
MAX_READ = 512 * 1024 * 1024
MAX_CONCURRENCY = 1024


def log(text: str) -> None:
    """One line to stderr (the runtime logs it tagged with the agent)."""
    try:
        sys.stderr.write(f"taskrt worker: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _exit_now(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class _StartError(Exception):
    """A problem of the worker's environment, reported as ``fatal``."""


@dataclass(frozen=True)
class _Config:
    fd: int
    modules: list[str]
    concurrency: int
    db_close: str
    max_message: int


def _int_env(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise _StartError(f"{name}: expected an integer {low} to {high}, got {raw[:50]!r}")
    return value


def _fd_from_env() -> int:
    raw = os.environ.get("RT_WORKER_FD")
    if raw is None:
        raise _StartError("RT_WORKER_FD is not set (this module is started by the runtime)")
    try:
        fd = int(raw)
    except ValueError:
        raise _StartError(f"RT_WORKER_FD: expected a file descriptor number, got {raw[:50]!r}") from None
    if not 0 <= fd <= 1 << 20:
        raise _StartError(f"RT_WORKER_FD: {fd} is not a file descriptor number")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise _StartError(f"RT_WORKER_FD: {fd} is not open ({exc.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise _StartError(f"RT_WORKER_FD: {fd} is not a socket")
    return fd


def _config(fd: int) -> _Config:
    modules = [m.strip() for m in os.environ.get("RT_WORKER_MODULES", "").split(",") if m.strip()]
    db_close = os.environ.get("RT_WORKER_DB_CLOSE", "").strip() or "stale"
    if db_close not in ("stale", "always"):
        raise _StartError(f"RT_WORKER_DB_CLOSE: expected `stale` or `always`, got {db_close[:50]!r}")
    return _Config(
        fd=fd,
        modules=modules,
        concurrency=_int_env("RT_WORKER_CONCURRENCY", 1, 1, MAX_CONCURRENCY),
        db_close=db_close,
        max_message=_int_env("RT_WORKER_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE, 1024, 1 << 40),
    )


# ---- messages -----------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> bytes:
    return _json.dumps(message).encode("utf-8") + b"\n"


def fatal_message(exc: BaseException) -> dict[str, Any]:
    failure = _exec.failure("permanent", exc)
    error = failure.to_json()
    return {"t": "fatal", "error": {k: error[k] for k in ("type", "message", "traceback")}}


def done_message(id: str, value: Any, failure: _exec.Failure | None, max_message: int) -> bytes:
    """The ``done`` line of a task; a result with no JSON form, or too large a line, is a
    permanent failure instead."""
    if failure is None:
        text, failure = _exec.encode_result(value)
        if failure is None:
            line = (
                '{"t":"done","id":' + _json.dumps(id) + ',"ok":true,"result":' + str(text) + "}\n"
            ).encode("utf-8")
            if len(line) <= max_message:
                return line
            failure = _exec.simple_failure(
                "permanent",
                "ResultTooLarge",
                f"result is {len(line)} bytes of JSON, over the worker's limit of {max_message} "
                "bytes for one message (RT_WORKER_MAX_MESSAGE_BYTES)",
            )
    line = encode({"t": "done", "id": id, "ok": False, "error": failure.to_json()})
    if len(line) > max_message:  # only a huge type name or id could do it
        small = _exec.simple_failure("permanent", failure.type[:100], failure.message[:1000])
        line = encode({"t": "done", "id": id, "ok": False, "error": small.to_json()})
    return line


@dataclass(slots=True)
class Run:
    """A checked ``run`` message."""

    id: str
    task: str
    queue: str | None
    attempt: int
    args: list[Any]
    kwargs: dict[str, Any]
    soft_ms: int | None
    hard_ms: int | None
    trace_id: str | None
    root_id: str | None

    def info(self, task: Task[Any, Any]) -> TaskInfo:
        soft = time.monotonic() + self.soft_ms / 1000 if self.soft_ms is not None else None
        return _task_info(self.id, task.name, self.queue, self.attempt, soft, self.trace_id, self.root_id)

    @property
    def soft(self) -> float | None:
        return None if self.soft_ms is None else self.soft_ms / 1000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_run(msg: dict[str, Any]) -> Run:
    """A ``run`` message, checked (``ValueError`` naming the field)."""
    # What the runtime sends: exact JSON types, taken as they are. Anything else (a missing
    # or wrong field, or a subclass of a JSON type) is checked field by field, in order, by
    # _parse_run_checked, which names the first bad one.
    get = msg.get
    id_, task, queue, attempt = get("id"), get("task"), get("queue"), get("attempt")
    args, kwargs, soft_ms, hard_ms = get("args"), get("kwargs"), get("soft_ms"), get("hard_ms")
    trace_id, root_id = get("trace_id"), get("root_id")
    if (
        type(id_) is str
        and id_
        and type(task) is str
        and (queue is None or type(queue) is str)
        and (attempt is None or (type(attempt) is int and attempt >= 0))
        and (args is None or type(args) is list)
        and (kwargs is None or type(kwargs) is dict)
        and (soft_ms is None or (type(soft_ms) is int and soft_ms >= 0))
        and (hard_ms is None or (type(hard_ms) is int and hard_ms >= 0))
        and (trace_id is None or type(trace_id) is str)
        and (root_id is None or type(root_id) is str)
    ):
        return Run(
            id_, task, queue, 0 if attempt is None else attempt, [] if args is None else args,
            {} if kwargs is None else kwargs, soft_ms, hard_ms, trace_id, root_id,
        )
    return _parse_run_checked(msg)


def _parse_run_checked(msg: dict[str, Any]) -> Run:
    """:func:`parse_run` field by field: the ``ValueError`` names the first bad field."""

    def want(key: str, ok: Callable[[Any], bool], kind: str, default: Any = ..., none: bool = False) -> Any:
        if key not in msg or (none and msg[key] is None):
            if default is ...:
                raise ValueError(f"`{key}` is missing")
            return default
        value = msg[key]
        if not ok(value):
            raise ValueError(f"`{key}`: expected {kind}, got {type(value).__name__}")
        return value

    id_ = want("id", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    nat = "an integer >= 0"
    return Run(
        id=id_,
        task=want("task", lambda v: isinstance(v, str), "a string"),
        queue=want("queue", lambda v: isinstance(v, str), "a string", None, none=True),
        attempt=want("attempt", lambda v: _is_int(v) and v >= 0, nat, 0, none=True),
        args=want("args", lambda v: isinstance(v, list), "an array", [], none=True),
        kwargs=want("kwargs", lambda v: isinstance(v, dict), "an object", {}, none=True),
        soft_ms=want("soft_ms", lambda v: _is_int(v) and v >= 0, nat, None, none=True),
        hard_ms=want("hard_ms", lambda v: _is_int(v) and v >= 0, nat, None, none=True),
        trace_id=want("trace_id", lambda v: isinstance(v, str), "a string", None, none=True),
        root_id=want("root_id", lambda v: isinstance(v, str), "a string", None, none=True),
    )


def _lookup(name: str) -> Task[Any, Any] | _exec.Failure:
    found = registry.get(name)
    if found is not None:
        return found
    known = ", ".join(sorted(registry)) or "none"
    return _exec.simple_failure(
        "permanent", "NotRegistered", f"no task named `{name}` in this worker (registered: {known})"
    )


#: json's parser of one value at an index (what ``json.loads`` runs between its checks).
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(text: str) -> Any:
    """``json.loads(text)``, without its checks around the parse for a line that is one JSON
    value from its first character to its last (any other goes through ``json.loads``)."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:  # not a value at the first character (whitespace, a BOM, ...)
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    return value


def _incoming(line: bytes) -> Run | tuple[str, str] | None:
    """A ``run`` to do, ``(id, why)`` for a run that cannot be done, or ``None`` (logged)."""
    try:
        msg = _loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        log(f"ignoring a line that is not JSON ({exc}): {line[:200]!r}")
        return None
    if not isinstance(msg, dict):
        log(f"ignoring a message that is not a JSON object: {line[:200]!r}")
        return None
    kind = msg.get("t")
    if kind != "run":
        log(f"ignoring a message of unknown type {str(kind)[:100]!r}")
        return None
    try:
        return parse_run(msg)
    except ValueError as exc:
        id_ = msg.get("id")
        if isinstance(id_, str) and id_:
            return (id_, f"bad run message: {exc}")
        log(f"ignoring a run message without an id ({exc})")
        return None


# ---- Django -------------------------------------------------------------------------------


class _Db:
    """Django's connection handling around each task (a no-op without Django)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.active = False

    def setup(self) -> None:
        if not os.environ.get("DJANGO_SETTINGS_MODULE"):
            return
        django: Any = importlib.import_module("django")  # not a dependency: no stubs
        django.setup()
        self.db: Any = importlib.import_module("django.db")
        self.active = True

    def close(self, when: str) -> None:
        if not self.active:
            return
        try:
            if self.mode == "always":
                self.db.connections.close_all()
            else:
                self.db.close_old_connections()
        except Exception as exc:  # noqa: BLE001 - a closing problem must not fail the task
            log(f"closing database connections {when} the task failed: {type(exc).__name__}: {exc}")


# ---- the protocol socket ------------------------------------------------------------------


class Channel:
    """The socket, blocking: whole lines in, whole lines out (one writer at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.scanned = 0
        self.lock = threading.Lock()
        # A blocking recv() gives up after a second without data (EAGAIN), so the SIGTERM
        # handler runs: a signal landing just before the process enters recv() would
        # otherwise wait for the next line (CPython runs handlers between bytecodes).
        # Sends keep blocking.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 1, 0))

    def send(self, line: bytes) -> None:
        with self.lock:
            self.sock.sendall(line)

    def read_line(self) -> bytes | None:
        """The next line without its newline; ``None`` at EOF."""
        while True:
            at = self.buf.find(b"\n", self.scanned)
            if at >= 0:
                line = bytes(self.buf[:at])
                del self.buf[: at + 1]
                self.scanned = 0
                return line
            self.scanned = len(self.buf)
            if len(self.buf) > MAX_READ:
                raise OverflowError(f"a line from the runtime is over {MAX_READ} bytes")
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                continue  # SO_RCVTIMEO: pending signal handlers run here
            if not chunk:
                if self.buf:
                    log(f"EOF in the middle of a line ({len(self.buf)} bytes dropped)")
                return None
            self.buf += chunk


# ---- start --------------------------------------------------------------------------------


def _start(cfg: _Config, db: _Db) -> None:
    """Django, then the modules: anything raised here is ``fatal``."""
    db.setup()
    for name in cfg.modules:
        importlib.import_module(name)


def main() -> int:
    try:
        fd = _fd_from_env()
    except _StartError as exc:
        log(str(exc))
        return EXIT_FATAL
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        log(f"RT_WORKER_FD: {fd} is not an AF_UNIX stream socket")
        return EXIT_FATAL
    sock.setblocking(True)
    channel = Channel(sock)
    signal.signal(signal.SIGTERM, lambda signum, frame: _exit_now(0))
    # The runtime sends SIGUSR2 just before it SIGKILLs the process at a task's hard limit: the
    # stacks go to stderr (its log) from C, even while the task is stuck in a long C call. Set
    # once here: arming a timer per task (dump_traceback_later) starts a thread per task.
    faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
    try:
        cfg = _config(fd)
        db = _Db(cfg.db_close)
        _start(cfg, db)
    except BaseException as exc:  # noqa: BLE001 - every start failure is reported
        log("start failed:\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        try:
            channel.send(encode(fatal_message(exc)))
        except OSError as send_error:
            log(f"could not send `fatal`: {send_error}")
        return EXIT_FATAL
    names = sorted(registry)
    log_line = (
        f"taskrt worker pid={os.getpid()} modules={','.join(cfg.modules) or '-'} "
        f"tasks={len(names)} concurrency={cfg.concurrency}"
    )
    sys.stderr.write(log_line + "\n")
    sys.stderr.flush()
    ready = {
        "t": "ready",
        "pid": os.getpid(),
        "python": platform.python_version(),
        "tasks": names,
        "concurrency": cfg.concurrency,
    }
    try:
        channel.send(encode(ready))
        if cfg.concurrency == 1:
            _serve_one(channel, cfg, db)
        else:
            asyncio.run(_serve_many(sock, cfg, db))
    except (OSError, OverflowError) as exc:
        log(f"protocol channel failed: {exc}")
        return 1
    return 0


# ---- concurrency 1 ------------------------------------------------------------------------


def _serve_one(channel: Channel, cfg: _Config, db: _Db) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        _serve_lines(channel, loop, cfg, db)
    finally:
        loop.close()


def _serve_lines(channel: Channel, loop: asyncio.AbstractEventLoop, cfg: _Config, db: _Db) -> None:
    while True:
        line = channel.read_line()
        if line is None:
            return
        incoming = _incoming(line)
        if incoming is None:
            continue
        if isinstance(incoming, tuple):
            id_, why = incoming
            failure = _exec.simple_failure("permanent", "ProtocolError", why)
            channel.send(done_message(id_, None, failure, cfg.max_message))
            continue
        channel.send(_run_one(incoming, loop, cfg, db))


def _run_one(run: Run, loop: asyncio.AbstractEventLoop, cfg: _Config, db: _Db) -> bytes:
    task = _lookup(run.task)
    if isinstance(task, _exec.Failure):
        return done_message(run.id, None, task, cfg.max_message)
    value: Any = None
    failure: _exec.Failure | None = None
    if db.active:
        db.close("before")
    token = _current.set(run.info(task))
    try:
        args, kwargs = _exec.call_args(task, run.args, run.kwargs)
        if task.is_async:
            coro = task.fn(*args, **kwargs)
            value = loop.run_until_complete(_exec.with_soft_cancel(coro, run.soft))
        elif run.soft_ms is None:
            value = task.fn(*args, **kwargs)
        else:
            # Disarmed on the way out with SIGALRM blocked: it cannot fire past this block.
            with _exec.soft_alarm(run.soft):
                value = task.fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - the policy decides
        failure = _exec.classify(task, exc, run.attempt)
    finally:
        _current.reset(token)
        if db.active:
            db.close("after")
    return done_message(run.id, value, failure, cfg.max_message)


# ---- concurrency N ------------------------------------------------------------------------


async def _serve_many(sock: socket.socket, cfg: _Config, db: _Db) -> None:
    loop = asyncio.get_running_loop()
    # Through the loop's wake-up fd: a SIGTERM that lands while the loop is about to wait is
    # not left pending until the next line.
    loop.add_signal_handler(signal.SIGTERM, _exit_now, 0)
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_READ)
    write_lock = asyncio.Lock()
    slots = asyncio.Semaphore(cfg.concurrency)
    pool = concurrent.futures.ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="taskrt-task")
    running: set[asyncio.Task[None]] = set()

    async def send(line: bytes) -> None:
        async with write_lock:
            writer.write(line)
            await writer.drain()

    async def handle(run: Run) -> None:
        async with slots:
            try:
                line = await _run_many(run, loop, pool, cfg, db)
            except Exception as exc:  # noqa: BLE001 - a bug here must not lose the task
                log(f"task {run.id}: worker error: {exc!r}")
                failure = _exec.simple_failure("permanent", "WorkerError", f"worker error: {exc!r}")
                line = done_message(run.id, None, failure, cfg.max_message)
            try:
                await send(line)
            except OSError as exc:
                log(f"task {run.id}: could not send `done`: {exc}")

    while True:
        try:
            line = await reader.readline()
        except ValueError as exc:  # over the limit
            raise OverflowError(f"a line from the runtime is over {MAX_READ} bytes") from exc
        if not line:
            break
        if not line.endswith(b"\n"):
            log(f"EOF in the middle of a line ({len(line)} bytes dropped)")
            break
        incoming = _incoming(line[:-1])
        if incoming is None:
            continue
        if isinstance(incoming, tuple):
            id_, why = incoming
            failure = _exec.simple_failure("permanent", "ProtocolError", why)
            await send(done_message(id_, None, failure, cfg.max_message))
            continue
        job = asyncio.create_task(handle(incoming))
        running.add(job)
        job.add_done_callback(running.discard)
    # EOF: the runtime is gone; nothing more will be read or sent.
    _exit_now(0)


async def _run_many(
    run: Run,
    loop: asyncio.AbstractEventLoop,
    pool: concurrent.futures.ThreadPoolExecutor,
    cfg: _Config,
    db: _Db,
) -> bytes:
    task = _lookup(run.task)
    if isinstance(task, _exec.Failure):
        return done_message(run.id, None, task, cfg.max_message)
    info = run.info(task)
    value: Any = None
    failure: _exec.Failure | None = None
    if task.is_async:

        async def attempt() -> Any:
            _current.set(info)  # this asyncio task's own context
            args, kwargs = _exec.call_args(task, run.args, run.kwargs)
            return await _exec.with_soft_cancel(task.fn(*args, **kwargs), run.soft)

        try:
            value = await asyncio.create_task(attempt())
        except BaseException as exc:  # noqa: BLE001 - the policy decides
            if isinstance(exc, asyncio.CancelledError) and _cancelling():
                raise
            failure = _exec.classify(task, exc, run.attempt)
    else:

        def call() -> Any:
            token = _current.set(info)
            db.close("before")
            try:
                args, kwargs = _exec.call_args(task, run.args, run.kwargs)
                return task.fn(*args, **kwargs)
            finally:
                db.close("after")
                _current.reset(token)

        try:
            value = await loop.run_in_executor(pool, call)
        except BaseException as exc:  # noqa: BLE001 - the policy decides
            if isinstance(exc, asyncio.CancelledError) and _cancelling():
                raise
            failure = _exec.classify(task, exc, run.attempt)
    return done_message(run.id, value, failure, cfg.max_message)


def _cancelling() -> bool:
    """Whether the current asyncio task itself is being cancelled (Python 3.11+; before,
    a cancellation that reaches here is the task's own)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return bool(cancelling()) if callable(cancelling) else False
