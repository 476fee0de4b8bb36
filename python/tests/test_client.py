"""taskrt.Client and AsyncClient against a scripted node on a real loopback HTTP server: what
they send, what they make of every kind of answer (including hostile ones), and how they keep
their connections."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import socket
import threading
from typing import Any, Callable, Iterator

import httpx
import pytest
from loopback import Loopback, closed_port, hangup

import taskrt
from taskrt import (
    ApiError,
    AsyncClient,
    Client,
    EncodeError,
    NotFound,
    ResultTimeout,
    Signature,
    TaskFailed,
    TaskRecord,
    Unreachable,
)
from taskrt.context import TaskInfo, _current

URL = "http://node.test:7070"
TOKEN = "s3cret-token"

Answer = tuple[int, Any] | Callable[[httpx.Request], httpx.Response] | Exception


class Server:
    """A scripted node: answers in order, every request recorded."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if not self.answers:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        status, body = answer
        if isinstance(body, bytes):
            return httpx.Response(status, content=body)
        return httpx.Response(status, json=body)

    def body(self, n: int = -1) -> Any:
        return json.loads(self.requests[n].content)

    def serve(self) -> str:
        """A loopback node answering with this script (stopped after the test); its URL."""
        node = Loopback(self).__enter__()
        _serving.append(node)
        self.node = node
        return node.url

    def client(self, **kwargs: Any) -> Client:
        return Client(self.serve(), token=kwargs.pop("token", TOKEN), **kwargs)

    def aclient(self, **kwargs: Any) -> AsyncClient:
        return AsyncClient(self.serve(), token=TOKEN, **kwargs)


_serving: list[Loopback] = []
_clients: list[Client] = []


@pytest.fixture(autouse=True)
def stop_loopback_nodes() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()
    while _serving:
        _serving.pop().__exit__()


def record(state: str = "succeeded", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "t1", "task": "add", "queue": "default", "state": state, "result": None,
        "error": None, "attempts": 1, "attempt": 0, "eta": None,
        "enqueued_at": "2026-11-23T15:00:00.000Z", "started_at": "2026-11-23T15:00:00.120Z",
        "node": "node-a", "updated_at": "2026-11-23T15:00:00.250+01:00",
    }
    base.update(fields)
    return base


@taskrt.task(name="routed", queue="chat", time_limit=30, soft_time_limit=20.5)
def routed(text: str) -> str:
    return text


# ---- enqueue ------------------------------------------------------------------------------


def test_enqueue_sends_the_task_with_the_token() -> None:
    server = Server((202, {"id": "t1", "duplicate": False}))
    with server.client() as client:
        handle = client.enqueue("add", [1, 2], {"round": True})
    (request,) = server.requests
    assert (request.method, request.url.raw_path) == ("POST", b"/tasks")
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert server.body() == {"task": "add", "args": [1, 2], "kwargs": {"round": True}}
    assert (handle.id, handle.duplicate, handle.task) == ("t1", False, "add")


def test_enqueue_options_become_the_api_fields() -> None:
    server = Server((202, {"id": "t9", "duplicate": True}))
    eta = dt.datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
    with server.client() as client:
        handle = client.enqueue(
            "add", (1,), queue="background", eta=eta, expires=dt.timedelta(hours=1),
            idempotency_key="k-1", id="order:42", time_limit=1.5, soft_time_limit=dt.timedelta(seconds=1),
            link=[Signature("echo", (1,), {"x": 2}), "rt_noop"], link_error=Signature("alert").set(queue="ops"),
            trace_id="0af7651916cd43dd8448eb211c80319c",
        )
    body = server.body()
    expires = taskrt._api.parse_time(body.pop("expires"))
    assert abs((expires - dt.datetime.now(dt.timezone.utc)).total_seconds() - 3600) < 60
    assert body == {
        "task": "add", "args": [1], "kwargs": {}, "queue": "background",
        "eta": "2030-01-02T03:04:05.678Z", "idempotency_key": "k-1", "id": "order:42",
        "time_limit_ms": 1500, "soft_time_limit_ms": 1000,
        "link": [{"task": "echo", "args": [1], "kwargs": {"x": 2}},
                 {"task": "rt_noop", "args": [], "kwargs": {}}],
        "link_error": [{"task": "alert", "args": [], "kwargs": {}, "queue": "ops"}],
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
    }
    assert handle.duplicate is True


