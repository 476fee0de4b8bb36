"""Enqueue the chat system's tasks with `.delay()` and read their results back.

Run it while a node runs examples/python/actors.toml (see README.md beside this file):

    python examples/python/producer.py            # the node at $TASKRT_URL, else 127.0.0.1:7070

It is what a Django view or a script does with Celery's `.delay()` / `AsyncResult.get()`,
with `taskrt` instead: the same calls, a node of the runtime behind them.
"""

from __future__ import annotations

import os
import sys
import time

import taskrt
from taskrt import TaskFailed

from tasks import process_chat_message, process_chat_message_async, send_notification, zep_memory_write

WAIT = 60.0  # seconds a result is waited for


def show(label: str, handle: taskrt.TaskHandle) -> bool:
    """Waits for the task and prints its outcome; True if it succeeded."""
    try:
        result = handle.get(timeout=WAIT)
    except TaskFailed as failed:
        attempts = handle.status().attempts
        # The runtime's error: the kind and the exception's line, then the traceback.
        reason = (failed.error or "").splitlines()[0]
        print(f"  {label}: failed for good after {attempts} attempt(s): {reason}")
        return False
    if isinstance(result, dict) and "assistant" in result:
        result = f"{result['assistant']!r} (worker pid {result.get('worker_pid')})"
    print(f"  {label}: {result}  (attempts: {handle.status().attempts})")
    return True


def main() -> int:
    # The node: env TASKRT_URL (and TASKRT_TOKEN), else http://127.0.0.1:7070; or in code:
    # taskrt.configure(url="http://127.0.0.1:7070", token=None)
    print(f"node: {os.environ.get('TASKRT_URL', 'http://127.0.0.1:7070')}")
    started = time.monotonic()

    print("chat turns (queue chat; each linked to zep_memory_write and send_notification):")
    turns = [
        ("alice-1", process_chat_message.delay("alice-1", "Which flats near the sea are free in May?")),
        ("bob-2", process_chat_message.delay("bob-2", "[busy] Is the one in Kyrenia still free?")),
        ("alice-3", process_chat_message_async.delay("alice-3", "And with a garden?")),
        ("carol-4", process_chat_message.delay("carol-4", "Hello!")),
    ]
    ok = all([show(label, handle) for label, handle in turns])

    print("bad input fails for good, without a retry (Permanent):")
    empty = process_chat_message.delay("bob-5", "   ")
    expected_failures = [not show("empty message", empty)]
    nobody = send_notification.delay({"conversation_id": "carol-4"})
    expected_failures.append(not show("notify a user without a device", nobody))

    print("a burst of memory writes against Zep's rate limit (Retry(after=…) when it says 429):")
    writes = [
        zep_memory_write.delay({"conversation_id": "alice-1", "user": f"q{n}", "assistant": f"a{n}"})
        for n in range(12)
    ]
    retried = 0
    for handle in writes:
        handle.get(timeout=WAIT)
        retried += handle.status().attempts > 1
    print(f"  12 writes stored, {retried} of them after a Retry(after=…)")

    print(f"done in {time.monotonic() - started:.1f}s")
    return 0 if ok and all(expected_failures) else 1


if __name__ == "__main__":
    sys.exit(main())
