"""``python -m taskrt.worker`` driven over a real socketpair, with the environment the
runtime gives it (RT_WORKER_FD, RT_WORKER_MODULES, RT_WORKER_CONCURRENCY, ...)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
PYTHON = os.environ.get("TASKRT_TEST_PYTHON", sys.executable)


class Worker:
    """One worker process and the runtime's end of its socket."""

    def __init__(
        self,
        modules: str = "worker_tasks",
        concurrency: int | None = 1,
        env: dict[str, str] | None = None,
        pythonpath: list[Path] | None = None,
    ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        path = [SRC, HERE, *(pythonpath or [])]
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.pathsep.join(str(p) for p in path),
            "PYTHONUNBUFFERED": "1",
            "RT_WORKER_FD": str(theirs.fileno()),
            "RT_WORKER_MODULES": modules,
            "RT_AGENT_ID": "py-1",
            "RT_POOL": "py",
        }
        if concurrency is not None:
            child_env["RT_WORKER_CONCURRENCY"] = str(concurrency)
        child_env.update(env or {})
        self.proc = subprocess.Popen(
            [PYTHON, "-u", "-m", "taskrt.worker"],
            pass_fds=[theirs.fileno()],
            env=child_env,
            cwd=str(HERE),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        theirs.close()
        self.sock = ours
        self.buf = b""
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        self._drains = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._drains:
            t.start()

    @staticmethod
    def _drain(stream: Any, into: list[bytes]) -> None:
        for line in iter(stream.readline, b""):
            into.append(line)
        stream.close()

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.sock.sendall(data)

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next message (every line must be one JSON object)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no message within {timeout}s; stderr: {self.err()}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError(f"EOF from the worker; stderr: {self.err()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    def ready(self) -> dict[str, Any]:
        message = self.recv()
        assert message["t"] == "ready", message
        return message

    def run(self, task: str, *args: Any, id: str = "t1", attempt: int = 0, soft_ms: int | None = None,
            hard_ms: int = 60_000, kwargs: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
        self.send(self.run_message(task, *args, id=id, attempt=attempt, soft_ms=soft_ms,
                                   hard_ms=hard_ms, kwargs=kwargs))
        done = self.recv(timeout)
        assert done["t"] == "done" and done["id"] == id, done
        return done

    @staticmethod
    def run_message(task: str, *args: Any, id: str = "t1", attempt: int = 0, soft_ms: int | None = None,
                    hard_ms: int = 60_000, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"t": "run", "id": id, "task": task, "queue": "default", "attempt": attempt,
                "args": list(args), "kwargs": kwargs or {}, "soft_ms": soft_ms, "hard_ms": hard_ms}

    def err(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")

    def wait_err(self, text: str, timeout: float = 5.0) -> str:
        """stderr once it holds ``text`` (it is read by another thread)."""
        deadline = time.monotonic() + timeout
        while text not in self.err():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in stderr: {self.err()}")
            time.sleep(0.01)
        return self.err()

    def out(self) -> str:
        return b"".join(self.stdout).decode(errors="replace")

    def wait(self, timeout: float = 10.0) -> int:
        status = self.proc.wait(timeout)
        for t in self._drains:
            t.join(5)
        return status

    def close(self) -> None:
        self.sock.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for t in self._drains:
            t.join(5)


@pytest.fixture
def worker() -> Any:
    w = Worker()
    w.ready()
    yield w
    w.close()


def error_of(done: dict[str, Any]) -> dict[str, Any]:
    assert done["ok"] is False, done
    error = done["error"]
    assert set(error) == {"kind", "type", "message", "traceback", "retry_after_ms"}, error
    return dict(error)


# ---- start-up -------------------------------------------------------------------------------


def test_ready_message_names_the_tasks_and_the_start_line_is_logged() -> None:
    w = Worker(concurrency=None)  # unset: 1
    try:
        ready = w.ready()
        assert ready["pid"] == w.proc.pid
        assert ready["concurrency"] == 1
        assert ready["python"] == ".".join(str(p) for p in sys.version_info[:3]) or ready["python"]
        assert ready["tasks"] == sorted(ready["tasks"])
        assert {"add", "echo", "whoami", "awhoami", "boom"} <= set(ready["tasks"])
        assert set(ready) == {"t", "pid", "python", "tasks", "concurrency"}
        w.sock.shutdown(socket.SHUT_WR)  # EOF: the runtime is gone
        assert w.wait() == 0
        assert f"taskrt worker pid={w.proc.pid} modules=worker_tasks tasks={len(ready['tasks'])} concurrency=1" in w.err()
    finally:
        w.close()


def test_an_import_error_is_fatal_with_exit_status_3() -> None:
    w = Worker(modules="worker_tasks,no_such_module_here")
    try:
        fatal = w.recv()
        assert fatal["t"] == "fatal"
        assert fatal["error"]["type"] == "ModuleNotFoundError"
        assert fatal["error"]["message"] == "No module named 'no_such_module_here'"
        assert "Traceback" in fatal["error"]["traceback"]
        assert w.wait() == 3
    finally:
        w.close()


def test_a_module_raising_at_import_is_fatal() -> None:
    w = Worker(modules="broken_tasks")
    try:
        fatal = w.recv()
        assert fatal == {"t": "fatal", "error": {**fatal["error"], "type": "RuntimeError",
                                                 "message": "settings are broken"}}
        assert "broken_tasks.py" in fatal["error"]["traceback"]
        assert w.wait() == 3
    finally:
        w.close()


def test_a_bad_concurrency_is_fatal_naming_the_variable() -> None:
    w = Worker(concurrency=0)
    try:
        fatal = w.recv()
        assert fatal["t"] == "fatal"
        assert "RT_WORKER_CONCURRENCY: expected an integer 1 to 1024, got '0'" in fatal["error"]["message"]
        assert w.wait() == 3
    finally:
        w.close()


def test_the_socket_is_not_inherited_by_subprocesses(worker: Worker) -> None:
    assert worker.run("inheritable") == {"t": "done", "id": "t1", "ok": True, "result": False}


def test_the_worker_imports_neither_httpx_nor_pytest(worker: Worker) -> None:
    assert worker.run("modules")["result"] == []


# ---- run / done -----------------------------------------------------------------------------


def test_run_and_done(worker: Worker) -> None:
    assert worker.run("add", 2, kwargs={"b": 3}) == {"t": "done", "id": "t1", "ok": True, "result": 5}
    done = worker.run("echo", 1, "two", [3], id="t2", kwargs={"k": {"n": None}})
    assert done["result"] == {"args": [1, "two", [3]], "kwargs": {"k": {"n": None}}}


def test_current_task_in_a_sync_task(worker: Worker) -> None:
    done = worker.run("whoami", id="abc", attempt=2)
    assert done["result"] == {"id": "abc", "name": "whoami", "queue": "default", "attempt": 2,
                              "thread": "MainThread"}


def test_retry_with_after(worker: Worker) -> None:
    error = error_of(worker.run("retry_later", 1.5))
    assert error["kind"] == "retry"
    assert error["type"] == "Retry"
    assert error["retry_after_ms"] == 1500
    assert "retry_later" in error["traceback"]


def test_retry_raised_while_handling_names_the_cause(worker: Worker) -> None:
    error = error_of(worker.run("retry_from"))
    assert (error["kind"], error["message"], error["retry_after_ms"]) == (
        "retry", "ConnectionError: smtp down", None)


def test_an_exception_is_retryable_by_default(worker: Worker) -> None:
    error = error_of(worker.run("boom", "it broke"))
    assert (error["kind"], error["type"], error["message"]) == ("retry", "ValueError", "it broke")
    assert error["retry_after_ms"] is None
    assert 'raise ValueError(message)' in error["traceback"]


def test_permanent(worker: Worker) -> None:
    error = error_of(worker.run("give_up"))
    assert (error["kind"], error["type"], error["message"]) == ("permanent", "Permanent", "card declined")


def test_permanent_for_and_retry_for(worker: Worker) -> None:
    assert error_of(worker.run("declined"))["kind"] == "permanent"
    assert error_of(worker.run("only_conn", "conn", id="t2"))["kind"] == "retry"
    error = error_of(worker.run("only_conn", "key", id="t3"))
    assert (error["kind"], error["type"]) == ("permanent", "KeyError")


def test_max_retries_makes_the_last_failure_permanent(worker: Worker) -> None:
    assert error_of(worker.run("two_retries", attempt=1))["kind"] == "retry"
    error = error_of(worker.run("two_retries", attempt=2, id="t2"))
    assert error["kind"] == "permanent"
    assert error["message"] == "flaky (not retried: attempt 2 reached max_retries=2 of @task)"
    # max_retries=None leaves it to the runtime
    assert error_of(worker.run("unlimited", attempt=50, id="t3"))["kind"] == "retry"


def test_arguments_that_do_not_fit_are_permanent(worker: Worker) -> None:
    error = error_of(worker.run("add", 1, 2, 3))
    assert (error["kind"], error["type"]) == ("permanent", "TypeError")
    assert error["message"] == "arguments do not fit add(a, b=0): too many positional arguments"
    error = error_of(worker.run("add", kwargs={"c": 1}, id="t2"))
    assert error["kind"] == "permanent" and "missing a required argument: 'a'" in error["message"]


def test_an_unknown_task_is_permanent(worker: Worker) -> None:
    error = error_of(worker.run("nope"))
    assert error["kind"] == "permanent"
    assert error["type"] == "NotRegistered"
    assert error["message"].startswith("no task named `nope` in this worker (registered: a_set, add, ")


def test_a_result_without_json_form_is_permanent(worker: Worker) -> None:
    error = error_of(worker.run("a_set"))
    assert (error["kind"], error["message"]) == ("permanent", "result of type set is not JSON-serialisable")
    error = error_of(worker.run("nested_bad", id="t2"))
    assert error["message"] == (
        "result of type dict is not JSON-serialisable "
        "(result['ok'][2]: an object is not JSON-serialisable)"
    )
    error = error_of(worker.run("not_a_number", id="t3"))
    assert error["message"] == "result of type float is not JSON-serialisable (nan is not a JSON number)"
    error = error_of(worker.run("surrogate", id="t4"))
    assert error["message"] == (
        "result of type str is not JSON-serialisable (the string holds a lone surrogate at index 4)"
    )
    # the channel is still in step
    assert worker.run("add", 1, id="t5")["result"] == 1


def test_a_result_over_the_message_limit_fails_the_task() -> None:
    w = Worker(env={"RT_WORKER_MAX_MESSAGE_BYTES": "4096"})
    try:
        w.ready()
        assert w.run("big", 1000)["ok"] is True
        error = error_of(w.run("big", 10_000, id="t2"))
        assert (error["kind"], error["type"]) == ("permanent", "ResultTooLarge")
        assert "over the worker's limit of 4096 bytes" in error["message"]
    finally:
        w.close()


def test_print_never_reaches_the_channel(worker: Worker) -> None:
    done = worker.run("chatty")
    assert done == {"t": "done", "id": "t1", "ok": True, "result": "quiet result"}
    assert worker.run("add", 7, id="t2")["result"] == 7
    worker.sock.shutdown(socket.SHUT_WR)
    assert worker.wait() == 0
    assert '{"t":"done","id":"fake","ok":true,"result":"from print"}' in worker.out()
    assert "no newline at the end" in worker.out()
    assert "hello from the task" in worker.err()


def test_sys_exit_in_a_task_fails_the_task_not_the_worker(worker: Worker) -> None:
    error = error_of(worker.run("exits"))
    assert (error["kind"], error["type"], error["message"]) == ("permanent", "SystemExit", "4")
    assert worker.run("add", 1, id="t2")["result"] == 1


def test_unknown_messages_and_bad_lines_are_ignored(worker: Worker) -> None:
    worker.send({"t": "ping"})
    worker.send(b"this is not json\n")
    worker.send(b"[1, 2]\n")
    worker.send({"t": "run", "task": "add"})  # no id: nothing to answer
    worker.send({"t": "run", "id": "bad", "task": "add", "args": "x"})
    done = worker.recv()
    assert done["id"] == "bad"
    assert error_of(done)["message"] == "bad run message: `args`: expected an array, got str"
    assert worker.run("add", 4)["result"] == 4
    worker.wait_err("unknown type 'ping'")
    worker.wait_err("not JSON")


def test_eof_exits_0_and_sigterm_exits_0() -> None:
    w = Worker()
    try:
        w.ready()
        w.proc.send_signal(signal.SIGTERM)
        assert w.wait() == 0
    finally:
        w.close()


# ---- time limits ----------------------------------------------------------------------------


def test_soft_limit_of_a_sync_task(worker: Worker) -> None:
    started = time.monotonic()
    error = error_of(worker.run("sleepy", 10, soft_ms=200))
    assert time.monotonic() - started < 5
    assert (error["kind"], error["type"]) == ("soft_timeout", "SoftTimeLimitExceeded")
    assert error["message"] == "soft time limit (0.2s) exceeded"
    # also in pure Python code, and the alarm is disarmed after each task
    assert error_of(worker.run("busy", 10, soft_ms=200, id="t2"))["kind"] == "soft_timeout"
    assert worker.run("sleepy", 0.4, soft_ms=5000, id="t3")["result"] == "slept"
    assert worker.run("sleepy", 0.4, id="t4")["result"] == "slept"


def test_a_task_that_catches_the_soft_limit_can_return(worker: Worker) -> None:
    assert worker.run("cleans_up", 10, soft_ms=100)["result"] == "cleaned up"


def test_soft_limit_of_an_async_task(worker: Worker) -> None:
    started = time.monotonic()
    error = error_of(worker.run("asleepy", 10, soft_ms=200))
    assert time.monotonic() - started < 5
    assert (error["kind"], error["type"]) == ("soft_timeout", "SoftTimeLimitExceeded")
    assert worker.run("asleepy", 0.05, soft_ms=5000, id="t2")["result"] == "slept"


def test_sigusr2_logs_the_stack_of_a_running_task(worker: Worker) -> None:
    """What the runtime sends just before its SIGKILL at a task's hard limit."""
    timer = threading.Timer(0.3, lambda: os.kill(worker.proc.pid, signal.SIGUSR2))
    timer.start()
    assert worker.run("sleepy", 0.8)["result"] == "slept"
    err = worker.wait_err("in sleepy")
    assert "Most recent call first" in err or "Current thread" in err or "Thread 0x" in err
    # Nothing is dumped without the signal.
    lines = len(worker.stderr)
    assert worker.run("sleepy", 0.6, id="t2")["result"] == "slept"
    assert worker.stderr[lines:] == []


# ---- concurrency ----------------------------------------------------------------------------


def test_concurrency_4_overlaps_async_tasks() -> None:
    w = Worker(concurrency=4)
    try:
        assert w.ready()["concurrency"] == 4
        started = time.monotonic()
        for n in range(4):
            w.send(w.run_message("awhoami", 0.5, id=f"a{n}", attempt=n))
        done = [w.recv() for _ in range(4)]
        elapsed = time.monotonic() - started
        assert elapsed < 1.5, elapsed  # one after the other would take 2 s
        by_id = {d["id"]: d["result"] for d in done}
        assert {i: (r["id"], r["attempt"]) for i, r in by_id.items()} == {
            f"a{n}": (f"a{n}", n) for n in range(4)
        }
        # they really overlapped: each started before any ended
        assert max(r["started"] for r in by_id.values()) < min(r["ended"] for r in by_id.values())
    finally:
        w.close()


def test_concurrency_4_runs_sync_tasks_in_threads() -> None:
    w = Worker(concurrency=4)
    try:
        w.ready()
        started = time.monotonic()
        for n in range(4):
            w.send(w.run_message("sleepy", 0.5, id=f"s{n}"))
        w.send(w.run_message("whoami", id="who", attempt=1))
        done = {d["id"]: d for d in (w.recv() for _ in range(5))}
        assert time.monotonic() - started < 1.9
        assert all(done[f"s{n}"]["result"] == "slept" for n in range(4))
        who = done["who"]["result"]
        assert (who["id"], who["attempt"]) == ("who", 1)
        assert who["thread"].startswith("taskrt-task")
        # errors and the async soft limit in this mode
        w.send(w.run_message("boom", id="b"))
        w.send(w.run_message("asleepy", 10, id="slow", soft_ms=100))
        w.send(w.run_message("a_set", id="set"))
        errors = {d["id"]: error_of(d) for d in (w.recv() for _ in range(3))}
        assert errors["b"]["kind"] == "retry"
        assert errors["slow"]["kind"] == "soft_timeout"
        assert errors["set"]["message"] == "result of type set is not JSON-serialisable"
        w.sock.shutdown(socket.SHUT_WR)
        assert w.wait() == 0
    finally:
        w.close()


# ---- Django ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,closing", [("stale", "close_old_connections"), (None, "close_old_connections"), ("always", "close_all")])
def test_django_is_set_up_first_and_connections_closed_around_each_task(
    tmp_path: Path, mode: str | None, closing: str
) -> None:
    log = tmp_path / "django.log"
    env = {"DJANGO_SETTINGS_MODULE": "mysite.settings", "FAKE_DJANGO_LOG": str(log)}
    if mode:
        env["RT_WORKER_DB_CLOSE"] = mode
    w = Worker(modules="django_tasks", env=env, pythonpath=[HERE / "fake_django"])
    try:
        assert w.ready()["tasks"] == ["dj_task"]
        assert w.run("dj_task")["result"] == "ok"
        w.sock.shutdown(socket.SHUT_WR)
        assert w.wait() == 0
        assert log.read_text().splitlines() == [
            "setup", "import django_tasks", closing, "run dj_task", closing,
        ]
    finally:
        w.close()


def test_django_setup_failing_is_fatal(tmp_path: Path) -> None:
    env = {"DJANGO_SETTINGS_MODULE": "mysite.settings", "FAKE_DJANGO_LOG": str(tmp_path / "log"),
           "FAKE_DJANGO_FAIL": "1"}
    w = Worker(modules="django_tasks", env=env, pythonpath=[HERE / "fake_django"])
    try:
        fatal = w.recv()
        assert (fatal["t"], fatal["error"]["message"]) == ("fatal", "django.setup() failed: no settings")
        assert w.wait() == 3
    finally:
        w.close()


def test_a_bad_db_close_mode_is_fatal() -> None:
    w = Worker(env={"RT_WORKER_DB_CLOSE": "sometimes"})
    try:
        fatal = w.recv()
        assert "RT_WORKER_DB_CLOSE: expected `stale` or `always`, got 'sometimes'" in fatal["error"]["message"]
        assert w.wait() == 3
    finally:
        w.close()
