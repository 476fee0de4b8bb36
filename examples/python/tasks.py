"""The tasks of a Django chat system that moved off Celery, as `taskrt` tasks.

The runtime imports this module once in each worker process (`[workers.app] modules` in
actors.toml) and runs the functions below when their tasks come off the queues; a producer
(producer.py, a Django view) imports it too, to enqueue them with `.delay()`.

The LLM, Zep and the push service are fakes (sleeps and counters) so that the example runs
anywhere; what is real is how the tasks tell the runtime what to do next:

- return a JSON value: the task succeeded, the value is its result (and, through `link` in
  actors.toml, the first argument of the tasks linked to it);
- `raise Retry(after=seconds)`: try again, not before then (a rate-limited service said when);
- `raise Permanent("...")`: fail for good, no retry (bad input: retrying cannot help);
- any other exception: retried with the task's backoff, up to `max_retries`;
- `SoftTimeLimitExceeded` is raised into the task at its soft time limit: catch it to answer
  something before the hard limit kills the process.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile
import time

from taskrt import Permanent, Retry, SoftTimeLimitExceeded, current_task, task

#: Seconds the fake LLM takes to answer (real ones take 30-80 s under load).
LLM_SECONDS = float(os.environ.get("CHAT_FAKE_LLM_SECONDS", "0.5"))
#: Longest user message accepted.
MAX_MESSAGE_CHARS = 4000
FALLBACK_REPLY = "Sorry, that took too long. Could you ask again?"


class LLMOverloaded(Exception):
    """The LLM answered 429 (its Retry-After in `retry_after`)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"LLM overloaded, retry after {retry_after:g}s")
        self.retry_after = retry_after