def test_countdown_and_offsets_and_strings() -> None:
    server = Server((202, {"id": "t1", "duplicate": False}))
    paris = dt.timezone(dt.timedelta(hours=2))
    with server.client() as client:
        client.enqueue("add", countdown=2.5, expires=dt.datetime(2031, 5, 1, 12, tzinfo=paris))
        client.enqueue("add", eta="2031-05-01T12:00:00Z", expires="2031-06-01T00:00:00Z")
    assert server.body(0) == {"task": "add", "args": [], "kwargs": {}, "countdown": 2.5,
                              "expires": "2031-05-01T12:00:00.000+02:00"}
    assert server.body(1)["eta"] == "2031-05-01T12:00:00Z"


def test_a_task_object_brings_its_queue_and_limits() -> None:
    server = Server((202, {"id": "t1", "duplicate": False}))
    with server.client() as client:
        client.enqueue(routed, ["hi"])
        client.enqueue(routed, ["hi"], queue="default", time_limit=60)
    assert server.body(0) == {"task": "routed", "args": ["hi"], "kwargs": {}, "queue": "chat",
                              "time_limit_ms": 30000, "soft_time_limit_ms": 20500}
    assert server.body(1)["queue"] == "default" and server.body(1)["time_limit_ms"] == 60000


def test_a_signature_puts_new_args_first() -> None:
    server = Server((202, {"id": "t1", "duplicate": False}))
    with server.client() as client:
        client.enqueue(routed.s("b", k=1).set(countdown=5), ["a"], {"j": 2})
    assert server.body() == {"task": "routed", "args": ["a", "b"], "kwargs": {"k": 1, "j": 2},
                             "countdown": 5.0, "queue": "chat", "time_limit_ms": 30000,
                             "soft_time_limit_ms": 20500}


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda c: c.enqueue("add", [{1, 2}]), EncodeError, "args[0]: a set is not JSON-serialisable"),
        (lambda c: c.enqueue("add", kwargs={"x": [math.nan]}), EncodeError, "kwargs['x'][0]: nan is not a JSON number"),
        (lambda c: c.enqueue("add", [b"raw"]), EncodeError, "args[0]: a bytes is not JSON-serialisable"),
        (lambda c: c.enqueue("add", link=Signature("x", ({1},))), EncodeError, "link[0].args[0]: a set"),
        (lambda c: c.enqueue("add", eta=dt.datetime(2030, 1, 1)), ValueError, "eta: a naive datetime has no time zone"),
        (lambda c: c.enqueue("add", countdown=1, eta="2030-01-01T00:00:00Z"), ValueError, "give eta or countdown, not both"),
        (lambda c: c.enqueue("add", countdown=-1), ValueError, "countdown: must be >= 0 seconds"),
        (lambda c: c.enqueue("add", countdown=math.inf), ValueError, "countdown: expected a finite number"),
        (lambda c: c.enqueue("add", time_limit=0.0001), ValueError, "time_limit: must be at least 1 ms"),
        (lambda c: c.enqueue("add", time_limit=2, soft_time_limit=2), ValueError, "soft_time_limit: 2000 ms is not below time_limit 2000 ms"),
        (lambda c: c.enqueue("add", id="a\nb"), ValueError, "id: holds a control character (U+000A)"),
        (lambda c: c.enqueue("add", id="x" * 257), ValueError, "id: is 257 bytes, over the limit of 256"),
        (lambda c: c.enqueue("add", id=".."), ValueError, "id: `..` cannot be used as an id"),
        (lambda c: c.enqueue("add", "ab"), TypeError, "args: expected a list or tuple, got str"),
        (lambda c: c.enqueue(42), TypeError, "task: expected a task, a Signature or a task name, got int"),
        (lambda c: c.enqueue("add", link=Signature("x").set(countdown=1)), ValueError, "link[0]: a callback takes no option but queue"),
        (lambda c: c.enqueue_many([]), ValueError, "enqueue_many: expected 1 to 10000 tasks, got 0"),
        (lambda c: c.enqueue_many(["add"] * 10_001), ValueError, "got 10001"),
        (lambda c: c.enqueue_many([{"args": [1]}]), TypeError, "[0]: a mapping needs `task`"),
        (lambda c: c.enqueue_many([{"task": "add", "countdwn": 1}]), TypeError, "[0].unknown option(s): countdwn"),
        (lambda c: c.status("a\x00"), ValueError, "id: holds a control character (U+0000)"),
        (lambda c: c.revoke("."), ValueError, "id: `.` cannot be used as an id"),
    ],
)
def test_bad_input_is_refused_before_sending(call: Callable[[Client], Any], error: type[Exception], message: str) -> None:
    server = Server()
    with server.client() as client, pytest.raises(error) as raised:
        call(client)
    assert message in str(raised.value)
    assert server.requests == []


