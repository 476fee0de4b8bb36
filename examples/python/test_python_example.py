"""The example's tasks, eagerly (no node) and end to end on a real node running actors.toml.

    pytest examples/python          # from the repo's root, in a venv with taskrt[test] (httpx)

The end-to-end test needs the runtime binary: $TASKRT_RUNTIME_BIN, else `runtime` on PATH,
else target/debug/runtime of this repo; it is skipped without one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

import taskrt
from taskrt.pytest_plugin import start_node

import producer
import tasks

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(autouse=True)
def fast_llm(monkeypatch):
    monkeypatch.setattr(tasks, "LLM_SECONDS", 0.0)


def test_the_shipped_config_is_this_example():
    assert (REPO / "config" / "examples" / "python-workers.toml").read_text() == (
        HERE / "actors.toml"
    ).read_text(), "config/examples/python-workers.toml is a copy of examples/python/actors.toml"


def test_a_turn_is_answered_and_an_overloaded_llm_retried_when_it_says():
    with taskrt.eager() as session:
        ok = tasks.process_chat_message.delay("alice-1", "Hello there")
        busy = tasks.process_chat_message.delay("bob-2", "[busy] hello")

    assert ok.state == "succeeded" and ok.attempts == 1
    assert ok.result["conversation_id"] == "alice-1"
    assert ok.result["assistant"].startswith("You said 2 words")
    assert (busy.state, busy.attempts, busy.retries) == ("succeeded", 2, [1.0])
    assert len(session.by_task("process_chat_message")) == 2


def test_the_async_turn_runs_too():
    with taskrt.eager():
        turn = tasks.process_chat_message_async.delay("alice-3", "And with a garden?")
    assert turn.state == "succeeded"
    assert "async answer" in turn.result["assistant"]


@pytest.mark.parametrize(
    "args, says",
    [
        (("bob-5", "   "), "the message is empty"),
        (("bob-5", "x" * 4001), "4001 characters, over 4000"),
        (("", "hi"), "conversation_id must be a non-empty string"),
    ],
)
def test_bad_input_fails_for_good_at_once(args, says):
    with taskrt.eager(propagate=False):
        outcome = tasks.process_chat_message.delay(*args)
    assert (outcome.state, outcome.attempts) == ("dead", 1)
    assert isinstance(outcome.exception, taskrt.Permanent)
    assert says in outcome.error


def test_the_soft_limit_gets_the_fallback_reply(monkeypatch):
    monkeypatch.setattr(tasks, "LLM_SECONDS", 5.0)
    started = time.monotonic()
    with taskrt.eager(enforce_limits=True):
        turn = tasks.process_chat_message.apply_async(("alice-1", "slow"), soft_time_limit=0.2)
    assert turn.state == "succeeded"
    assert turn.result["assistant"] == tasks.FALLBACK_REPLY
    assert time.monotonic() - started < 3


def test_notifications_need_a_device_and_zep_429s_are_retried_after_what_zep_said(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(tasks, "zep", tasks.FakeZep(per_second=2, state=str(tmp_path / "zep")))
    with taskrt.eager(propagate=False):
        sent = tasks.send_notification.delay({"conversation_id": "alice-1"})
        nobody = tasks.send_notification.delay({"conversation_id": "carol-4"})
        # The eager mode retries at once (it records the delays asked, it does not sleep):
        # within one second the third write finds the limit, every retry too, until
        # max_retries=10 is spent — or the second turns.
        writes = [
            tasks.zep_memory_write.delay({"conversation_id": "alice-1", "user": "q", "assistant": "a"})
            for _ in range(3)
        ]
    assert sent.result == {"user": "alice", "device": "device-a1", "sent": True}
    assert (nobody.state, nobody.attempts) == ("dead", 1)
    assert "has no registered device" in nobody.error
    assert [w.state for w in writes[:2]] == ["succeeded", "succeeded"]
    third = writes[2]
    assert third.retries, "Zep's 429 became Retry(after=…)"
    assert all(0 < delay <= 1.05 for delay in third.retries), third.retries


def runtime_binary() -> str | None:
    given = os.environ.get("TASKRT_RUNTIME_BIN")
    if given:
        return given
    found = shutil.which("runtime")
    if found:
        return found
    built = REPO / "target" / "debug" / "runtime"
    return str(built) if built.exists() else None


def test_the_example_runs_on_a_real_node(tmp_path, monkeypatch):
    binary = runtime_binary()
    if binary is None:
        pytest.skip("no runtime binary: set TASKRT_RUNTIME_BIN, or cargo build --bin runtime")
    config = (HERE / "actors.toml").read_text()
    src = str(Path(taskrt.__file__).resolve().parents[1])
    for old, new in [
        ('cwd = "examples/python"', f"cwd = {json.dumps(str(HERE))}"),
        ('python = "python3"', f"python = {json.dumps(sys.executable)}"),
        ('PYTHONPATH = "../../python/src"', f"PYTHONPATH = {json.dumps(src)}"),
        ('CHAT_FAKE_LLM_SECONDS = "0.5"', 'CHAT_FAKE_LLM_SECONDS = "0.1"'),
        ("processes = 8", "processes = 4"),  # 2 cores: fewer interpreters to start
    ]:
        assert old in config, f"actors.toml no longer has {old!r}: update this test"
        config = config.replace(old, new)
    node = start_node(binary, config, tmp_path / "node")
    monkeypatch.setenv("TASKRT_URL", node.url)
    taskrt.configure(url=None)  # the default client is made again, from TASKRT_URL
    try:
        assert producer.main() == 0, node.log()[-3000:]

        # The turns' links ran: each turn's memory write and notification (carol has no
        # device: her linked notification is dead, as is the producer's direct one).
        def found(task: str, state: str) -> int:
            answer = httpx.get(f"{node.url}/tasks", params={"task": task, "state": state, "limit": 200})
            answer.raise_for_status()
            return len(answer.json()["tasks"])

        deadline = time.monotonic() + 30
        while True:
            counts = (
                found("zep_memory_write", "succeeded"),
                found("send_notification", "succeeded"),
                found("send_notification", "dead"),
            )
            if counts == (4 + 12, 3, 2) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert counts == (16, 3, 2), node.log()[-3000:]
    finally:
        taskrt.configure(url=None)
        node.stop()
