"""The worker's per-task fast paths give exactly what the general code gives: each is checked
against it (the reference) over many inputs, errors and their messages included.

* ``parse_run`` against ``_parse_run_checked`` (the field-by-field checks);
* ``_exec.call_args`` against ``inspect.Signature.bind`` (through ``_exec.bind``);
* ``context._task_info`` against ``TaskInfo(...)``;
* the worker's ``_loads`` against ``json.loads``; ``_json.dumps`` against ``json.dumps``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import itertools
import json
import math
from typing import Any, Callable

import pytest

from taskrt import _exec, _json
from taskrt._task import Task
from taskrt.context import TaskInfo, _task_info
from taskrt.worker import Run, _loads, _parse_run_checked, parse_run


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", call())
    except Exception as exc:  # noqa: BLE001 - compared with the reference's
        return ("raised", (type(exc), str(exc)))


# ---- parse_run ------------------------------------------------------------------------------


class Str(str):
    pass


class Int(int):
    pass


class Color(enum.IntEnum):
    RED = 1


GOOD: dict[str, Any] = {
    "t": "run", "id": "t1", "task": "add", "queue": "q", "attempt": 2, "args": [1, [2]],
    "kwargs": {"k": None}, "soft_ms": 0, "hard_ms": 300000, "trace_id": "tr", "root_id": "r",
}
#: Values of every kind for each field (valid ones, None, wrong types, subclasses).
VARIANTS: list[Any] = [
    None, "", "x", Str("s"), 0, 7, -1, Int(3), True, False, Color.RED, 1.5, [], [1], {}, {"a": 1},
]


def run_fields(run: Run) -> tuple[Any, ...]:
    return tuple(getattr(run, f.name) for f in dataclasses.fields(run))


def test_parse_run_matches_the_field_by_field_checks() -> None:
    messages: list[dict[str, Any]] = [dict(GOOD), {"t": "run", "id": "t1", "task": "add"}]
    for key in GOOD:
        if key == "t":
            continue
        without = dict(GOOD)
        del without[key]
        messages.append(without)
        for value in VARIANTS:
            messages.append({**GOOD, key: value})
    for msg in messages:
        fast = outcome(lambda: run_fields(parse_run(msg)))
        reference = outcome(lambda: run_fields(_parse_run_checked(msg)))
        assert fast == reference, msg
    assert len(messages) > 150


def test_parse_run_defaults_and_errors() -> None:
    run = parse_run({"t": "run", "id": "t1", "task": "add", "queue": None, "args": None})
    assert (run.queue, run.attempt, run.args, run.kwargs, run.soft_ms, run.soft) == (None, 0, [], {}, None, None)
    assert parse_run({**GOOD, "soft_ms": 1500}).soft == 1.5
    bad: list[tuple[dict[str, Any], str]] = [
        ({"task": "add"}, "`id` is missing"),
        ({"id": "", "task": "add"}, "`id`: expected a non-empty string, got str"),
        ({"id": "t", "task": None}, "`task`: expected a string, got NoneType"),
        ({**GOOD, "attempt": True}, "`attempt`: expected an integer >= 0, got bool"),
        ({**GOOD, "attempt": -1}, "`attempt`: expected an integer >= 0, got int"),
        ({**GOOD, "kwargs": []}, "`kwargs`: expected an object, got list"),
        ({**GOOD, "hard_ms": 1.0}, "`hard_ms`: expected an integer >= 0, got float"),
        ({**GOOD, "args": "x", "kwargs": 1}, "`args`: expected an array, got str"),
    ]
    for msg, message in bad:
        with pytest.raises(ValueError) as raised:
            parse_run(msg)
        assert str(raised.value) == message


# ---- call_args ------------------------------------------------------------------------------


def f0() -> None: ...
def f1(a: int, b: int = 0) -> None: ...
def f2(a: int, /, b: int, *, c: int, d: int = 1) -> None: ...
def f3(*args: Any, **kwargs: Any) -> None: ...
def f4(a: int, *rest: Any, k: int = 2) -> None: ...
def f5(a: int, b: int, /) -> None: ...
def f6(**kw: Any) -> None: ...
def f7(a: int, b: int = 1, *, c: int) -> None: ...
def f8(a: int, b: int = 1, c: int = 2, **kw: Any) -> None: ...
def f9(a: int = 0, /, b: int = 1, *args: Any, c: int = 3) -> None: ...


@functools.wraps(f1)
def wrapped(*args: Any, **kwargs: Any) -> None: ...


def odd() -> None: ...


# A signature no `def` has (a default before a required parameter): inspect decides alone.
odd.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("a", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=1),
        inspect.Parameter("b", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ],
    __validate_parameters__=False,
)

FUNCTIONS = [f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, wrapped, odd, functools.partial(f8, c=5)]
KEYWORDS = ["a", "b", "c", "d", "k", "kw", "rest", "args", "kwargs", "x"]


def bound_call(task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    bound = _exec.bind(task, args, kwargs)
    return tuple(bound.args), list(bound.kwargs.items())


def fast_call(task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    positional, keywords = _exec.call_args(task, args, kwargs)
    return tuple(positional), list(keywords.items())


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda fn: getattr(fn, "__name__", "partial"))
def test_call_args_are_binds_or_its_error(fn: Callable[..., Any]) -> None:
    task: Task[Any, Any] = Task(fn, name="t_" + getattr(fn, "__name__", "partial"))
    checked = 0
    for count in range(5):
        args = [f"p{n}" for n in range(count)]
        for size in range(4):
            for names in itertools.permutations(KEYWORDS, size):
                kwargs = {name: f"k{name}" for name in names}
                fast = outcome(lambda: fast_call(task, args, kwargs))
                reference = outcome(lambda: bound_call(task, args, kwargs))
                assert fast == reference, (args, kwargs)
                checked += 1
    assert checked > 3000


def test_arguments_that_fit_skip_inspect(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_bind(*args: Any) -> Any:
        raise AssertionError("inspect.Signature.bind used")

    monkeypatch.setattr(_exec, "bind", no_bind)
    assert _exec.call_args(Task(f1, name="t_f1"), [1], {}) == ([1], {})
    assert _exec.call_args(Task(f7, name="t_f7"), [1], {"c": 3, "b": 2}) == ([1, 2], {"c": 3})
    assert _exec.call_args(Task(f4, name="t_f4"), [1, 2, 3], {"k": 0}) == ([1, 2, 3], {"k": 0})
    with pytest.raises(AssertionError):
        _exec.call_args(Task(f1, name="t_f1b"), [1, 2, 3], {})  # too many: inspect names why


def test_call_args_follow_a_new_signature_and_name_the_task_in_errors() -> None:
    task: Task[Any, Any] = Task(f1, name="t_follow")
    assert _exec.call_args(task, [1], {}) == ([1], {})
    task.signature_ = inspect.signature(f5)
    with pytest.raises(_exec.ArgumentsMismatch) as raised:
        _exec.call_args(task, [1], {})
    assert str(raised.value) == "arguments do not fit t_follow(a, b, /): missing a required argument: 'b'"
    assert isinstance(raised.value, TypeError)


# ---- TaskInfo -------------------------------------------------------------------------------


def test_the_task_info_the_worker_makes_is_a_task_info() -> None:
    fields = [f.name for f in dataclasses.fields(TaskInfo)]
    assert fields == ["id", "name", "queue", "attempt", "soft_deadline", "trace_id", "root_id", "eager"]
    for values in [("t1", "n", None, 0, None, None, None), ("t2", "n", "q", 3, 12.5, "tr", "root")]:
        fast = _task_info(*values)
        reference = TaskInfo(*values)
        assert type(fast) is TaskInfo
        assert fast == reference and hash(fast) == hash(reference) and repr(fast) == repr(reference)
        assert dataclasses.asdict(fast) == dataclasses.asdict(reference)
        assert fast.enqueue_context() == reference.enqueue_context() and fast.retries == values[3]
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.attempt = 9  # type: ignore[misc]
    assert _task_info("t", "n", None, 0, None, None, None, eager=True).eager is True


# ---- JSON -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"t":"run","id":"t1"}', ' {"a":1}', '{"a":1} ', '\ufeff{"a":1}', '{"a":1} x', '{"a":}',
        "", "   ", "not json", "[1, 2]", '"s"', "12", "NaN", '{"a":NaN}', '{"a":"\\ud800"}',
        '{"a":1}\n', "[" * 100_000, '{"a": [1, {"b": null}], "c": true}', "{}x", "nul",
    ],
)
def test_the_worker_parses_lines_as_json_loads(text: str) -> None:
    def same(value: Any) -> Any:  # NaN == NaN for the comparison
        return json.dumps(value) if isinstance(value, (float, dict, list)) else value

    assert outcome(lambda: same(_loads(text))) == outcome(lambda: same(json.loads(text)))


@pytest.mark.parametrize(
    "value",
    [
        None, True, 0, 1.5, "ascii", "naïve ✓", "\ud800", [1, (2, 3)], {"k": [None, "é"]}, {1: 2},
        math.nan, [math.inf], {1, 2}, {"s": {3}}, {(1, 2): 3}, 10**400, "\u2028",
    ],
)
def test_dumps_is_json_dumps_of_the_runtimes_json(value: Any) -> None:
    def reference() -> str:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
        return text

    assert outcome(lambda: _json.dumps(value)) == outcome(reference)