def test_enqueue_many_is_one_request() -> None:
    answers = [{"id": f"t{n}", "duplicate": n == 1} for n in range(3)]
    server = Server((202, answers))
    with server.client() as client:
        handles = client.enqueue_many(
            [routed.s("a"), {"task": "add", "args": [1, 2], "countdown": 3}, "rt_noop"]
        )
    assert len(server.requests) == 1
    assert server.body() == [
        {"task": "routed", "args": ["a"], "kwargs": {}, "queue": "chat", "time_limit_ms": 30000,
         "soft_time_limit_ms": 20500},
        {"task": "add", "args": [1, 2], "kwargs": {}, "countdown": 3.0},
        {"task": "rt_noop", "args": [], "kwargs": {}},
    ]
    assert [(h.id, h.duplicate, h.task) for h in handles] == [
        ("t0", False, "routed"), ("t1", True, "add"), ("t2", False, "rt_noop")]


def test_enqueue_from_inside_a_task_names_its_parent_and_trace() -> None:
    server = Server((202, {"id": "child", "duplicate": False}))
    token = _current.set(TaskInfo(id="parent", name="p", queue="q", attempt=0, trace_id="tr", root_id="root"))
    try:
        with server.client() as client:
            client.enqueue("add")
    finally:
        _current.reset(token)
    assert server.body() == {"task": "add", "args": [], "kwargs": {}, "trace_id": "tr",
                             "parent_id": "parent", "root_id": "root"}


# ---- records and results ------------------------------------------------------------------


def test_status_parses_the_record() -> None:
    server = Server((200, record("retrying", error="boom", attempts=2, attempt=1, eta="2026-11-23T15:00:01Z")))
    with server.client() as client:
        rec = client.status("a/b c%")
    assert server.requests[0].url.raw_path == b"/tasks/a%2Fb%20c%25"
    assert isinstance(rec, TaskRecord)
    assert (rec.state, rec.error, rec.attempts, rec.attempt, rec.node) == ("retrying", "boom", 2, 1, "node-a")
    assert rec.eta == dt.datetime(2026, 11, 23, 15, 0, 1, tzinfo=dt.timezone.utc)
    assert rec.started_at == dt.datetime(2026, 11, 23, 15, 0, 0, 120000, tzinfo=dt.timezone.utc)
    assert rec.updated_at is not None and rec.updated_at.utcoffset() == dt.timedelta(hours=1)
    assert (rec.ready, rec.celery_state) == (False, "RETRY")


