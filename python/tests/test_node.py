"""One test against the real ``runtime`` binary (the ``taskrt_node`` fixture): Python code
enqueues with ``.delay()``, the node runs the task on its Python worker pool
(``python -m taskrt.worker``), the client reads the result; also a built-in native task,
idempotency, revocation and the node's refusals. Skipped without a runtime binary
(``TASKRT_RUNTIME_BIN``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import taskrt
from taskrt import ApiError, NotFound, TaskFailed
from taskrt.pytest_plugin import TOKEN_ENV, NodeClient

import node_tasks

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


@pytest.fixture
def taskrt_config() -> str:
    return f"""
[runtime]
shutdown_grace = "3s"

[broker]
url = "memory://"

[http]
bind = "127.0.0.1:0"
admin_token_env = "{TOKEN_ENV}"

[queues.default]
concurrency = 2

[workers.py]
python = "{sys.executable}"
modules = ["node_tasks"]
processes = 1
spares = 0
env = {{ PYTHONPATH = "{SRC}:{HERE}" }}
startup_timeout = "30s"
claim_timeout = "30s"

[tasks.nd_add]
queue = "default"
handler = {{ kind = "python", workers = "py" }}

[tasks.nd_who]
queue = "default"
handler = {{ kind = "python", workers = "py" }}

[tasks.nd_async]
queue = "default"
handler = {{ kind = "python", workers = "py" }}

[tasks.nd_fail]
queue = "default"
handler = {{ kind = "python", workers = "py" }}

[tasks.rt_echo]
queue = "default"
handler = {{ kind = "native" }}
"""


def test_python_tasks_through_a_real_node(taskrt_node: NodeClient) -> None:
    taskrt.configure(client=taskrt_node)

    # Python -> node -> Python worker -> result
    handle = node_tasks.add.delay(2, 3)
    assert isinstance(handle, taskrt.TaskHandle) and not handle.duplicate
    assert handle.get(timeout=60) == 5
    record = handle.status()
    assert (record.state, record.attempts, record.queue, record.celery_state) == (
        "succeeded", 1, "default", "SUCCESS")
    assert record.enqueued_at is not None and record.started_at is not None

    who = node_tasks.who.apply_async(id="who-1")
    assert who.get(timeout=30) == {"id": "who-1", "name": "nd_who", "queue": "default", "attempt": 0}
    assert node_tasks.async_double.delay(21).get(timeout=30) == 42

    # a permanent failure: dead at once, the exception in the record
    with pytest.raises(TaskFailed) as failed:
        node_tasks.fail.delay().get(timeout=30)
    assert failed.value.error is not None
    assert "Permanent: order 42 does not exist" in failed.value.error
    assert "Traceback" in failed.value.error
    assert failed.value.record.attempts == 1

    # a built-in native task, and a batch
    assert taskrt_node.enqueue("rt_echo", ["hi"], {"k": 1}).get(timeout=30) == {
        "args": ["hi"], "kwargs": {"k": 1}}
    batch = taskrt_node.enqueue_many([node_tasks.add.s(1, 1), {"task": "nd_add", "args": [2, 2]}])
    assert [h.get(timeout=30) for h in batch] == [2, 4]

    # idempotency: the second enqueue is a duplicate of the first
    first = node_tasks.add.apply_async((1, 2), idempotency_key="order-7")
    second = node_tasks.add.apply_async((1, 2), idempotency_key="order-7")
    assert second.duplicate and second.id == first.id

    # revoking a scheduled task
    later = taskrt_node.enqueue("nd_add", [1, 1], countdown=300)
    assert later.state == "scheduled"
    assert later.revoke().was == "scheduled"
    with pytest.raises(TaskFailed, match="revoked"):
        later.get(timeout=5)
    assert later.status().celery_state == "REVOKED"
    with pytest.raises(ApiError) as ended:
        taskrt_node.revoke(handle.id)
    assert ended.value.status == 409

    # the node's refusals
    with pytest.raises(ApiError) as unknown:
        taskrt_node.enqueue("no_such_task")
    assert unknown.value.status == 400 and "no such task `no_such_task`" in unknown.value.message
    with pytest.raises(NotFound):
        taskrt_node.status("never-enqueued")
    with taskrt.Client(taskrt_node.node.url, token="zz-not-the-token") as intruder:
        with pytest.raises(ApiError) as refused:
            intruder.enqueue("nd_add", [1, 2])
    assert refused.value.status == 401
    assert "zz-not-the-token" not in str(refused.value)
