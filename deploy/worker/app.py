"""The example worker of deploy/: the internal task endpoints of a Django / FastAPI app, for
the `http` tasks of deploy/actors.toml. Python's standard library only, so it runs in a bare
`python:3-slim` container (compose, Kubernetes) or straight from a checkout:

    python3 deploy/worker/app.py --port 8000

The runtime POSTs each task's envelope as JSON to /internal/tasks/<endpoint> with the headers
X-Task-Id, X-Task-Attempt and X-Task-Deadline (RFC 3339: finish by then). A 2xx answer's JSON
body is the task's result; 408, 429 and 5xx are retried (Retry-After honoured); any other 4xx
fails the task for good (it is dead-lettered and its link_error callbacks run).

Environment:
    FAIL_RATE   fraction (0..1) of chat and WhatsApp calls answered 503 / 429, to see retries
                in the dashboard (default 0: every call succeeds)
    CHAT_MS     how long a chat turn "thinks", in milliseconds (default 300)
"""

import argparse
import json
import os
import random
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAIL_RATE = float(os.environ.get("FAIL_RATE", "0"))
CHAT_MS = int(os.environ.get("CHAT_MS", "300"))
# Largest request body read (the runtime's envelopes are at most 1 MiB by default).
MAX_BODY = 4 * 1024 * 1024


class Answer(Exception):
    """An answer other than 200: status, JSON body, extra headers."""

    def __init__(self, status, body, headers=None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def maybe_fail(kind):
    if FAIL_RATE > 0 and random.random() < FAIL_RATE:
        if kind == "busy":
            raise Answer(429, {"error": "rate limited by the provider"}, {"Retry-After": "2"})
        raise Answer(503, {"error": "upstream temporarily unavailable"})


def process_chat_message(envelope):
    args = envelope.get("args") or []
    kwargs = envelope.get("kwargs") or {}
    text = kwargs.get("text") or (args[0] if args else "")
    if not isinstance(text, str):
        raise Answer(422, {"error": "the message text must be a string"})
    maybe_fail("down")
    time.sleep(CHAT_MS / 1000)
    return {"reply": f"echo: {text}", "thread_id": kwargs.get("thread_id")}


def extract_preferences(envelope):
    # Linked from process_chat_message: args[0] is its result.
    args = envelope.get("args") or []
    reply = args[0] if args else {}
    words = str(reply.get("reply", "")).split() if isinstance(reply, dict) else []
    return {"preferences": sorted(set(w.lower() for w in words if len(w) > 6))[:5]}


def record_task_failure(envelope):
    # A link_error callback: args[0] is {"id", "task", "error", "attempts"} of the failed task.
    args = envelope.get("args") or []
    failure = args[0] if args else {}
    print(f"task failure recorded: {json.dumps(failure)}", file=sys.stderr, flush=True)
    return {"recorded": True}


def send_whatsapp_message(envelope):
    kwargs = envelope.get("kwargs") or {}
    maybe_fail("busy")
    return {"sent": True, "to": kwargs.get("to")}


ENDPOINTS = {
    "process_chat_message": process_chat_message,
    "extract_preferences": extract_preferences,
    "record_task_failure": record_task_failure,
    "send_whatsapp_message": send_whatsapp_message,
}
PREFIX = "/internal/tasks/"


class Handler(BaseHTTPRequestHandler):
    server_version = "example-worker/1"

    def answer(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self.answer(200, {"status": "ok"})
        else:
            self.answer(404, {"error": "not found"})

    def do_POST(self):
        name = self.path[len(PREFIX):] if self.path.startswith(PREFIX) else None
        endpoint = ENDPOINTS.get(name)
        if endpoint is None:
            self.answer(404, {"error": f"no task endpoint {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0 or length > MAX_BODY:
                raise Answer(413, {"error": f"body of {length} bytes"})
            envelope = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(envelope, dict):
                raise Answer(400, {"error": "the envelope must be a JSON object"})
            self.answer(200, endpoint(envelope))
        except Answer as answer:
            self.answer(answer.status, answer.body, answer.headers)
        except (ValueError, UnicodeDecodeError) as err:
            self.answer(400, {"error": f"bad envelope: {err}"})

    def log_message(self, fmt, *args):
        task_id = self.headers.get("X-Task-Id", "-") if self.headers else "-"
        attempt = self.headers.get("X-Task-Attempt", "-") if self.headers else "-"
        sys.stderr.write(f"{self.address_string()} task={task_id} attempt={attempt} {fmt % args}\n")


def stop(_signum, _frame):
    raise KeyboardInterrupt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    options = parser.parse_args()
    server = ThreadingHTTPServer((options.host, options.port), Handler)
    server.daemon_threads = True
    # As PID 1 of a container a signal without a handler is ignored: stop on SIGTERM.
    signal.signal(signal.SIGTERM, stop)
    print(f"example worker listening on {options.host}:{server.server_port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
