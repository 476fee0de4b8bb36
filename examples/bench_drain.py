#!/usr/bin/env python3
"""Backlog drain through the `runtime` binary, with node and redis-server CPU per task.

A private `redis-server` (free loopback port, no persistence, stopped at the end) gets N no-op
native tasks (`rt_noop`) written straight into the queue's stream — the documented producer
path for other languages, `XADD rt:{default}:stream * e '<envelope>'` — before any node
exists. Then the `runtime` binary starts on a config with one queue; the clock starts when its
process is spawned (start-up included) and stops when `GET /queues` shows the queue empty
(nothing ready, nothing in flight; asked every 10 ms). Every task must have succeeded (none delayed or dead).

CPU: utime + stime of the node process and of redis-server over the drain, from
/proc/<pid>/stat, divided by N.

    target/py-venv/bin/python examples/bench_drain.py --runtime target/release/runtime -n 100000

With `--celery N`, each run also drains N no-op Celery tasks with a Celery prefork worker
(`-c 2`, Redis broker and result backend, `acks_late`) on the same box and the same kind of
private redis-server: the messages are queued with `.delay()` before the worker starts, and the
clock runs from spawning `celery worker` (start-up included, as for the node) until the queue
and its unacked messages are empty. Runs alternate (runtime, then Celery) and the table gives
the ratio of the medians.

Needs redis-py (in target/py-venv, made by `bash tests/run --venv-only`; Celery is there too).
Prints one Markdown table row per run (`--runs`), then the median. Writes nothing into the
repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
# How often the driver asks whether the backlog is drained.
POLL = 0.010


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (and of its reaped children), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the ")": state is field 3 of stat(5), so utime (14) is index 11 here.
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS


def wait_for(what: str, check, timeout: float, every: float = 0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not within {timeout} s")


def config(redis_url: str, concurrency: int, prefetch: int, events: bool = True,
           store_result: bool = True) -> str:
    extra = "" if events else "\n[events]\nenabled = false\n"
    if not store_result:
        extra += "\n[tasks.rt_noop]\nhandler = { kind = \"native\" }\nstore_result = false\n"
    return extra + f"""
[broker]
url = "{redis_url}"

[http]
bind = "127.0.0.1:0"

[queues.default]
concurrency = {concurrency}
prefetch = {prefetch}

""" + ("" if not store_result else """
[tasks.rt_noop]
handler = { kind = "native" }
""")


def start_redis(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, int]:
    """A private redis-server on a free loopback port, without persistence."""
    port = free_port()
    proc = subprocess.Popen(
        [args.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return proc, port


def one_run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    redis_proc, port = start_redis(args, work)
    node = None
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        wait_for("redis-server", lambda: _ping(client), 10)
        stream = "rt:{default}:stream"
        for start in range(0, args.tasks, 5000):
            pipe = client.pipeline(transaction=False)
            for _ in range(start, min(start + 5000, args.tasks)):
                envelope = {"id": str(uuid.uuid4()), "task": "rt_noop", "queue": "default"}
                pipe.xadd(stream, {"e": json.dumps(envelope)})
            pipe.execute()
        assert client.xlen(stream) == args.tasks
        path = work / "node.toml"
        path.write_text(config(f"redis://127.0.0.1:{port}/0", args.concurrency, args.prefetch,
                               events=not args.events_off, store_result=not args.no_store_result))
        address = work / "node.address"
        address.unlink(missing_ok=True)
        client.config_resetstat()
        redis_before = cpu_seconds(redis_proc.pid)
        started = time.monotonic()
        node = subprocess.Popen(
            [args.runtime, "--config", str(path), "--address-file", str(address)],
            stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "w"),
        )
        url = wait_for("the node's address", lambda: address.exists() and address.read_text().strip(), 30)
        base = url if url.startswith("http") else f"http://{url}"

        def empty() -> bool:
            with urllib.request.urlopen(f"{base}/queues", timeout=5) as answer:
                q = json.load(answer)["queues"]["default"]
            return q["ready"] == 0 and q["in_flight"] == 0

        # Every 10 ms (the clock's resolution): a poll costs the node and Redis work of their
        # own, and this process a share of the same two cores.
        wait_for("an empty queue", empty, args.timeout, every=POLL)
        took = time.monotonic() - started
        node_cpu = cpu_seconds(node.pid)
        redis_cpu = cpu_seconds(redis_proc.pid) - redis_before
        with urllib.request.urlopen(f"{base}/queues", timeout=5) as answer:
            q = json.load(answer)["queues"]["default"]
        if q["delayed"] or q["dead"]:
            raise RuntimeError(f"tasks failed: {q}")
        if args.commandstats:
            print_commandstats(client, args.tasks)
        return figures(args.tasks, took, node_cpu, redis_cpu)
    finally:
        stop(node, redis_proc)


def print_commandstats(client: redis.Redis, tasks: int) -> None:
    """Redis' own accounting of the drain (`INFO commandstats`): calls and µs per task, by command."""
    rows = []
    for name, stats in client.info("commandstats").items():
        rows.append((stats["usec"] / tasks, stats["calls"] / tasks, name.removeprefix("cmdstat_")))
    print("\n| command | calls per task | µs per task |\n|---|---:|---:|")
    for usec, calls, name in sorted(rows, reverse=True)[:12]:
        print(f"| {name} | {calls:.3f} | {usec:.2f} |")
    print()


