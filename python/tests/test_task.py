"""@task: names, the registry, direct calls, signatures, and .delay()/.apply_async() through
the default client."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Callable, Iterator

import httpx
import pytest
from loopback import Loopback

import taskrt
from taskrt import AsyncClient, Client, NotRegistered, Signature, TaskHandle, shared_task, task


@task
def plain(x: int) -> int:
    return x * 2


@task(name="tt_named", queue="chat", max_retries=5, time_limit=10, soft_time_limit=8)
def named(text: str, *, loud: bool = False) -> str:
    return text.upper() if loud else text


@shared_task(name="tt_async")
async def an_async(x: int) -> int:
    return x + 1


def record_requests() -> tuple[list[httpx.Request], Callable[[httpx.Request], httpx.Response]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = json.loads(request.content)
        if isinstance(body, list):
            return httpx.Response(202, json=[{"id": f"id-{n}", "duplicate": False} for n in range(len(body))])
        return httpx.Response(202, json={"id": "id-1", "duplicate": False})

    return seen, handler


@pytest.fixture
def node_client() -> Iterator[tuple[list[httpx.Request], Client]]:
    """A blocking client of a loopback node that records what it is sent."""
    seen, handler = record_requests()
    with Loopback(handler) as node, Client(node.url) as client:
        yield seen, client


def test_default_name_is_module_and_qualname() -> None:
    assert plain.name == "test_task.plain"
    assert taskrt.registry["test_task.plain"] is plain
    assert taskrt.get_task("tt_named") is named
    assert (named.queue, named.max_retries, named.time_limit, named.soft_time_limit) == ("chat", 5, 10.0, 8.0)
    assert an_async.is_async and not plain.is_async
    assert plain.__name__ == "plain" and plain.__wrapped__ is not None  # type: ignore[attr-defined]
    assert repr(named) == "<@task tt_named>"


def test_calling_it_runs_the_function_here() -> None:
    assert plain(21) == 42
    assert named("hi", loud=True) == "HI"


async def test_calling_an_async_task_gives_its_coroutine() -> None:
    assert await an_async(1) == 2


def test_a_name_taken_by_another_function_is_refused() -> None:
    with pytest.raises(ValueError) as raised:

        @task(name="tt_named")
        def impostor() -> None: ...

    message = str(raised.value)
    assert "task name `tt_named` is registered already by test_task.named" in message
    assert "test_task.test_a_name_taken_by_another_function_is_refused.<locals>.impostor cannot take it" in message
    assert taskrt.registry["tt_named"] is named


def test_registering_the_same_function_again_replaces_it() -> None:
    # a module imported twice (reload) defines the same module.qualname again
    def make() -> Any:
        @task(name="tt_again")
        def again() -> int:
            return 1

        return again

    first, second = make(), make()
    assert taskrt.registry["tt_again"] is second and first is not second


@pytest.mark.parametrize(
    "options,message",
    [
        ({"time_limit": 2, "soft_time_limit": 2}, "soft_time_limit: 2s is not below time_limit 2s"),
        ({"max_retries": -1}, "max_retries: expected an integer >= 0 or None"),
        ({"retry_for": (ValueError, "x")}, "retry_for: expected exception classes"),
        ({"name": "has space"}, "name: expected a non-empty name without spaces"),
        ({"time_limit": 0}, "time_limit: must be at least 1 ms"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError)) as raised:
        task(**options)(lambda: None)
    assert message in str(raised.value)


def test_signatures() -> None:
    sig = named.s("hi", loud=True)
    assert sig == Signature("tt_named", ("hi",), {"loud": True})
    assert repr(sig) == "tt_named.s('hi', loud=True)"
    assert repr(sig.set(queue="q")) == "tt_named.s('hi', loud=True).set(queue='q')"
    assert sig.set(queue="q").options == {"queue": "q"} and sig.options == {}
    assert taskrt.signature("x", (1,)) == Signature("x", (1,))
    assert taskrt.signature(plain, (1,), countdown=3).options == {"countdown": 3}
    assert named.signature(["a"], {"loud": False}, queue="q") == Signature("tt_named", ("a",), {"loud": False}, queue="q")
    with pytest.raises(TypeError, match="unknown option"):
        Signature("x", colour="red")


def test_get_task_names_what_is_registered() -> None:
    with pytest.raises(NotRegistered) as raised:
        taskrt.get_task("nope")
    assert str(raised.value).startswith("no task named `nope` is registered (registered: ")
    assert isinstance(raised.value, KeyError)


def test_delay_and_apply_async_use_the_default_client(node_client: tuple[list[httpx.Request], Client]) -> None:
    seen, client = node_client
    taskrt.configure(client=client)
    handle = named.delay("hi", loud=True)
    assert isinstance(handle, TaskHandle) and handle.id == "id-1" and handle.task == "tt_named"
    named.apply_async(
        ["x"], {"loud": False}, countdown=dt.timedelta(seconds=90), queue="background",
        idempotency_key="k", link=plain.s(), link_error=[named.s("failed")], id="my-id",
        time_limit=5, soft_time_limit=None,
    )
    named.apply_async(["y"], time_limit=20)
    Signature("tt_named", ("sig",)).delay()
    bodies = [json.loads(r.content) for r in seen]
    assert bodies[0] == {"task": "tt_named", "args": ["hi"], "kwargs": {"loud": True}, "queue": "chat",
                         "time_limit_ms": 10000, "soft_time_limit_ms": 8000}
    assert bodies[1] == {
        "task": "tt_named", "args": ["x"], "kwargs": {"loud": False}, "queue": "background",
        "id": "my-id", "countdown": 90.0, "idempotency_key": "k", "time_limit_ms": 5000,
        "link": [{"task": "test_task.plain", "args": [], "kwargs": {}}],
        "link_error": [{"task": "tt_named", "args": ["failed"], "kwargs": {}, "queue": "chat"}],
    }
    # a longer hard limit keeps the task's soft one
    assert (bodies[2]["time_limit_ms"], bodies[2]["soft_time_limit_ms"]) == (20000, 8000)
    # a signature of a task registered here brings its defaults too
    assert bodies[3] == {"task": "tt_named", "args": ["sig"], "kwargs": {}, "queue": "chat",
                         "time_limit_ms": 10000, "soft_time_limit_ms": 8000}


def test_delay_refuses_what_json_cannot_carry_before_sending(node_client: tuple[list[httpx.Request], Client]) -> None:
    seen, client = node_client
    taskrt.configure(client=client)
    with pytest.raises(taskrt.EncodeError, match=r"args\[0\]: a set is not JSON-serialisable"):
        plain.delay({1})  # type: ignore[arg-type]
    assert seen == []


def test_configure_url_and_token_make_the_default_client(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskrt._task import default_client

    monkeypatch.setenv("TASKRT_URL", "http://env.test:1")
    assert default_client().base_url == "http://env.test:1"
    taskrt.configure(url="http://conf.test:2/", token="zq-secret")
    client = default_client()
    assert client.base_url == "http://conf.test:2" and "zq-secret" not in repr(client)
    assert default_client() is client
    with pytest.raises(ValueError, match="token: has whitespace"):
        taskrt.configure(token=" tok")


async def test_adelay_uses_the_async_client() -> None:
    seen, record = record_requests()
    with Loopback(record) as node:
        async with AsyncClient(node.url) as client:
            taskrt.configure(async_client=client)
            handle = await named.adelay("hi")
            assert handle.id == "id-1"
            await plain.aapply_async([1], countdown=1)
    assert [json.loads(r.content)["task"] for r in seen] == ["tt_named", "test_task.plain"]