@pytest.mark.parametrize("state,error,celery", [
    ("queued", None, "PENDING"), ("scheduled", None, "PENDING"), ("running", None, "STARTED"),
    ("succeeded", None, "SUCCESS"), ("dead", "boom", "FAILURE"), ("dead", "revoked", "REVOKED"),
])
def test_celery_state_names(state: str, error: str | None, celery: str) -> None:
    server = Server((200, record(state, error=error)))
    with server.client() as client:
        assert client.status("t1").celery_state == celery


def test_result_polls_until_the_task_ends() -> None:
    server = Server((200, record("queued")), (200, record("running")), (200, record("succeeded", result={"sum": 3})))
    with server.client() as client:
        assert client.result("t1", timeout=5) == {"sum": 3}
    assert len(server.requests) == 3


def test_a_dead_task_raises_task_failed() -> None:
    server = Server((200, record("dead", error="ValueError: boom", attempts=4, attempt=3)))
    with server.client() as client:
        handle = client.handle("t1")
        with pytest.raises(TaskFailed) as raised:
            handle.get(timeout=1)
    assert (raised.value.id, raised.value.error, raised.value.state) == ("t1", "ValueError: boom", "dead")
    assert raised.value.record.attempts == 4
    assert str(raised.value) == "task t1 failed (dead): ValueError: boom"


def test_result_timeout() -> None:
    server = Server((200, record("running")))
    with server.client() as client:
        with pytest.raises(ResultTimeout) as raised:
            client.result("t1", timeout=0.1)
        assert raised.value.state == "running"
        assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, taskrt.TimeoutError)
        assert str(raised.value) == "task t1 did not end within 0.1s (state: running)"
        count = len(server.requests)
        assert 2 <= count <= 8  # 10 ms doubling to 250 ms
        with pytest.raises(ResultTimeout, match="pass timeout= to wait"):
            client.result("t1")  # one read, no wait
        assert len(server.requests) == count + 1


def test_handle_state_and_revoke() -> None:
    server = Server(
        (200, record("scheduled")),
        (202, {"id": "a/b", "was": "scheduled", "terminate": True}),
        (409, {"error": "task a/b has ended (succeeded): nothing to revoke"}),
    )
    with server.client() as client:
        handle = client.handle("a/b")
        assert handle.state == "scheduled"
        revoked = handle.revoke(terminate=True)
        assert (revoked.id, revoked.was, revoked.terminate) == ("a/b", "scheduled", True)
        assert server.requests[1].url.raw_path == b"/tasks/a%2Fb/revoke"
        assert server.body(1) == {"terminate": True}
        with pytest.raises(ApiError) as raised:
            client.revoke("a/b")
    assert (raised.value.status, raised.value.message) == (409, "task a/b has ended (succeeded): nothing to revoke")
    assert server.body() == {"terminate": False}


# ---- errors -------------------------------------------------------------------------------


def test_api_errors_carry_the_node_message() -> None:
    server = Server(
        (400, {"error": "task: no such task `nope` (defined: add)"}),
        (404, {"error": "no task t1: unknown"}),
        (503, b"<html>Service Unavailable</html>"),
    )
    with server.client() as client:
        with pytest.raises(ApiError) as raised:
            client.enqueue("nope")
        assert (raised.value.status, raised.value.message) == (400, "task: no such task `nope` (defined: add)")
        assert str(raised.value) == "HTTP 400: task: no such task `nope` (defined: add)"
        with pytest.raises(NotFound) as missing:
            client.status("t1")
        assert missing.value.status == 404
        with pytest.raises(ApiError) as html:
            client.status("t1")
    assert html.value.message == "GET /tasks/t1 answered without a JSON error: '<html>Service Unavailable</html>'"