CELERY_TASKS = """\
import os

from celery import Celery

app = Celery("drain_tasks", broker=os.environ["BENCH_REDIS_URL"], backend=os.environ["BENCH_REDIS_URL"])
app.conf.update(task_default_queue="default", task_acks_late=True,
                broker_connection_retry_on_startup=True, result_expires=3600)


@app.task(name="rt_noop")
def rt_noop():
    return None
"""


def celery_run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """N no-op Celery tasks queued with .delay(), drained by `celery worker -P prefork -c 2`."""
    redis_proc, port = start_redis(args, work)
    url = f"redis://127.0.0.1:{port}/0"
    worker = None
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        wait_for("redis-server", lambda: _ping(client), 10)
        (work / "drain_tasks.py").write_text(CELERY_TASKS)
        env = dict(os.environ, BENCH_REDIS_URL=url, PYTHONPATH=str(work))
        enqueue = ("import drain_tasks\n"
                   f"for _ in range({args.celery}): drain_tasks.rt_noop.delay()\n")
        subprocess.run([sys.executable, "-c", enqueue], env=env, cwd=work, check=True)
        queued = client.llen("default")
        if queued != args.celery:
            raise RuntimeError(f"celery pre-fill: {queued} messages, expected {args.celery}")
        client.config_resetstat()
        redis_before = cpu_seconds(redis_proc.pid)
        started = time.monotonic()
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "drain_tasks", "worker", "-P", "prefork",
             "-c", "2", "-Q", "default", "-l", "warning", "--without-gossip",
             "--without-mingle", "--without-heartbeat"],
            env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / "celery.log", "w"),
        )

        def empty() -> bool:
            if worker.poll() is not None:
                raise RuntimeError(f"celery exited ({worker.returncode}): see {work}/celery.log")
            return client.llen("default") == 0 and client.hlen("unacked") == 0

        wait_for("an empty Celery queue", empty, args.timeout, every=POLL)
        took = time.monotonic() - started
        workers_cpu = children_cpu(worker.pid)
        redis_cpu = cpu_seconds(redis_proc.pid) - redis_before
        return figures(args.celery, took, workers_cpu, redis_cpu)
    finally:
        stop(worker, redis_proc)


def children_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its live children (Celery's pool processes)."""
    total = cpu_seconds(pid)
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for kid in child.read_text().split():
            try:
                total += cpu_seconds(int(kid))
            except FileNotFoundError:
                pass
    return total


def figures(tasks: int, took: float, consumer_cpu: float, redis_cpu: float) -> dict[str, float]:
    """A run's rate and its CPU per task (consumer: the node, or Celery's worker and pool)."""
    return {
        "rate": tasks / took,
        "seconds": took,
        "node_us": consumer_cpu / tasks * 1e6,
        "redis_us": redis_cpu / tasks * 1e6,
    }


def stop(*procs: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 20 s, to each process still running."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", default=str(REPO / "target" / "release" / "runtime"))
    parser.add_argument("-n", "--tasks", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=256, help="the queue's (256)")
    parser.add_argument("--prefetch", type=int, default=0, help="the queue's (0, the default)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--celery", type=int, default=0, metavar="N",
                        help="also drain N no-op tasks with Celery's prefork worker (-c 2) in each run")
    parser.add_argument("--events-off", action="store_true", help="[events] enabled = false")
    parser.add_argument("--no-store-result", action="store_true",
                        help="the task with store_result = false (no record kept on success)")
    parser.add_argument("--commandstats", action="store_true",
                        help="print Redis' INFO commandstats per task after each run")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = parser.parse_args()
    if args.tasks < 1 or args.runs < 1:
        parser.error("-n and --runs must be at least 1")
    print(f"drain of {args.tasks:,} rt_noop tasks queued before the node starts; "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; `{' '.join(sys.argv)}`")
    print()
    print("| run | drain (tasks/s) | seconds (start-up included) | node CPU per task | redis-server CPU per task |")
    print("|---|---:|---:|---:|---:|")
    runs, celery = [], []
    for n in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
            r = one_run(args, Path(tmp))
        runs.append(r)
        print(f"| {n} | {r['rate']:,.0f} | {r['seconds']:.2f} | {r['node_us']:.1f} µs | {r['redis_us']:.1f} µs |",
              flush=True)
        if args.celery:
            with tempfile.TemporaryDirectory(prefix="bench-drain-celery-") as tmp:
                c = celery_run(args, Path(tmp))
            celery.append(c)
            print(f"| {n}, Celery -c 2 ({args.celery:,} tasks; worker + pool CPU) | {c['rate']:,.0f} "
                  f"| {c['seconds']:.2f} | {c['node_us']:.1f} µs | {c['redis_us']:.1f} µs |", flush=True)
    if len(runs) > 1:
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| **median** | **{med['rate']:,.0f}** | {med['seconds']:.2f} | **{med['node_us']:.1f} µs** "
              f"| **{med['redis_us']:.1f} µs** |")
    if celery:
        rate = statistics.median(r["rate"] for r in runs)
        crate = statistics.median(c["rate"] for c in celery)
        ccpu = statistics.median(c["node_us"] for c in celery)
        print(f"| **Celery median** | **{crate:,.0f}** | | **{ccpu:.1f} µs** | |")
        print(f"\nruntime / Celery drain (medians): **{rate / crate:.1f}x**")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
