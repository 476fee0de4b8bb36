"""The chat app's task, run by the runtime's Python workers (`[workers.django]` in
actors.toml): each worker process runs `django.setup()` once (DJANGO_SETTINGS_MODULE is in
its env), imports this module, and closes stale database connections around every task.

The view enqueues it with `process_chat_message.delay(conversation_id, message)` exactly as
it did with Celery's `@shared_task`.
"""

from __future__ import annotations

import time

from django.conf import settings
from django.db import transaction

from taskrt import Permanent, Retry, current_task, task

from .models import Message


class LLMOverloaded(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"LLM overloaded, retry after {retry_after:g}s")
        self.retry_after = retry_after


def fake_llm(history: list[str], attempt: int) -> str:
    """A blocking LLM call (a sleep). A message with "[busy]" finds it overloaded on the
    first attempt, so a retry can be seen."""
    if "[busy]" in history[-1] and attempt == 0:
        raise LLMOverloaded(retry_after=1.0)
    time.sleep(settings.CHAT_FAKE_LLM_SECONDS)
    return f"Reply to message {len(history)} of this conversation ({len(history[-1].split())} words)."


@task(name="process_chat_message", queue="chat", max_retries=3)
def process_chat_message(conversation_id: str, message: str) -> dict[str, object]:
    """Answer the user's `message` in the conversation and store the reply."""
    info = current_task()
    task_id = info.id if info is not None else ""
    attempt = info.attempt if info is not None else 0
    history = list(
        Message.objects.filter(conversation_id=conversation_id, role=Message.USER)
        .values_list("text", flat=True)
    )
    if not history:
        # Nothing to answer: retrying cannot make the conversation exist.
        raise Permanent(f"conversation {conversation_id!r} has no user message")
    if history[-1] != message:
        history.append(message)
    try:
        reply = fake_llm(history, attempt)
    except LLMOverloaded as exc:
        raise Retry(after=exc.retry_after) from exc
    # One reply per task, even if an attempt is run again after it saved (the process was
    # killed before it reported): the task id is the same for every attempt.
    with transaction.atomic():
        saved, _ = Message.objects.get_or_create(
            conversation_id=conversation_id,
            role=Message.ASSISTANT,
            task_id=task_id or f"local-{time.time_ns()}",
            defaults={"text": reply},
        )
    return {
        "conversation_id": conversation_id,
        "reply": saved.text,
        "message_id": saved.id,
        "attempt": attempt,
    }
