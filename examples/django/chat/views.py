"""POST /chat/<conversation_id>/messages enqueues the assistant's turn; GET /tasks/<id> reads
it back by id with `taskrt.handle(id)` (Celery's `AsyncResult(id)`): the node's GET /tasks/{id}
through taskrt's default client (configured in chat/apps.py), or the eager run in tests."""

from __future__ import annotations

import json
import logging
import re

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

import taskrt

from .models import Message
from .tasks import process_chat_message

log = logging.getLogger(__name__)

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_MESSAGE_CHARS = 4000
MAX_BODY_BYTES = 64 * 1024


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


@csrf_exempt  # an API endpoint of the example; put your own auth in front of it
@require_POST
def post_message(request: HttpRequest, conversation_id: str) -> JsonResponse:
    if not CONVERSATION_ID.fullmatch(conversation_id):
        return _error(400, "conversation_id: 1 to 64 of A-Z a-z 0-9 _ -")
    if len(request.body) > MAX_BODY_BYTES:
        return _error(413, f"body: over {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        return _error(400, 'body: expected JSON such as {"text": "Hello"}')
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        return _error(400, "text: expected a non-empty string")
    if len(text) > MAX_MESSAGE_CHARS:
        return _error(400, f"text: {len(text)} characters, over {MAX_MESSAGE_CHARS}")

    saved = Message.objects.create(conversation_id=conversation_id, role=Message.USER, text=text)
    # (Under ATOMIC_REQUESTS, enqueue in transaction.on_commit so the worker sees the row.)
    try:
        handle = process_chat_message.delay(conversation_id, text)
    except taskrt.Unreachable as exc:
        log.error("cannot enqueue: %s", exc)
        return _error(503, "the task runtime cannot be reached; try again")
    saved.task_id = handle.id
    saved.save(update_fields=["task_id"])
    return JsonResponse({"task_id": handle.id, "message_id": saved.id}, status=202)


@require_GET
def task_status(request: HttpRequest, task_id: str) -> JsonResponse:
    try:
        record = taskrt.handle(task_id).status()
    except (TypeError, ValueError) as exc:  # an id the runtime would refuse, checked here
        return _error(400, str(exc))
    except taskrt.NotFound:
        return _error(404, f"no task {task_id} (unknown, or its result expired)")
    except taskrt.Unreachable as exc:
        log.error("cannot read task %s: %s", task_id, exc)
        return _error(503, "the task runtime cannot be reached; try again")
    answer: dict[str, object] = {
        "id": record.id,
        "task": record.task,
        "state": record.state,
        "attempts": record.attempts,
        "result": record.result,
    }
    if record.error:
        # The first line only: the traceback stays in the runtime's logs, not in the answer.
        answer["error"] = record.error.splitlines()[0]
    return JsonResponse(answer)
