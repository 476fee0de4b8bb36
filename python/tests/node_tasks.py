"""Tasks the integration test (test_node.py) runs on the real runtime's Python worker pool."""

from __future__ import annotations

import asyncio
from typing import Any

import taskrt
from taskrt import Permanent, task


@task(name="nd_add")
def add(a: int, b: int) -> int:
    return a + b


@task(name="nd_who")
def who() -> dict[str, Any]:
    info = taskrt.current_task()
    assert info is not None
    return {"id": info.id, "name": info.name, "queue": info.queue, "attempt": info.attempt}


@task(name="nd_async")
async def async_double(x: int) -> int:
    await asyncio.sleep(0.01)
    return 2 * x


@task(name="nd_fail")
def fail() -> None:
    raise Permanent("order 42 does not exist")