class ZepRateLimited(Exception):
    """Zep answered 429 (its Retry-After in `retry_after`)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"Zep rate limit, retry after {retry_after:g}s")
        self.retry_after = retry_after


# ---- fakes of the outside services ------------------------------------------------------------


def fake_llm(message: str, attempt: int) -> str:
    """A blocking LLM call. A message containing "[busy]" finds the LLM overloaded on its
    first attempt (so the example shows a retry)."""
    if "[busy]" in message and attempt == 0:
        raise LLMOverloaded(retry_after=1.0)
    time.sleep(LLM_SECONDS)
    return f"You said {len(message.split())} words; here is a thoughtful answer."


async def fake_llm_async(message: str, attempt: int) -> str:
    """The same call through an async SDK: the process is free for other async tasks while
    it waits (with `concurrency` > 1 on the worker pool)."""
    if "[busy]" in message and attempt == 0:
        raise LLMOverloaded(retry_after=1.0)
    await asyncio.sleep(LLM_SECONDS)
    return f"You said {len(message.split())} words; here is a thoughtful async answer."


class FakeZep:
    """Zep's memory API with its rate limit: `per_second` writes a second per API key, so
    shared by every worker process. The fake keeps that count in a file (under a lock), as
    the real service keeps it on its side."""

    def __init__(self, per_second: int, state: str) -> None:
        self.per_second = per_second
        self.state = state

    def add_messages(self, session_id: str, messages: list[dict[str, str]]) -> None:
        with open(self.state, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
            f.seek(0)
            window, _, count = f.read().partition(" ")
            now = time.time()
            second = int(now)
            used = int(count) if window == str(second) and count.isdigit() else 0
            if used >= self.per_second:
                raise ZepRateLimited(retry_after=round(second + 1 - now + 0.05, 3))
            f.seek(0)
            f.truncate()
            f.write(f"{second} {used + 1}")
        # A real client would POST `messages` to /sessions/{session_id}/memory here.


zep = FakeZep(
    per_second=int(os.environ.get("CHAT_FAKE_ZEP_PER_SECOND", "4")),
    state=os.path.join(tempfile.gettempdir(), f"taskrt-example-fake-zep-{os.getuid()}"),
)

#: Users who installed the app (anyone else has no device to notify).
DEVICES = {"alice": "device-a1", "bob": "device-b7"}


def _check_message(conversation_id: str, message: str) -> None:
    """Bad input fails for good: no retry makes an empty message valid."""
    if not isinstance(conversation_id, str) or not conversation_id:
        raise Permanent(f"conversation_id must be a non-empty string, got {conversation_id!r}")
    if not isinstance(message, str) or not message.strip():
        raise Permanent(f"conversation {conversation_id}: the message is empty")
    if len(message) > MAX_MESSAGE_CHARS:
        raise Permanent(
            f"conversation {conversation_id}: the message is {len(message)} characters, "
            f"over {MAX_MESSAGE_CHARS}"
        )


def _attempt() -> int:
    info = current_task()
    return info.attempt if info is not None else 0


# ---- the tasks ------------------------------------------------------------------------------


@task(name="process_chat_message", queue="chat")
def process_chat_message(conversation_id: str, message: str) -> dict[str, object]:
    """One turn of the assistant: ask the LLM, return the turn. Linked in actors.toml to
    `zep_memory_write` and `send_notification`, which get this result as their argument."""
    _check_message(conversation_id, message)
    started = time.monotonic()
    try:
        reply = fake_llm(message, _attempt())
    except LLMOverloaded as exc:
        # Retry when the LLM said, not at the policy's backoff.
        raise Retry(after=exc.retry_after) from exc
    except SoftTimeLimitExceeded:
        # The soft limit (queues.chat.soft_time_limit) came first: answer something now;
        # the hard limit would kill the process.
        reply = FALLBACK_REPLY
    print(f"conversation {conversation_id}: replied in {time.monotonic() - started:.2f}s")
    return {
        "conversation_id": conversation_id,
        "user": message,
        "assistant": reply,
        "worker_pid": os.getpid(),
    }


@task(name="process_chat_message_async", queue="chat")
async def process_chat_message_async(conversation_id: str, message: str) -> dict[str, object]:
    """The same turn as an `async def` task. At the soft limit its asyncio task is
    cancelled (it sees `CancelledError` at its next await) and the attempt is reported as
    a soft timeout."""
    _check_message(conversation_id, message)
    try:
        reply = await fake_llm_async(message, _attempt())
    except LLMOverloaded as exc:
        raise Retry(after=exc.retry_after) from exc
    return {
        "conversation_id": conversation_id,
        "user": message,
        "assistant": reply,
        "worker_pid": os.getpid(),
    }


@task(name="zep_memory_write", queue="memory", max_retries=10)
def zep_memory_write(turn: dict[str, str]) -> dict[str, object]:
    """Store a turn in the conversation's Zep memory. A 429 is retried after the Retry-After
    Zep gave; a turn without a conversation is bad input and fails for good."""
    conversation_id = turn.get("conversation_id") if isinstance(turn, dict) else None
    if not conversation_id:
        raise Permanent(f"zep_memory_write: not a chat turn: {turn!r:.200}")
    messages = [
        {"role": "user", "content": str(turn.get("user", ""))},
        {"role": "assistant", "content": str(turn.get("assistant", ""))},
    ]
    try:
        zep.add_messages(conversation_id, messages)
    except ZepRateLimited as exc:
        raise Retry(after=exc.retry_after) from exc
    return {"conversation_id": conversation_id, "stored": len(messages)}


@task(name="send_notification", queue="notifications")
def send_notification(turn: dict[str, str]) -> dict[str, object]:
    """Push "new reply" to the conversation's owner (conversation ids are `USER-N`). A user
    without a device cannot be notified, however often we try: `Permanent`."""
    conversation_id = str(turn.get("conversation_id", "")) if isinstance(turn, dict) else ""
    user = conversation_id.split("-", 1)[0]
    device = DEVICES.get(user)
    if device is None:
        raise Permanent(f"user {user!r} has no registered device")
    time.sleep(0.05)  # the push service's round trip
    return {"user": user, "device": device, "sent": True}
