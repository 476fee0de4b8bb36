#!/usr/bin/env python3
"""Python workers benchmark: the runtime's `[workers]` pool against a Celery prefork worker.

Same machine, same run, same Redis (a private `redis-server` started on a free loopback port
and stopped at the end), the SAME task code (one module defining each task twice: with
Celery's `app.task` and with taskrt's `@task`), two worker processes on each side:

- (a) the runtime: `runtime --config <written>` — Redis broker, one queue `bench`
  (concurrency 2), `[workers.bench]` processes = 2, spares = 0;
- (b) Celery: `celery -A bench_tasks worker -P prefork -c 2` (Redis broker and result
  backend, acks_late — the runtime records every result and re-delivers a task whose worker
  died, so Celery is asked for the same).

Measures:

- drain: N no-op tasks (`--task noop`: they return None; `--task incr`: each INCRs a Redis
  counter with redis-py, ~70 µs of the worker's CPU) are queued BEFORE the consumer starts.
  Runtime: a first node (same queue, same task name, no Python pool) enqueues them through
  `POST /tasks` with an eta a little ahead, and is stopped before that eta; the measured node
  starts after it, with all of them due. Celery: `.delay()` N times, then the worker starts.
  The clock starts when the consumer process is spawned and stops when no task is left
  (polled in Redis every 5 ms: runtime — the queue's stream and delayed set are empty, an entry
  leaving the stream in the same script that records its outcome; Celery — the queue's list
  and its `unacked` hash are empty, a message leaving `unacked` when it is acked, after its
  result was stored). Time-to-ready (runtime: both workers ready in `/pools`; Celery: its
  `worker_ready` signal) is reported separately.
- CPU per task of the consumer side during the drain: utime+stime (children's included) of the
  node and its worker processes / of Celery's main process and its children, from
  /proc/<pid>/stat; and of redis-server.
- latency: against the warm consumer, a Python producer calls `.delay(time.time())` at
  `--rate` tasks/s for `--duration` s; each task RPUSHes `time.time() - enqueued_at` first
  thing; p50/p99/max.

Prints a Markdown table and the exact command lines. Writes nothing into the repository (a
temporary directory holds the configs, the task module and the logs; `--keep` keeps it).

Run it with a virtualenv's python that has `celery[redis]==5.*` and taskrt (installed, or
found in python/src of this repo), from anywhere:

    .venv/bin/python examples/bench_python_workers.py --runtime target/release/runtime
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.dont_write_bytecode = True  # nothing written next to the sources this imports

REPO = Path(__file__).resolve().parents[1]

try:
    import taskrt
except ImportError:
    sys.path.insert(0, str(REPO / "python" / "src"))
    import taskrt

try:
    import celery
    import redis
except ImportError as exc:
    sys.exit(f"error: {exc.name} is not installed in {sys.executable}: pip install 'celery[redis]==5.*'")

CLK_TCK = os.sysconf("SC_CLK_TCK")
QUEUE = "bench"
LATENCY_KEY = "bench:latency"
READY_KEY = "bench:celery_ready"

# The task module both consumers import. One function per task, registered twice.
TASKS_MODULE = '''\
"""Benchmark tasks: each function registered with Celery's app.task and with taskrt's @task."""
import os
import time

import redis
from celery import Celery
from celery.signals import worker_ready

import taskrt

URL = os.environ["BENCH_REDIS_URL"]
r = redis.Redis.from_url(URL)


def noop():
    return None


def incr():
    r.incr("bench:done")


def record_latency(enqueued_at):
    r.rpush("bench:latency", time.time() - float(enqueued_at))


app = Celery("bench_tasks", broker=URL, backend=URL)
app.conf.update(
    task_default_queue="bench",
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
celery_noop = app.task(name="bench_noop")(noop if os.environ["BENCH_TASK"] == "noop" else incr)
celery_latency = app.task(name="bench_latency")(record_latency)

rt_noop = taskrt.task(name="bench_noop", queue="bench")(noop if os.environ["BENCH_TASK"] == "noop" else incr)
rt_latency = taskrt.task(name="bench_latency", queue="bench")(record_latency)


@worker_ready.connect
def _ready(**_):
    r.set("bench:celery_ready", repr(time.time()))
'''


# ---- small helpers ----------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float, pause: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(pause)


def rfc3339(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of one process (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime..cstime are fields 14..17.
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def tree_cpu(root: int) -> float:
    """CPU seconds of `root` and every live descendant (each with its reaped children)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(cpu_seconds(pid) for pid in tree)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


