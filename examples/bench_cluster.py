#!/usr/bin/env python3
"""Backlog drain through the `runtime` binary on a Redis Cluster of 1 master vs 3 masters.

Each run builds a private cluster on free loopback ports (no replicas, no persistence; one
master holds all 16384 slots, or three masters a third each), writes N no-op native tasks
(`rt_noop`) into the streams of Q queues — `XADD rt:{q}:stream * e '<envelope>'`, before any
node exists — whose names are chosen so that with three masters each queue's slot is on a
different master. Then the `runtime` binary starts with `broker.url = "redis+cluster://…"` and
the Q queues; the clock starts when its process is spawned (start-up included) and stops when
`GET /queues` shows every queue empty (asked every 10 ms). Every task must have succeeded.

CPU: utime + stime over the drain of the node process and of every redis-server of the
cluster (summed), from /proc/<pid>/stat, divided by N.

    target/py-venv/bin/python examples/bench_cluster.py --runtime target/release/runtime -n 60000 --runs 3
    target/py-venv/bin/python examples/bench_cluster.py -n 60000 --runs 3 --queues 1 --partitions 3

Runs alternate (1 master, then 3 masters) and the table ends with the medians and their ratio.
On a machine with fewer cores than masters + the node, more masters cannot drain faster: the
figure to read there is the CPU per task on each side. Needs redis-py (target/py-venv, made by
`bash tests/run --venv-only`) and redis-server / redis-cli on PATH. Writes nothing into the
repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import redis
from redis.crc import key_slot

# The drain driver's helpers (this file's directory is on the path when it runs).
from bench_drain import POLL, REPO, _ping, cpu_seconds, free_port, wait_for

SLOTS = 16384


def ranges(masters: int) -> list[tuple[int, int]]:
    """The slot range of each master (as `redis-cli --cluster create` splits them)."""
    size = SLOTS // masters
    return [(i * size, SLOTS - 1 if i == masters - 1 else (i + 1) * size - 1) for i in range(masters)]


def queue_names(count: int) -> list[str]:
    """`count` queue names whose stream keys fall in different thirds of the slot space."""
    thirds = ranges(3)
    names: list[str] = []
    n = 0
    while len(names) < count:
        name = f"q{n}"
        slot = key_slot(f"rt:{{{name}}}:stream".encode())
        third = next(i for i, (lo, hi) in enumerate(thirds) if lo <= slot <= hi)
        if third == len(names) % 3:
            names.append(name)
        n += 1
    return names


class Cluster:
    """`masters` redis-server processes in cluster mode, all slots assigned, no replicas."""

    def __init__(self, masters: int, work: Path, server: str):
        self.ports = [free_port() for _ in range(masters)]
        self.buses = [free_port() for _ in range(masters)]
        self.procs = []
        for port, bus in zip(self.ports, self.buses):
            d = work / str(port)
            d.mkdir()
            self.procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(d), "--cluster-enabled", "yes",
                 "--cluster-config-file", str(d / "nodes.conf"), "--cluster-port", str(bus)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        clients = [redis.Redis(host="127.0.0.1", port=p) for p in self.ports]
        for c in clients:
            wait_for("redis-server", lambda c=c: _ping(c), 10, every=0.01)
        for c, (lo, hi) in zip(clients, ranges(masters)):
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for c in clients[1:]:
            c.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0], self.buses[0])
        wait_for("cluster_state:ok", lambda: all(
            c.cluster("info")["cluster_state"] == "ok"
            and int(c.cluster("info")["cluster_known_nodes"]) == masters for c in clients), 30)
        self.client = redis.RedisCluster(host="127.0.0.1", port=self.ports[0])

    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        self.client.close()
        for p in self.procs:
            p.kill()
            p.wait()


def config(url: str, queues: list[str], concurrency: int, partitions: int) -> str:
    text = f'[broker]\nurl = "{url}"\n\n[http]\nbind = "127.0.0.1:0"\n\n'
    for q in queues:
        text += f"[queues.{q}]\nconcurrency = {concurrency}\npartitions = {partitions}\n\n"
    # The task's own queue is the first; an envelope's `queue` decides where it is read.
    return text + f'[tasks.rt_noop]\nqueue = "{queues[0]}"\nhandler = {{ kind = "native" }}\n'


def one_run(args: argparse.Namespace, masters: int, work: Path) -> dict[str, float]:
    cluster = Cluster(masters, work, args.redis_server)
    node = None
    try:
        queues = queue_names(args.queues)
        per_queue = args.tasks // len(queues)
        for q in queues:
            # Round robin over the queue's partitions (q, q:1, …), as the runtime enqueues.
            streams = [f"rt:{{{q}}}:stream"] + [f"rt:{{{q}:{p}}}:stream" for p in range(1, args.partitions)]
            for start in range(0, per_queue, 5000):
                pipe = cluster.client.pipeline(transaction=False)
                for n in range(start, min(start + 5000, per_queue)):
                    envelope = {"id": str(uuid.uuid4()), "task": "rt_noop", "queue": q}
                    pipe.xadd(streams[n % len(streams)], {"e": json.dumps(envelope)})
                pipe.execute()
            assert sum(cluster.client.xlen(s) for s in streams) == per_queue
        total = per_queue * len(queues)
        path = work / "node.toml"
        path.write_text(config(cluster.url(), queues, args.concurrency, args.partitions))
        address = work / "node.address"
        redis_before = cluster.cpu()
        started = time.monotonic()
        node = subprocess.Popen([args.runtime, "--config", str(path), "--address-file", str(address)],
                                stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "w"))
        try:
            url = wait_for("the node's address", lambda: address.exists() and address.read_text().strip(), 30)
        except TimeoutError:
            print((work / "node.log").read_text()[-2000:], file=sys.stderr)
            raise
        base = url if url.startswith("http") else f"http://{url}"

        def state() -> dict:
            with urllib.request.urlopen(f"{base}/queues", timeout=5) as answer:
                return json.load(answer)["queues"]

        def empty() -> bool:
            s = state()
            return all(s[q]["ready"] == 0 and s[q]["in_flight"] == 0 for q in queues)

        wait_for("empty queues", empty, args.timeout, every=POLL)
        took = time.monotonic() - started
        node_cpu = cpu_seconds(node.pid)
        redis_cpu = cluster.cpu() - redis_before
        s = state()
        if any(s[q]["delayed"] or s[q]["dead"] for q in queues):
            raise RuntimeError(f"tasks failed: {s}")
        return {"rate": total / took, "seconds": took, "node_us": node_cpu / total * 1e6,
                "redis_us": redis_cpu / total * 1e6}
    finally:
        if node is not None and node.poll() is None:
            node.terminate()
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", default=str(REPO / "target" / "release" / "runtime"))
    parser.add_argument("-n", "--tasks", type=int, default=60_000)
    parser.add_argument("--queues", type=int, default=3, help="queues the backlog is spread over (3)")
    parser.add_argument("--concurrency", type=int, default=256, help="each queue's (256)")
    parser.add_argument("--partitions", type=int, default=1,
                        help="each queue's [queues.NAME] partitions (1); the backlog is spread over them")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = parser.parse_args()
    if args.tasks < args.queues or args.runs < 1 or args.queues < 1:
        parser.error("-n must be at least --queues, --runs and --queues at least 1")
    print(f"drain of {args.tasks:,} rt_noop tasks over {args.queues} queues of {args.partitions} "
          f"partition(s) on a Redis Cluster; "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; `{' '.join(sys.argv)}`\n")
    if args.partitions > 1:
        thirds = ranges(3)
        placed = []
        for q in queue_names(args.queues):
            for p in range(args.partitions):
                tag = q if p == 0 else f"{q}:{p}"
                slot = key_slot(f"rt:{{{tag}}}:stream".encode())
                placed.append(f"{{{tag}}} → master {next(i for i, (lo, hi) in enumerate(thirds) if lo <= slot <= hi) + 1} of 3")
        print("placement with 3 masters: " + ", ".join(placed) + "\n")
    print("| run | masters | drain (tasks/s) | seconds (start-up included) | node CPU per task | redis-servers' CPU per task |")
    print("|---|---:|---:|---:|---:|---:|")
    results: dict[int, list[dict[str, float]]] = {1: [], 3: []}
    for n in range(1, args.runs + 1):
        for masters in (1, 3):
            with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
                r = one_run(args, masters, Path(tmp))
            results[masters].append(r)
            print(f"| {n} | {masters} | {r['rate']:,.0f} | {r['seconds']:.2f} | {r['node_us']:.1f} µs "
                  f"| {r['redis_us']:.1f} µs |", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    for m in (1, 3):
        print(f"| **median** | {m} | **{med[m]['rate']:,.0f}** | {med[m]['seconds']:.2f} "
              f"| **{med[m]['node_us']:.1f} µs** | **{med[m]['redis_us']:.1f} µs** |")
    print(f"\n3 masters / 1 master drain (medians): **{med[3]['rate'] / med[1]['rate']:.2f}x**")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
