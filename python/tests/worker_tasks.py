"""Tasks the worker tests run (imported by ``python -m taskrt.worker`` as RT_WORKER_MODULES)."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time
from typing import Any

import taskrt
from taskrt import Permanent, Retry, SoftTimeLimitExceeded, task


class Declined(Exception):
    pass


@task(name="add")
def add(a: int, b: int = 0) -> int:
    return a + b


@task(name="echo")
def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


@task(name="whoami")
def whoami() -> dict[str, Any]:
    info = taskrt.current_task()
    assert info is not None
    return {
        "id": info.id, "name": info.name, "queue": info.queue, "attempt": info.attempt,
        "thread": threading.current_thread().name,
    }


@task(name="awhoami")
async def awhoami(delay: float = 0.0) -> dict[str, Any]:
    started = time.monotonic()
    await asyncio.sleep(delay)
    info = taskrt.current_task()
    assert info is not None
    return {"id": info.id, "attempt": info.attempt, "started": started, "ended": time.monotonic()}


@task(name="retry_later")
def retry_later(seconds: float) -> None:
    raise Retry(after=seconds)


@task(name="retry_from")
def retry_from() -> None:
    try:
        raise ConnectionError("smtp down")
    except ConnectionError:
        raise Retry()


@task(name="boom")
def boom(message: str = "boom") -> None:
    raise ValueError(message)


@task(name="give_up")
def give_up() -> None:
    raise Permanent("card declined")


@task(name="declined", permanent_for=(Declined,))
def declined() -> None:
    raise Declined("no funds")


@task(name="only_conn", retry_for=(ConnectionError,))
def only_conn(kind: str) -> None:
    if kind == "conn":
        raise ConnectionError("reset")
    raise KeyError("missing")


@task(name="two_retries", max_retries=2)
def two_retries() -> None:
    raise ValueError("flaky")


@task(name="unlimited", max_retries=None)
def unlimited() -> None:
    raise ValueError("flaky")


@task(name="a_set")
def a_set() -> set[int]:
    return {1, 2}


@task(name="nested_bad")
def nested_bad() -> dict[str, Any]:
    return {"ok": [1, 2, object()]}


@task(name="not_a_number")
def not_a_number() -> float:
    return math.nan


@task(name="surrogate")
def surrogate() -> str:
    return "bad \udc80 name"


@task(name="big")
def big(n: int) -> str:
    return "x" * n


@task(name="sleepy")
def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@task(name="busy")
def busy(seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "done"


@task(name="cleans_up")
def cleans_up(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "slept"


@task(name="asleepy")
async def asleepy(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@task(name="chatty")
def chatty() -> str:
    print('{"t":"done","id":"fake","ok":true,"result":"from print"}')
    print("hello from the task", file=sys.stderr)
    sys.stdout.write("no newline at the end")
    return "quiet result"


@task(name="inheritable")
def inheritable() -> bool:
    return os.get_inheritable(int(os.environ["RT_WORKER_FD"]))


@task(name="modules")
def modules() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in ("httpx", "pytest", "httpcore"))


@task(name="exits")
def exits() -> None:
    sys.exit(4)