class Process:
    """A child process of ours (its own session, so its whole group can be killed), its log in
    a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, **kwargs: Any) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
            start_new_session=True, **kwargs,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text("utf-8", "replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL to its whole group if it has not exited within `timeout`
        (sent before it is reaped, so the group id is still its own)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout:g}s: SIGKILL to its group")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()


# ---- the bench ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.runtime = str(Path(args.runtime).resolve())
        self.port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.port}/0"
        self.redis_proc: Process | None = None
        self.r: redis.Redis | None = None
        self.taskrt_src = str(Path(taskrt.__file__).resolve().parents[1])
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RT_", "TASKRT_", "CELERY_"))
        }
        os.environ["BENCH_TASK"] = args.task
        self.env.update(
            BENCH_TASK=args.task,
            BENCH_REDIS_URL=self.redis_url,
            PYTHONPATH=os.pathsep.join([str(work), self.taskrt_src]),
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.commands: dict[str, str] = {}
        self.runtime_toml = ""
        (work / "bench_tasks.py").write_text(TASKS_MODULE)
        sys.path.insert(0, str(work))

    # -- redis --

    def start_redis(self) -> None:
        argv = [
            self.args.redis_server, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.work),
        ]
        self.commands["redis"] = shlex.join(argv)
        self.redis_proc = Process("redis-server", argv, self.work / "redis.log")
        self.r = redis.Redis.from_url(self.redis_url)
        r = self.r

        def up() -> bool:
            try:
                return bool(r.ping())
            except redis.ConnectionError:
                return False

        wait_for("redis-server", up, 10)
        os.environ["BENCH_REDIS_URL"] = self.redis_url

    def redis_cpu(self) -> float:
        assert self.redis_proc is not None
        return cpu_seconds(self.redis_proc.pid)

    # -- the runtime --

    def runtime_config(self, python_pool: bool) -> str:
        env = {
            "PYTHONPATH": self.env["PYTHONPATH"],
            "BENCH_REDIS_URL": self.redis_url,
            "BENCH_TASK": self.args.task,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        env_toml = ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items())
        head = f"""\
[runtime]
shutdown_grace = "5s"

[broker]
url = "{self.redis_url}"

[http]
bind = "127.0.0.1:0"

[queues.{QUEUE}]
concurrency = {self.args.queue_concurrency or self.args.processes}
prefetch = {self.args.prefetch}
"""
        if not python_pool:
            # The pre-filling node: the same queue and task names, nothing that runs Python
            # (its tasks are all due after it has stopped).
            return head + f"""
[tasks.bench_noop]
queue = "{QUEUE}"
handler = {{ kind = "exec", command = "true" }}
"""
        return head + f"""
[workers.bench]
python = {json.dumps(sys.executable)}
modules = ["bench_tasks"]
processes = {self.args.processes}
spares = 0
cwd = {json.dumps(str(self.work))}
env = {{ {env_toml} }}

[tasks.bench_noop]
queue = "{QUEUE}"
handler = {{ kind = "python", workers = "bench" }}

