#!/usr/bin/env python3
"""Backlog drain through the `runtime` binary, with node and redis-server CPU per task.

A private `redis-server` (free loopback port, no persistence, stopped at the end) gets N no-op
native tasks (`rt_noop`) written straight into the queue's stream — the documented producer
path for other languages, `XADD rt:{default}:stream * e '<envelope>'` — before any node
exists. Then the `runtime` binary starts on a config with one queue; the clock starts when its
process is spawned (start-up included) and stops when `GET /queues` shows the queue empty
(nothing ready, nothing in flight). Every task must have succeeded (none delayed or dead).

CPU: utime + stime of the node process and of redis-server over the drain, from
/proc/<pid>/stat, divided by N.

    target/py-venv/bin/python examples/bench_drain.py --runtime target/release/runtime -n 100000

Needs redis-py (in target/py-venv, made by `bash tests/run --venv-only`). Prints one Markdown
table row per run (`--runs`), then the median. Writes nothing into the repository.
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


def wait_for(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.002)
    raise TimeoutError(f"{what} not within {timeout} s")


def config(redis_url: str, concurrency: int, prefetch: int) -> str:
    return f"""
[broker]
url = "{redis_url}"

[http]
bind = "127.0.0.1:0"

[queues.default]
concurrency = {concurrency}
prefetch = {prefetch}

[tasks.rt_noop]
handler = {{ kind = "native" }}
"""


def one_run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    port = free_port()
    redis_proc = subprocess.Popen(
        [args.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
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
        path.write_text(config(f"redis://127.0.0.1:{port}/0", args.concurrency, args.prefetch))
        address = work / "node.address"
        address.unlink(missing_ok=True)
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

        wait_for("an empty queue", empty, args.timeout)
        took = time.monotonic() - started
        node_cpu = cpu_seconds(node.pid)
        redis_cpu = cpu_seconds(redis_proc.pid) - redis_before
        with urllib.request.urlopen(f"{base}/queues", timeout=5) as answer:
            q = json.load(answer)["queues"]["default"]
        if q["delayed"] or q["dead"]:
            raise RuntimeError(f"tasks failed: {q}")
        return {
            "rate": args.tasks / took,
            "seconds": took,
            "node_us": node_cpu / args.tasks * 1e6,
            "redis_us": redis_cpu / args.tasks * 1e6,
        }
    finally:
        for proc in (node, redis_proc):
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
    runs = []
    for n in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
            r = one_run(args, Path(tmp))
        runs.append(r)
        print(f"| {n} | {r['rate']:,.0f} | {r['seconds']:.2f} | {r['node_us']:.1f} µs | {r['redis_us']:.1f} µs |",
              flush=True)
    if len(runs) > 1:
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| **median** | **{med['rate']:,.0f}** | {med['seconds']:.2f} | **{med['node_us']:.1f} µs** "
              f"| **{med['redis_us']:.1f} µs** |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