@pytest.mark.parametrize(
    "answer,message",
    [
        ((202, b"OK"), "unexpected answer to POST /tasks: not JSON: 'OK'"),
        ((202, b""), "not JSON: an empty body"),
        ((202, b'{"id": NaN}'), "not JSON"),
        ((202, b"\xff\xfe"), "not JSON"),
        ((202, [1]), "POST /tasks: expected an object, got an array"),
        ((202, "t1"), "POST /tasks: expected an object, got a string"),
        ((202, {"id": 5, "duplicate": False}), "`id`: expected str, got a number"),
        ((202, {"id": "x"}), "`duplicate` is missing"),
        ((202, {"id": "x", "duplicate": "no"}), "`duplicate`: expected bool, got a string"),
        ((202, b"[" * 100_000), "not JSON"),
    ],
)
def test_hostile_enqueue_answers(answer: tuple[int, Any], message: str) -> None:
    server = Server(answer)
    with server.client() as client, pytest.raises(ApiError) as raised:
        client.enqueue("add")
    assert message in raised.value.message


@pytest.mark.parametrize(
    "body,message",
    [
        ([], "expected an object, got an array"),
        ({**record(), "state": None}, "`state`: expected str, got null"),
        ({**record(), "attempts": True}, "`attempts`: expected int, got a boolean"),
        ({**record(), "attempts": -1}, "negative"),
        ({**record(), "eta": "tomorrow"}, "`eta`: `tomorrow` is not an RFC 3339 time"),
        ({k: v for k, v in record().items() if k != "task"}, "`task` is missing"),
    ],
)
def test_hostile_records(body: Any, message: str) -> None:
    server = Server((200, body))
    with server.client() as client, pytest.raises(ApiError) as raised:
        client.status("t1")
    assert message in raised.value.message


def test_batch_answer_of_the_wrong_length() -> None:
    server = Server((202, [{"id": "a", "duplicate": False}]))
    with server.client() as client, pytest.raises(ApiError, match="expected 2 answers, got 1"):
        client.enqueue_many(["a", "b"])


def test_an_answer_over_the_size_limit_is_not_read() -> None:
    server = Server((200, b'"' + b"x" * 5000 + b'"'))
    with server.client(max_response_bytes=1024) as client, pytest.raises(ApiError) as raised:
        client.status("t1")
    assert "over 1024 bytes (max_response_bytes)" in raised.value.message


def test_unreachable_names_the_url_and_never_the_secrets() -> None:
    port = closed_port()
    client = Client(f"http://user:pw@127.0.0.1:{port}/", token=TOKEN)
    with client, pytest.raises(Unreachable) as raised:
        client.enqueue("add")
    assert str(raised.value).startswith(f"cannot reach the node at http://127.0.0.1:{port}: ")
    assert "Connection refused" in str(raised.value)
    assert isinstance(raised.value, ConnectionError)
    assert TOKEN not in repr(client) and "pw" not in repr(client)
    assert repr(client) == f"Client(base_url='http://127.0.0.1:{port}', token=<set>, timeout=10)"

    def slow(request: httpx.Request) -> httpx.Response:
        threading.Event().wait(1.0)
        return httpx.Response(200, json=record())

    with Server(slow).client(timeout=0.2) as c2, pytest.raises(Unreachable, match="timed out"):
        c2.status("t1")
    with Server(hangup).client() as c3, pytest.raises(Unreachable, match="closed connection"):
        c3.status("t1")


def test_the_blocking_client_keeps_its_connection_alive() -> None:
    server = Server((200, record()))
    with server.client() as client:
        for _ in range(20):
            client.status("t1")
    assert len(server.requests) == 20 and server.node.connections == 1


def test_a_connection_the_node_closed_while_idle_is_not_reused() -> None:
    server = Server((200, record()))
    with server.client() as client:
        client.status("t1")
        # The node drops its side of the idle connection (a restart, an idle timeout): the
        # next request sees it readable (EOF) and opens a new one instead of failing on it.
        for sock in server.node.sockets:
            sock.shutdown(socket.SHUT_RDWR)
        assert client.status("t1").state == "succeeded"
    assert len(server.requests) == 2 and server.node.connections == 2