[tasks.bench_latency]
queue = "{QUEUE}"
handler = {{ kind = "python", workers = "bench" }}
"""

    def start_node(self, name: str, python_pool: bool) -> tuple[Process, str]:
        config = self.work / f"{name}.toml"
        config.write_text(self.runtime_config(python_pool))
        address = self.work / f"{name}.address"
        address.unlink(missing_ok=True)
        argv = [self.runtime, "--config", str(config), "--address-file", str(address)]
        env = {k: v for k, v in self.env.items() if k not in ("PYTHONPATH",)}
        proc = Process(name, argv, self.work / f"{name}.log", env=env, cwd=str(self.work))
        if python_pool:
            self.commands["runtime"] = shlex.join(argv)
            self.runtime_toml = config.read_text()
        def bound() -> str:
            if not proc.alive():
                raise RuntimeError(f"{name} exited ({proc.proc.returncode}):\n{proc.tail()}")
            return address.read_text().strip() if address.exists() else ""
        url = "http://" + wait_for(f"{name} to serve HTTP", bound, 60)
        return proc, url

    def prefill_runtime(self, n: int) -> None:
        """N bench_noop entries in the queue's delayed set, due a little after the pre-filling
        node has stopped."""
        assert self.r is not None
        margin = max(3.0, n / 4000)
        for _ in range(5):
            self.r.flushall()
            node, url = self.start_node("prefill-node", python_pool=False)
            due = time.time() + margin
            eta = rfc3339(due)
            late = False
            try:
                with taskrt.Client(url, timeout=120) as client:
                    for start in range(0, n, self.args.batch):
                        count = min(self.args.batch, n - start)
                        client.enqueue_many([{"task": "bench_noop", "eta": eta}] * count)
                        if time.time() > due - 1.0:
                            late = True
                            break
            finally:
                node.stop()
            if not late and time.time() < due - 0.2:
                break
            margin *= 2
            log(f"the pre-fill took longer than its eta: again with {margin:g}s")
        else:
            raise RuntimeError("could not pre-fill the runtime's queue before the eta")
        delayed = self.r.zcard(f"rt:{{{QUEUE}}}:delayed")
        if delayed != n:
            raise RuntimeError(f"pre-fill: {delayed} delayed entries, expected {n}")
        log(f"runtime: {n} tasks queued (due at {eta}); waiting for them to be due")
        time.sleep(max(0.0, due - time.time()) + 0.1)

    def run_runtime(self) -> dict[str, Any]:
        n = self.args.tasks
        self.prefill_runtime(n)
        redis_before = self.redis_cpu()
        self.reset_commandstats()
        url = ""

        def pool_ready() -> bool:
            try:
                with urllib_get(url + "/pools") as body:
                    counts = json.loads(body)["pools"]["bench"]["counts"]
            except Exception:  # noqa: BLE001 - not serving yet, or not that shape yet
                return False
            return counts.get("idle", 0) + counts.get("assigned", 0) >= self.args.processes

        log(f"runtime: starting the node ({n} tasks waiting)")
        spawned = time.monotonic()
        node, url = self.start_node("node", python_pool=True)
        try:
            stream, delayed = f"rt:{{{QUEUE}}}:stream", f"rt:{{{QUEUE}}}:delayed"
            result = self.drain(node, spawned, n, pool_ready, {}, (("xlen", stream), ("zcard", delayed)))
            with urllib_get(url + "/queues") as body:
                queue = json.loads(body)["queues"][QUEUE]
            if queue["dead"] or queue["delayed"]:
                raise RuntimeError(f"runtime: tasks failed in the drain: {queue}")
            result["redis_cpu"] = self.redis_cpu() - redis_before
            self.print_commandstats("runtime", n)
            result["latency"] = self.latency(lambda at: self.rt_latency.delay(at), url)
            return result
        finally:
            node.stop()

    def reset_commandstats(self) -> None:
        if self.args.commandstats:
            assert self.r is not None
            self.r.config_resetstat()

    def print_commandstats(self, side: str, tasks: int) -> None:
        """Redis' own accounting of a drain (`INFO commandstats`), per task, by command."""
        if not self.args.commandstats:
            return
        assert self.r is not None
        rows = [
            (stats["usec"] / tasks, stats["calls"] / tasks, name.removeprefix("cmdstat_"))
            for name, stats in self.r.info("commandstats").items()
        ]
        log(f"{side}: Redis commands of the drain (calls and µs per task)")
        for usec, calls, name in sorted(rows, reverse=True)[:12]:
            log(f"  {name:<24} {calls:8.3f} {usec:8.2f}")

    # -- Celery --

    def run_celery(self) -> dict[str, Any]:
        n = self.args.tasks
        assert self.r is not None
        self.r.flushall()
        log(f"celery: enqueuing {n} tasks with .delay()")
        for _ in range(n):
            self.celery_noop.delay()
        queued = self.r.llen(QUEUE)
        if queued != n:
            raise RuntimeError(f"celery pre-fill: {queued} messages in `{QUEUE}`, expected {n}")
        argv = [
            sys.executable, "-m", "celery", "-A", "bench_tasks", "worker", "-P", "prefork",
            "-c", str(self.args.processes), "-Q", QUEUE, "-n", "bench@%h", "-l", "warning",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]
        self.commands["celery"] = shlex.join(argv)
        redis_before = self.redis_cpu()
        self.reset_commandstats()
        ready: dict[str, float] = {}
        spawned_wall = time.time()
        r = self.r

        def celery_ready() -> bool:
            at = r.get(READY_KEY)
            if at is None:
                return False
            ready["wall"] = float(at) - spawned_wall
            return True

        log("celery: starting the worker")
        spawned = time.monotonic()
        proc = Process("celery", argv, self.work / "celery.log", env=self.env, cwd=str(self.work))
        try:
            result = self.drain(proc, spawned, n, celery_ready, ready, (("llen", QUEUE), ("hlen", "unacked")))
            result["redis_cpu"] = self.redis_cpu() - redis_before
            self.print_commandstats("celery", n)
            result["latency"] = self.latency(lambda at: self.celery_latency.delay(at), None)
            return result
        finally:
            proc.stop()

    # -- the two measurements --

    def drain(
        self,
        proc: Process,
        spawned: float,
        n: int,
        is_ready: Callable[[], bool],
        ready: dict[str, float],
        left: tuple[tuple[str, str], ...],
    ) -> dict[str, Any]:
        """Polls what is left in Redis (`left`: (command, key) pairs whose counts add up to
        the tasks not done) and readiness until nothing is; the consumer's CPU."""
        assert self.r is not None
        r = self.r

        def not_done() -> int:
            poll = r.pipeline(transaction=False)
            for command, key in left:
                getattr(poll, command)(key)
            return sum(poll.execute())

        ready_at = cpu_at_ready = None
        done_at_ready = 0
        deadline = spawned + self.args.timeout
        next_ready_check = 0.0
        while True:
            now = time.monotonic()
            done = n - not_done()
            if done >= n:
                elapsed = now - spawned
                cpu = tree_cpu(proc.pid)
                main_cpu = cpu_seconds(proc.pid)
                break
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited during the drain:\n{proc.tail()}")
            if now > deadline:
                raise RuntimeError(f"{proc.name}: {done}/{n} tasks after {self.args.timeout:g}s")
            if ready_at is None and now >= next_ready_check:
                next_ready_check = now + 0.05
                if is_ready():
                    ready_at = now - spawned
                    cpu_at_ready = tree_cpu(proc.pid)
                    done_at_ready = done
            time.sleep(0.005)
        if ready_at is None:
            # Ready before its readiness was seen (Celery's signal is stored in Redis).
            is_ready()
        if "wall" in ready:
            ready_at = ready["wall"]
        steady = None
        if cpu_at_ready is not None and n > done_at_ready:
            steady = (cpu - cpu_at_ready) / (n - done_at_ready)
        log(f"{proc.name}: {n} tasks in {elapsed:.2f}s ({n / elapsed:.0f}/s)")
        return {
            "elapsed": elapsed,
            "rate": n / elapsed,
            "ready": ready_at,
            "cpu": cpu,
            "cpu_per_task": cpu / n,
            "main_cpu_per_task": main_cpu / n,
            "cpu_per_task_steady": steady,
        }

    def latency(self, delay: Callable[[float], Any], url: str | None) -> dict[str, Any]:
        assert self.r is not None
        r = self.r
        if url is not None:
            taskrt.configure(url=url)
        # Warm-up: a few tasks through the whole path first.
        for _ in range(20):
            delay(time.time())
        wait_for("the warm-up tasks", lambda: r.llen(LATENCY_KEY) >= 20, 60)
        r.delete(LATENCY_KEY)
        rate, duration = self.args.rate, self.args.duration
        count = int(rate * duration)
        log(f"latency: {count} tasks at {rate:g}/s")
        start = time.monotonic()
        cpu_before = time.process_time()
        for i in range(count):
            pause = start + i / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            delay(time.time())
        producer_cpu = time.process_time() - cpu_before
        sent_in = time.monotonic() - start
        wait_for(f"{count} latency samples", lambda: r.llen(LATENCY_KEY) >= count, 120, 0.05)
        samples = [float(x) * 1000 for x in r.lrange(LATENCY_KEY, 0, -1)]
        return {
            "count": len(samples),
            "achieved_rate": count / sent_in,
            "producer_cpu_ms": producer_cpu / count * 1000,
            "p50": percentile(samples, 50),
            "p99": percentile(samples, 99),
            "max": max(samples),
        }

    @property
    def tasks_module(self) -> Any:
        import bench_tasks  # the module written into the work directory

        return bench_tasks

    @property
    def celery_noop(self) -> Any:
        return self.tasks_module.celery_noop

    @property
    def celery_latency(self) -> Any:
        return self.tasks_module.celery_latency

    @property
    def rt_latency(self) -> Any:
        return self.tasks_module.rt_latency


