#!/usr/bin/env python3
"""What enqueueing costs a Python producer: taskrt's `Client.enqueue` and `AsyncClient.enqueue`
against a real node (the release `runtime` binary, `memory://` broker, one native no-op task),
and — as a baseline — the same `POST /tasks` through a bare `httpx.Client` / `httpx.AsyncClient`
(what taskrt's clients were built on before).

    target/py-venv/bin/python examples/bench_client.py --runtime target/release/runtime

For each: CPU of this process per call (time.process_time: the producer's own cost, its
threads included) and wall time per call, N calls one after the other after a warm-up; for
the asyncio client also 16 calls at a time (gather), as a FastAPI app under load would. Median
of --runs rounds, interleaved. Writes nothing into the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

import taskrt

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
[broker]
url = "memory://"

[http]
bind = "127.0.0.1:0"

[queues.default]
concurrency = 64

[tasks.rt_noop]
handler = { kind = "native" }
"""
BODY = json.dumps({"task": "rt_noop", "args": [1]}).encode()
HEADERS = {"Content-Type": "application/json"}


def start_node(runtime: str, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    (work / "node.toml").write_text(CONFIG)
    address = work / "node.address"
    node = subprocess.Popen(
        [runtime, "--config", str(work / "node.toml"), "--address-file", str(address)],
        stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "w"),
    )
    deadline = time.monotonic() + 30
    while not (address.exists() and address.read_text().strip()):
        if node.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the node did not start: see {work}/node.log")
        time.sleep(0.02)
    url = address.read_text().strip()
    return node, url if url.startswith("http") else f"http://{url}"


def timed(n: int, call: Callable[[], Any]) -> tuple[float, float]:
    for _ in range(50):
        call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        call()
    return (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n


def atimed(n: int, open_client: Callable[[], Any], call: Callable[[Any], Awaitable[Any]],
           at_once: int) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        async with open_client() as client:
            for _ in range(50):
                await call(client)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(n // at_once):
                await asyncio.gather(*(call(client) for _ in range(at_once)))
            done = n // at_once * at_once
            return (time.process_time() - cpu) / done, (time.perf_counter() - wall) / done

    return asyncio.run(main())


def measure(url: str, n: int) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    with taskrt.Client(url) as client:
        out["taskrt.Client.enqueue"] = timed(n, lambda: client.enqueue("rt_noop", [1]))
    with httpx.Client(trust_env=False) as bare:
        out["httpx.Client.post (baseline)"] = timed(
            n, lambda: bare.post(f"{url}/tasks", content=BODY, headers=HEADERS).raise_for_status()
        )

    async def enqueue(client: taskrt.AsyncClient) -> Any:
        return await client.enqueue("rt_noop", [1])

    async def post(client: httpx.AsyncClient) -> Any:
        (await client.post(f"{url}/tasks", content=BODY, headers=HEADERS)).raise_for_status()

    for at_once in (1, 16):
        out[f"taskrt.AsyncClient.enqueue, {at_once} at a time"] = atimed(
            n, lambda: taskrt.AsyncClient(url), enqueue, at_once
        )
        out[f"httpx.AsyncClient.post, {at_once} at a time (baseline)"] = atimed(
            n, lambda: httpx.AsyncClient(trust_env=False), post, at_once
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", default=str(REPO / "target" / "release" / "runtime"))
    parser.add_argument("-n", type=int, default=2000, help="calls per measurement (2000)")
    parser.add_argument("--runs", type=int, default=3, help="rounds; the table gives medians (3)")
    args = parser.parse_args()
    if not 100 <= args.n <= 1_000_000 or not 1 <= args.runs <= 100:
        parser.error("-n: 100..1000000, --runs: 1..100")
    rounds: list[dict[str, tuple[float, float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        node, url = start_node(args.runtime, Path(tmp))
        try:
            for run in range(args.runs):
                rounds.append(measure(url, args.n))
                print(f"round {run + 1}/{args.runs} done", file=sys.stderr)
        finally:
            node.terminate()
            node.wait(10)
    print(f"`{' '.join(sys.argv)}`, {args.n} calls per row, median of {args.runs} rounds\n")
    print("| producer | CPU per call (ms) | wall per call (ms) |\n|---|---:|---:|")
    for name in rounds[0]:
        cpu = statistics.median(r[name][0] for r in rounds) * 1000
        wall = statistics.median(r[name][1] for r in rounds) * 1000
        print(f"| {name} | {cpu:.3f} | {wall:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