def test_threads_share_one_blocking_client() -> None:
    server = Server((200, record()))
    with server.client() as client:
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                for _ in range(25):
                    assert client.status("t1").state == "succeeded"
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and len(server.requests) == 200
    assert server.node.connections <= 8


def test_a_forked_child_opens_its_own_connection() -> None:
    server = Server((200, record()))
    with server.client() as client:
        client.status("t1")
        pid = os.fork()
        if pid == 0:  # the child: its own connection, the parent's left alone
            code = 1
            try:
                code = 0 if client.status("t1").state == "succeeded" else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        client.status("t1")
    assert len(server.requests) == 3 and server.node.connections == 2


def test_token_problems_are_named_without_the_token() -> None:
    for bad, why in [(" padded ", "whitespace around it"), ("tab\there", "control or non-ASCII"), ("naïve", "non-ASCII")]:
        with pytest.raises(ValueError) as raised:
            Client(URL, token=bad)
        assert why in str(raised.value) and bad.strip() not in str(raised.value)
    with pytest.raises(ValueError, match="base_url: expected http"):
        Client("ftp://node")
    with pytest.raises(ValueError, match="timeout"):
        Client(URL, timeout=0)


def test_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server((200, record()))
    monkeypatch.setenv("TASKRT_URL", server.serve() + "/")
    monkeypatch.setenv("TASKRT_TOKEN", "from-env")
    client = Client()
    with client:
        client.status("t1")
    assert client.base_url == server.node.url
    assert server.requests[0].url.raw_path == b"/tasks/t1"
    assert server.requests[0].headers["authorization"] == "Bearer from-env"
    monkeypatch.delenv("TASKRT_URL")
    monkeypatch.delenv("TASKRT_TOKEN")
    with Client() as plain:
        assert plain.base_url == "http://127.0.0.1:7070" and plain._token is None
    with Client(server.node.url) as anonymous:
        anonymous.status("t1")
    assert "authorization" not in server.requests[1].headers


# ---- the async client ---------------------------------------------------------------------


async def test_async_client_has_the_same_methods() -> None:
    server = Server(
        (202, {"id": "t1", "duplicate": False}),
        (200, record("running")),
        (200, record("succeeded", result=[1, 2])),
        (202, [{"id": "x", "duplicate": False}, {"id": "y", "duplicate": False}]),
        (200, record("dead", error="revoked")),
        (202, {"id": "t1", "was": "running", "terminate": False}),
    )
    async with server.aclient() as client:
        handle = await client.enqueue(routed, ["a"], countdown=1)
        assert server.body() == {"task": "routed", "args": ["a"], "kwargs": {}, "queue": "chat",
                                 "countdown": 1.0, "time_limit_ms": 30000, "soft_time_limit_ms": 20500}
        assert await handle.result(timeout=5) == [1, 2]
        many = await client.enqueue_many(["a", "b"])
        assert [h.id for h in many] == ["x", "y"]
        with pytest.raises(TaskFailed, match="revoked"):
            await client.handle("t1").get(timeout=1)
        assert (await client.revoke("t1")).was == "running"
    assert [r.headers["authorization"] for r in server.requests] == [f"Bearer {TOKEN}"] * 6


async def test_the_async_client_never_blocks_the_event_loop() -> None:
    # The node answers only once the loop has run something else while the request waits:
    # with a request that blocked the loop, the answer would never come (the handler gives up).
    released = threading.Event()

    def held(request: httpx.Request) -> httpx.Response:
        ok = released.wait(5)
        return httpx.Response(200 if ok else 500, json=record() if ok else {"error": "loop blocked"})

    server = Server(held)
    async with server.aclient() as client:
        pending = asyncio.ensure_future(client.status("t1"))
        while not server.requests:
            await asyncio.sleep(0.01)
        released.set()
        assert (await pending).state == "succeeded"