@contextlib.contextmanager
def urllib_get(url: str) -> Iterator[bytes]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as response:
        yield response.read()


# ---- the report ---------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def report(args: argparse.Namespace, bench: Bench, rt: dict[str, Any] | None, cy: dict[str, Any] | None) -> str:
    def get(side: dict[str, Any] | None, *path: str) -> Any:
        value: Any = side
        for key in path:
            if value is None:
                return None
            value = value.get(key)
        return value

    n = args.tasks
    rows = [
        (f"drain: {n:,} no-op tasks queued before start, wall (s)", "elapsed", 1, 2),
        ("drain: tasks/s", "rate", 1, 0),
        ("drain: time to ready (s)", "ready", 1, 2),
        ("drain: consumer CPU per task, whole drain (ms)", "cpu_per_task", 1000, 3),
        ("drain: consumer CPU per task, after ready (ms)", "cpu_per_task_steady", 1000, 3),
        ("drain: of the whole drain's, the main process's (node / Celery's parent) (ms)",
         "main_cpu_per_task", 1000, 3),
        ("drain: redis-server CPU per task (ms)", "redis_cpu_per_task", 1000, 3),
    ]
    for side in (rt, cy):
        if side is not None:
            side["redis_cpu_per_task"] = side["redis_cpu"] / n
    lines = [
        f"Python workers benchmark, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, Celery {celery.__version__}, "
        f"redis-py {redis.__version__}, runtime `{args.runtime}`",
        "",
        "| | runtime (`[workers]`, 2 processes) | Celery prefork `-c 2` | runtime ÷ Celery |",
        "|---|---:|---:|---:|",
    ]
    for label, key, scale, digits in rows:
        a, b = get(rt, key), get(cy, key)
        a = a * scale if a is not None else None
        b = b * scale if b is not None else None
        lines.append(f"| {label} | {fmt(a, digits)} | {fmt(b, digits)} | {ratio(a, b)} |")
    lat = f"latency at {args.rate:g}/s for {args.duration:g}s"
    for key, label in (("p50", "p50"), ("p99", "p99"), ("max", "max")):
        a, b = get(rt, "latency", key), get(cy, "latency", key)
        lines.append(f"| {lat}: {label} (ms) | {fmt(a)} | {fmt(b)} | {ratio(a, b)} |")
    a, b = get(rt, "latency", "producer_cpu_ms"), get(cy, "latency", "producer_cpu_ms")
    lines.append(f"| {lat}: producer CPU per `.delay()` (ms) | {fmt(a, 3)} | {fmt(b, 3)} | {ratio(a, b)} |")
    a, b = get(rt, "latency", "achieved_rate"), get(cy, "latency", "achieved_rate")
    lines.append(f"| {lat}: rate the producer achieved (/s) | {fmt(a, 1)} | {fmt(b, 1)} | |")
    lines += [
        "",
        "Commands:",
        "",
        f"- this run: `{shlex.join([sys.executable, *sys.argv])}`",
    ]
    for key in ("redis", "runtime", "celery"):
        if key in bench.commands:
            lines.append(f"- {key}: `{bench.commands[key]}`")
    if bench.runtime_toml:
        lines += ["", "The runtime's config (written into a temporary directory):", "", "```toml",
                  bench.runtime_toml.rstrip(), "```"]
    lines += [
        "",
        "Notes: one machine, one run; the clock of a drain starts when the consumer process is "
        "spawned (its start-up is inside it; time to ready is that part) and stops when no "
        "task is left in Redis (runtime: stream and delayed set; Celery: list and `unacked`), "
        f"polled every 5 ms; the task: `{args.task}`. CPU is utime+stime of the consumer's process tree "
        "(/proc), start-up included in \"whole drain\". Celery: Redis broker and result "
        "backend, task_acks_late=True, prefetch multiplier 4 (default). Runtime: Redis "
        f"broker, queue concurrency {args.queue_concurrency or args.processes}, prefetch "
        f"{args.prefetch}, every result recorded; its backlog "
        "waits in the queue's delayed set (all due) and is moved to the stream by the node as "
        "it starts, which is inside the drain's time. Latency: "
        "time.time() at `.delay()` in the producer to time.time() at the task's first line.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", default=str(REPO / "target" / "release" / "runtime"),
                        help="the runtime binary (default: target/release/runtime)")
    parser.add_argument("-n", "--tasks", type=int, default=20000, help="tasks of the drain (20000)")
    parser.add_argument("--rate", type=float, default=200.0, help="latency: tasks per second (200)")
    parser.add_argument("--duration", type=float, default=10.0, help="latency: seconds (10)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes of each side (2)")
    parser.add_argument("--queue-concurrency", type=int, default=None,
                        help="runtime: the queue's concurrency (default: --processes)")
    parser.add_argument("--prefetch", type=int, default=0,
                        help="runtime: the queue's prefetch (0, the runtime's default)")
    parser.add_argument("--batch", type=int, default=1000, help="tasks per POST /tasks in the pre-fill (1000)")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest drain, seconds (900)")
    parser.add_argument("--only", choices=("runtime", "celery"), help="run one side")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--task", choices=("noop", "incr"), default="noop",
                        help="the drain's task: noop returns None (default); incr INCRs a Redis counter")
    parser.add_argument("--commandstats", action="store_true",
                        help="log Redis' INFO commandstats per task after each drain")
    args = parser.parse_args()
    for name, value, low, high in (
        ("--tasks", args.tasks, 1, 10_000_000),
        ("--rate", args.rate, 0.1, 100_000),
        ("--duration", args.duration, 0.1, 3600),
        ("--processes", args.processes, 1, 256),
        ("--batch", args.batch, 1, 10_000),
        ("--timeout", args.timeout, 1, 86_400),
    ):
        if not low <= value <= high:
            parser.error(f"{name}: {value} is not within {low:g}..{high:g}")
    if args.only != "celery" and not os.access(args.runtime, os.X_OK):
        parser.error(f"--runtime: {args.runtime} is not an executable (cargo build --release --bin runtime)")
    if not shutil.which(args.redis_server) and not os.access(args.redis_server, os.X_OK):
        parser.error(f"--redis-server: {args.redis_server} not found")

    work = Path(tempfile.mkdtemp(prefix="bench-python-workers-"))
    bench = Bench(args, work)
    rt = cy = None
    try:
        bench.start_redis()
        if args.only != "celery":
            rt = bench.run_runtime()
        if args.only != "runtime":
            cy = bench.run_celery()
    finally:
        if bench.redis_proc is not None:
            bench.redis_proc.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report(args, bench, rt, cy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
