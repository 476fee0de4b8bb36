"""Eager mode: .delay() runs the task in-process with the node's rules (JSON round trip,
retry policy, callbacks, soft limits)."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

import taskrt
from taskrt import EagerResult, EagerSession, Permanent, Retry, TaskFailed, task

calls: dict[str, int] = {}
seen: list[Any] = []


def count(name: str) -> int:
    calls[name] = calls.get(name, 0) + 1
    return calls[name]


@pytest.fixture(autouse=True)
def reset() -> None:
    calls.clear()
    seen.clear()


@task(name="e_add")
def add(a: int, b: int) -> int:
    count("e_add")
    return a + b


@task(name="e_shape")
def shape(value: Any) -> Any:
    seen.append(value)
    return {"got": value, "tuple": (1, 2), 3: "int key"}


@task(name="e_flaky")
def flaky(fail_times: int) -> str:
    n = count("e_flaky")
    if n <= fail_times:
        raise ConnectionError(f"attempt {n} failed")
    return f"ok after {n}"


@task(name="e_later")
def later() -> str:
    if count("e_later") < 3:
        raise Retry(after=5, reason="rate limited")
    return "done"


@task(name="e_always", max_retries=2)
def always() -> None:
    count("e_always")
    raise ValueError("flaky")


@task(name="e_permanent")
def permanent() -> None:
    count("e_permanent")
    raise Permanent("bad input")


@task(name="e_set")
def returns_set() -> set[int]:
    return {1}


@task(name="e_who")
def who() -> dict[str, Any]:
    info = taskrt.current_task()
    assert info is not None
    if count("e_who") == 1:
        raise Retry()
    return {"id": info.id, "name": info.name, "attempt": info.attempt, "eager": info.eager}


@task(name="e_record")
def record(*args: Any) -> list[Any]:
    seen.append(list(args))
    return list(args)


@task(name="e_async")
async def async_add(a: int, b: int) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    return {"sum": a + b, "loop": id(asyncio.get_running_loop())}


@task(name="e_sleep", soft_time_limit=0.2, max_retries=0)
def sleep_long(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@task(name="e_asleep", soft_time_limit=0.2, max_retries=0)
async def asleep_long(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@task(name="e_soft_retry", soft_time_limit=0.1, max_retries=1)
def soft_then_fast() -> str:
    if count("e_soft_retry") == 1:
        time.sleep(5)
    return "fast"


def test_delay_runs_the_task_here(taskrt_eager: EagerSession) -> None:
    result = add.delay(2, 3)
    assert isinstance(result, EagerResult)
    assert (result.get(), result.state, result.attempts, result.retries) == (5, "succeeded", 1, [])
    assert len(result.id) == 36 and result.duplicate is False and result.ready() and result.successful()
    assert taskrt_eager.results == [result]
    record_ = result.status()
    assert (record_.state, record_.result, record_.attempts, record_.attempt) == ("succeeded", 5, 1, 0)


def test_arguments_and_result_go_through_json(taskrt_eager: EagerSession) -> None:
    result = shape.delay((1, [2, (3,)]))
    assert seen == [[1, [2, [3]]]]  # tuples arrive as lists
    assert result.get() == {"got": [1, [2, [3]]], "tuple": [1, 2], "3": "int key"}


def test_a_set_argument_raises_at_delay(taskrt_eager: EagerSession) -> None:
    with pytest.raises(taskrt.EncodeError, match=r"args\[0\]: a set is not JSON-serialisable"):
        add.delay({1}, 2)  # type: ignore[arg-type]
    assert calls == {} and taskrt_eager.results == []


def test_a_result_without_json_form_fails_the_task(taskrt_eager: EagerSession) -> None:
    with pytest.raises(TaskFailed) as raised:
        returns_set.delay()
    assert raised.value.error == "EncodeError: result of type set is not JSON-serialisable"


def test_retryable_exceptions_are_retried_without_sleeping(taskrt_eager: EagerSession) -> None:
    started = time.monotonic()
    result = flaky.delay(2)
    assert result.get() == "ok after 3"
    assert (result.attempts, result.retries) == (3, [None, None])
    later_result = later.delay()
    assert (later_result.get(), later_result.retries) == ("done", [5.0, 5.0])
    assert time.monotonic() - started < 1


def test_max_retries_then_task_failed_with_the_cause(taskrt_eager: EagerSession) -> None:
    with pytest.raises(TaskFailed) as raised:
        always.delay()
    assert calls["e_always"] == 3  # the first run and 2 retries
    failed = raised.value
    assert failed.error == "ValueError: flaky (not retried: attempt 2 reached max_retries=2 of @task)"
    assert isinstance(failed.__cause__, ValueError)
    assert isinstance(failed.record, EagerResult) and failed.record.attempts == 3


def test_max_retries_none_is_the_runtimes_default(taskrt_eager: EagerSession) -> None:
    @task(name="e_none", max_retries=None)
    def none() -> None:
        count("e_none")
        raise ValueError("x")

    with pytest.raises(TaskFailed, match=r"retries exhausted after 4 attempts"):
        none.delay()
    assert calls["e_none"] == 4


def test_permanent_is_not_retried(taskrt_eager: EagerSession) -> None:
    with pytest.raises(TaskFailed, match="Permanent: bad input"):
        permanent.delay()
    assert calls["e_permanent"] == 1


def test_propagate_false_returns_the_failed_result() -> None:
    with taskrt.eager(propagate=False):
        result = permanent.delay()
    assert (result.state, result.error, result.attempts) == ("dead", "Permanent: bad input", 1)
    assert isinstance(result.exception, Permanent) and "bad input" in (result.traceback or "")
    assert not result.successful() and result.failed()
    with pytest.raises(TaskFailed) as raised:
        result.get()
    assert isinstance(raised.value.__cause__, Permanent)
    with pytest.raises(taskrt.ApiError) as revoking:
        result.revoke()
    assert revoking.value.status == 409


def test_current_task_in_eager_mode(taskrt_eager: EagerSession) -> None:
    result = who.apply_async(id="my-id")
    assert result.get() == {"id": "my-id", "name": "e_who", "attempt": 1, "eager": True}
    assert taskrt.current_task() is None


def test_link_and_link_error_run_by_name(taskrt_eager: EagerSession) -> None:
    result = add.apply_async((1, 2), link=record.s("extra"), link_error=record.s())
    assert result.get() == 3
    assert seen == [[3, "extra"]]
    assert [c.task for c in result.children] == ["e_record"]
    # propagate: the failure raises, after its link_error ran
    with pytest.raises(TaskFailed):
        permanent.apply_async(link=record.s("ok"), link_error=[record.s("err")])
    assert seen[1][1] == "err"


def test_link_error_gets_the_failure(taskrt_eager: EagerSession) -> None:
    with taskrt.eager(propagate=False) as session:
        failed = permanent.apply_async(link=record.s("ok"), link_error=[record.s("err")])
    assert failed.state == "dead"
    (payload, extra) = seen[0]
    assert payload == {"id": failed.id, "task": "e_permanent", "error": "Permanent: bad input", "attempts": 1}
    assert extra == "err"
    assert [r.task for r in session.results] == ["e_permanent", "e_record"]


def test_an_unregistered_callback_is_refused_before_running(taskrt_eager: EagerSession) -> None:
    with pytest.raises(taskrt.NotRegistered, match=r"link\[0\].task: no task named `rt_echo`"):
        add.apply_async((1, 2), link=taskrt.Signature("rt_echo"))
    assert calls == {}


def test_idempotency_key_and_id_are_duplicates_in_one_block(taskrt_eager: EagerSession) -> None:
    first = add.apply_async((1, 1), idempotency_key="k")
    second = add.apply_async((5, 5), idempotency_key="k")
    assert (second.duplicate, second.id, second.get()) == (True, first.id, 2)
    by_id = add.apply_async((1, 1), id="fixed")
    again = add.apply_async((2, 2), id="fixed")
    assert again.duplicate and again.get() == by_id.get() == 2
    assert calls["e_add"] == 2
    assert len(taskrt_eager.by_task("e_add")) == 2


def test_async_tasks_in_sync_code(taskrt_eager: EagerSession) -> None:
    assert async_add.delay(1, 2).get()["sum"] == 3


async def test_async_tasks_in_async_code(taskrt_eager: EagerSession) -> None:
    # .delay() from a coroutine: the task runs on a loop of its own (it blocks, like a sync call)
    assert async_add.delay(1, 2).get()["sum"] == 3
    # .adelay(): awaited in this loop
    handle = await async_add.adelay(2, 3)
    value = await handle.result()
    assert value == {"sum": 5, "loop": id(asyncio.get_running_loop())}
    assert (await handle.status()).state == "succeeded"


def test_limits_are_not_enforced_unless_asked(taskrt_eager: EagerSession) -> None:
    assert sleep_long.delay(0.4).get() == "slept"


def test_the_soft_limit_when_enforced() -> None:
    before = signal.getsignal(signal.SIGALRM)
    with taskrt.eager(enforce_limits=True, propagate=False):
        started = time.monotonic()
        result = sleep_long.delay(5)
        assert time.monotonic() - started < 2
        assert result.state == "dead"
        assert result.error is not None and result.error.startswith(
            "SoftTimeLimitExceeded: soft time limit (0.2s) exceeded"
        )
        assert isinstance(result.exception, taskrt.SoftTimeLimitExceeded)
        aresult = asleep_long.delay(5)
        assert aresult.error is not None and aresult.error.startswith("SoftTimeLimitExceeded")
        # a soft timeout is retried (as the runtime does), and the alarm is disarmed after
        retried = soft_then_fast.delay()
        assert (retried.get(), retried.attempts) == ("fast", 2)
        assert sleep_long.apply_async((0.3,), soft_time_limit=2, time_limit=3).get() == "slept"
    assert signal.getsignal(signal.SIGALRM) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_configure_and_environment_switch_eager_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRT_EAGER", "1")
    assert isinstance(add.delay(1, 1), EagerResult)
    monkeypatch.delenv("TASKRT_EAGER")
    taskrt.configure(eager=True, propagate=False)
    assert permanent.delay().state == "dead"
    with taskrt.eager(False):
        from taskrt._task import eager_enabled

        assert not eager_enabled()
    taskrt.configure(eager=None)
    assert not eager_enabled()


def test_eager_checks_options_like_an_enqueue(taskrt_eager: EagerSession) -> None:
    import datetime as dt

    with pytest.raises(ValueError, match="eta: a naive datetime"):
        add.apply_async((1, 2), eta=dt.datetime(2030, 1, 1))
    with pytest.raises(TaskFailed) as raised:
        add.delay(1)  # type: ignore[call-arg]
    assert raised.value.error == (
        "TypeError: arguments do not fit e_add(a, b): missing a required argument: 'b'"
    )
    assert calls == {}


def test_apply_runs_here_whatever_the_mode() -> None:
    from taskrt._task import eager_enabled

    assert not eager_enabled()
    result = add.apply((2, 2))
    assert (result.get(), result.attempts) == (4, 1)
    assert flaky.apply((1,)).retries == [None]
    with pytest.raises(TaskFailed):
        permanent.apply()


# ---- taskrt.handle / taskrt.result by id --------------------------------------------------


def test_handle_and_result_find_a_run_by_id(taskrt_eager: EagerSession) -> None:
    run = add.apply_async((2, 3), link=record.s("cb"))
    assert isinstance(run, EagerResult)
    found = taskrt.handle(run.id)
    assert found is run and not found.duplicate
    assert (found.state, found.status().result) == ("succeeded", 5)
    assert taskrt.result(run.id) == 5
    assert taskrt.result(run.id, timeout=2.5) == 5
    (child,) = run.children
    assert taskrt.handle(child.id) is child, "a callback's run is found by its id too"
    chosen = add.apply_async((1, 1), id="my/id")
    assert taskrt.result("my/id") == 2 and taskrt.handle("my/id") is chosen


def test_result_of_a_dead_run_raises_task_failed_with_its_cause() -> None:
    with taskrt.eager(propagate=False):
        failed = permanent.delay()
        with pytest.raises(TaskFailed) as raised:
            taskrt.result(failed.id)
        assert raised.value.error == "Permanent: bad input"
        assert isinstance(raised.value.__cause__, Permanent)
        assert taskrt.handle(failed.id).state == "dead"


def test_an_unknown_id_is_not_found_and_a_bad_one_is_refused(taskrt_eager: EagerSession) -> None:
    add.delay(1, 1)
    with pytest.raises(taskrt.NotFound) as raised:
        taskrt.handle("no-such-id")
    assert raised.value.status == 404
    assert str(raised.value).startswith("HTTP 404: no task no-such-id: no eager run has this id")
    with pytest.raises(taskrt.NotFound):
        taskrt.result("no-such-id", timeout=1)
    with pytest.raises(ValueError, match="id: is 257 bytes, over the limit of 256"):
        taskrt.handle("x" * 257)
    with pytest.raises(ValueError, match=r"id: holds a control character \(U\+000A\)"):
        taskrt.result("a\nb")
    with pytest.raises(TypeError, match="id: expected a string, got int"):
        taskrt.handle(7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout: expected seconds or None, got str"):
        taskrt.result("x", timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout: expected a finite number of seconds >= 0, got -1"):
        taskrt.result("x", timeout=-1)


def test_nested_blocks_see_the_outer_runs_and_duplicates_are_not_new_runs(
    taskrt_eager: EagerSession,
) -> None:
    outer = add.apply_async((1, 2), idempotency_key="k")
    with taskrt.eager(propagate=False) as inner:
        assert taskrt.handle(outer.id) is outer
        mine = add.delay(3, 4)
    assert inner.get(mine.id) is mine and taskrt_eager.get(mine.id) is None
    again = add.apply_async((9, 9), idempotency_key="k")
    assert again.duplicate and taskrt.handle(again.id) is outer


def test_eager_mode_outside_a_block_keeps_the_last_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskrt import _eager

    monkeypatch.setattr(_eager, "MAX_UNRECORDED_IDS", 3)
    monkeypatch.setattr(_eager, "_global_session", EagerSession(record=False))
    taskrt.configure(eager=True)
    runs = [add.delay(n, n) for n in range(5)]
    assert [taskrt.result(r.id) for r in runs[2:]] == [4, 6, 8]
    for old in runs[:2]:
        with pytest.raises(taskrt.NotFound):
            taskrt.handle(old.id)
    assert _eager._global_session.results == [], "outside a block the runs are not listed"
    taskrt.configure(eager=None)
    monkeypatch.setenv("TASKRT_EAGER", "1")
    assert taskrt.result(add.delay(10, 10).id) == 20


async def test_ahandle_and_aresult_in_eager_mode(taskrt_eager: EagerSession) -> None:
    run = await async_add.adelay(2, 3)
    assert isinstance(run, taskrt.AsyncEagerResult)
    found = taskrt.ahandle(run.id)
    assert isinstance(found, taskrt.AsyncEagerResult) and found.eager is run.eager
    assert (await found.result(timeout=1))["sum"] == 5
    assert (await found.status()).state == "succeeded"
    assert (await taskrt.aresult(run.id))["sum"] == 5
    with pytest.raises(taskrt.NotFound):
        await taskrt.aresult("nope")
    with pytest.raises(taskrt.NotFound):
        taskrt.ahandle("nope")