async def test_one_async_client_has_requests_in_flight_at_once() -> None:
    # Each answer waits until four requests are at the node together.
    together = threading.Barrier(4, timeout=5)

    def gathered(request: httpx.Request) -> httpx.Response:
        together.wait()
        return httpx.Response(200, json=record())

    server = Server(gathered)
    async with server.aclient() as client:
        records = await asyncio.gather(*(client.status("t1") for _ in range(4)))
    assert [r.state for r in records] == ["succeeded"] * 4
    assert server.node.connections == 4


async def test_async_client_errors() -> None:
    server = Server((404, {"error": "no task t1"}), (200, record("queued")))
    async with server.aclient() as client:
        with pytest.raises(NotFound):
            await client.status("t1")
        with pytest.raises(ResultTimeout):
            await client.result("t1", timeout=0.05)
    port = closed_port()
    async with AsyncClient(f"http://127.0.0.1:{port}", token=TOKEN) as client:
        with pytest.raises(Unreachable, match=f"cannot reach the node at http://127.0.0.1:{port}: .*refused"):
            await client.status("t1")


# ---- taskrt.handle / taskrt.result through the default client -----------------------------


def test_handle_and_result_by_id_use_the_default_client() -> None:
    server = Server(
        (200, record("running", id="t/1")),
        (200, record("succeeded", id="t/1", result={"sum": 3})),
        (200, record("succeeded", id="t/1", result={"sum": 3})),
        (404, {"error": "no task gone: unknown, or ended more than broker.result_ttl ago"}),
        (200, record("dead", id="t2", error="ValueError: boom")),
    )
    client = server.client()
    _clients.append(client)
    taskrt.configure(client=client)
    handle = taskrt.handle("t/1")
    assert isinstance(handle, taskrt.TaskHandle) and handle.id == "t/1" and not handle.duplicate
    assert server.requests == [], "a handle reads nothing until asked"
    assert handle.state == "running"
    assert taskrt.result("t/1", timeout=5) == {"sum": 3}
    assert taskrt.result("t/1") == {"sum": 3}
    assert [r.url.raw_path for r in server.requests] == [b"/tasks/t%2F1"] * 3
    with pytest.raises(NotFound, match="HTTP 404: no task gone: unknown"):
        taskrt.result("gone")
    with pytest.raises(TaskFailed, match="ValueError: boom"):
        taskrt.result("t2", timeout=1)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in server.requests)
    with pytest.raises(ValueError, match="id: is empty"):
        taskrt.handle("")
    assert len(server.requests) == 5


def test_result_by_id_times_out_like_the_client() -> None:
    server = Server((200, record("queued")))
    client = server.client()
    _clients.append(client)
    taskrt.configure(client=client)
    with pytest.raises(ResultTimeout, match=r"task t1 did not end within 0.05s \(state: queued\)"):
        taskrt.result("t1", timeout=0.05)
    with pytest.raises(ResultTimeout, match="pass timeout= to wait"):
        taskrt.result("t1")


async def test_ahandle_and_aresult_use_the_configured_async_client() -> None:
    server = Server((200, record("queued")), (200, record("succeeded", result=[1])))
    async with server.aclient() as client:
        taskrt.configure(async_client=client)
        handle = taskrt.ahandle("t1")
        assert isinstance(handle, taskrt.AsyncTaskHandle) and server.requests == []
        assert (await handle.status()).state == "queued"
        assert await taskrt.aresult("t1", timeout=5) == [1]
    assert len(server.requests) == 2


async def test_aresult_without_an_async_client_opens_its_own() -> None:
    # Nothing listens on the discard port of loopback: the configured URL and token are used.
    taskrt.configure(url="http://127.0.0.1:9", token="s3cret-token", timeout=2)
    with pytest.raises(Unreachable) as raised:
        await taskrt.aresult("t1")
    assert raised.value.url == "http://127.0.0.1:9" and "s3cret-token" not in str(raised.value)
    with pytest.raises(ValueError, match="id: is empty"):
        taskrt.ahandle("")
