#!/usr/bin/env python3
"""The Celery bridge against Celery's own worker, same box, same run, same Redis.

Run with the venv's python (celery[redis] 5.x installed), from the repository root:

    bash tests/run --venv-only     # target/py-venv: Celery, redis-py, taskrt
    cargo build --release --bin runtime
    target/py-venv/bin/python examples/bench_celery_bridge.py [--runtime target/release/runtime]

It starts its own redis-server on a free loopback port (no persistence) and stops it by pid.
Two consumers, one after the other, each on a flushed Redis:

- **celery**: a real Celery prefork worker, `celery worker -c 2 -P prefork -Q celery`, running
  `bench.noop` (a Python function returning None) with the Redis result backend;
- **bridge**: the `runtime` binary (`--runtime`, default `target/release/runtime`) with
  `[celery] queues = ["celery"]` mapping `bench.noop` to the native built-in `rt_noop`.

Two phases per consumer:

- **latency**: the consumer is started and warmed up (200 tasks), then a producer process calls
  `bench.noop.delay(i)` at `--rate` tasks/s for `--seconds` s. Enqueue->start is measured on one
  clock for both consumers, the box's wall clock (`time.time()`, CLOCK_REALTIME): the producer
  takes it just before each `.delay()`; a subscriber process (PSUBSCRIBE
  `celery-task-meta-*`) takes it when the task's `STARTED` state arrives — both consumers run
  with started-tracking on in this phase (Celery `task_track_started = True`, the bridge's
  `track_started = true`), and both publish `STARTED` through the same backend call (`SET` +
  `PUBLISH celery-task-meta-<id>`) as the task starts. Enqueue->result is the same with the
  `SUCCESS` message (what wakes `AsyncResult.get()`). The `.delay()` call's own duration (the
  producer's side of both, from the same clock) is shown beside them.
- **drain**: `--tasks` messages are pre-filled with `.delay()` (started-tracking off), then the
  consumer process is started. The clock starts just before the consumer process is spawned
  and stops at the latest `date_done` among the tasks' results (both write it when the
  task finished: Celery with microseconds, the runtime with milliseconds). Time to ready is
  until Celery's `worker_ready` signal / the node's `GET /health` answering 200.

CPU: user + system seconds of the consumer's process tree (the process and its descendants,
from /proc/<pid>/stat, reaped children included) over the phase, per task; the redis-server's
the same way (the bridge moves work into Redis scripts, so both are shown).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime

BROKER = os.environ.get("BENCH_BROKER")
QUEUE = "celery"

if BROKER:  # imported by the Celery worker (`-A bench_celery_bridge`) or a producer role
    from celery import Celery
    from celery.signals import worker_ready

    app = Celery("bench", broker=BROKER, backend=BROKER)
    app.conf.broker_connection_retry_on_startup = True
    app.conf.task_track_started = os.environ.get("BENCH_TRACK") == "1"
    app.conf.worker_hijack_root_logger = False

    @app.task(name="bench.noop")
    def noop(i=None):
        return None

    @worker_ready.connect
    def _ready(**_):
        app.backend.client.set("bench:ready", repr(time.time()))


# ---------------------------------------------------------------- roles run as child processes


def role_prefill(n, out):
    """`.delay()` n times; the ids into `out`, one a line."""
    ids = [noop.delay(i).id for i in range(n)]
    with open(out, "w") as f:
        f.write("\n".join(ids))


def role_produce(n, rate, out):
    """n `.delay()` calls at `rate`/s on an absolute schedule; into `out`: {id: send time} and
    how long each `.delay()` call took (seconds)."""
    sent, calls, t0 = {}, [], time.time()
    for i in range(n):
        pause = t0 + i / rate - time.time()
        if pause > 0:
            time.sleep(pause)
        at = time.time()
        sent[noop.delay(i).id] = at
        calls.append(time.time() - at)
    with open(out, "w") as f:
        json.dump({"sent": sent, "calls": calls}, f)


def role_subscribe(out):
    """Until SIGTERM: the arrival time of every STARTED and SUCCESS message; into `out`."""
    import redis

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    client = redis.Redis.from_url(BROKER)
    pubsub = client.pubsub()
    pubsub.psubscribe("celery-task-meta-*")
    while (pubsub.get_message(timeout=1) or {}).get("type") != "psubscribe":
        pass
    print("subscribed", flush=True)
    seen = []
    while not stop:
        message = pubsub.get_message(timeout=0.2)
        at = time.time()
        if message and message["type"] == "pmessage":
            seen.append((message["channel"].decode(), message["data"], at))
    arrivals = {"STARTED": {}, "SUCCESS": {}}
    for channel, data, at in seen:
        meta = json.loads(data)
        status = meta.get("status")
        if status in arrivals:
            arrivals[status].setdefault(channel[len("celery-task-meta-"):], at)
    with open(out, "w") as f:
        json.dump(arrivals, f)


# ---------------------------------------------------------------- the driver


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stat(pid):
    """(ppid, cpu seconds of the process and its reaped children), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): ppid = 4, utime = 14, stime = 15, cutime = 16, cstime = 17
    ppid = int(fields[1])
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ppid, ticks / CLK_TCK


def tree_cpu(root):
    """CPU seconds of `root` and every live descendant (reaped ones are in cutime/cstime)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat:
                stats[int(name)] = stat
    children = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(children.get(pid, []))
    return total


def stop(proc, timeout=15):
    """SIGTERM by pid, then SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def date_done(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Bench:
    def __init__(self, args):
        import redis

        self.args = args
        self.here = os.path.dirname(os.path.abspath(__file__))
        self.tmp = tempfile.mkdtemp(prefix="bench-celery-")
        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self.redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.redis = redis.Redis.from_url(self.url)
        deadline = time.time() + 10
        while True:
            try:
                self.redis.ping()
                break
            except redis.ConnectionError:
                if time.time() > deadline:
                    raise
                time.sleep(0.02)
        self.redis_version = self.redis.info("server")["redis_version"]

    def close(self, keep=False):
        """Stops the redis-server; removes the scratch directory (configs, logs) unless `keep`."""
        stop(self.redis_proc)
        if keep:
            print(f"logs and configs kept in {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def env(self, track):
        env = dict(os.environ, BENCH_BROKER=self.url, BENCH_TRACK="1" if track else "0")
        env["PYTHONPATH"] = self.here + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def role(self, *argv, track=False, **kw):
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), *map(str, argv)],
                                env=self.env(track), cwd=self.here, **kw)

    # -- consumers

    def start(self, kind, track):
        """Spawns the consumer; returns (process, ready(): time it became ready or None)."""
        log = open(os.path.join(self.tmp, f"{kind}.log"), "ab")
        if kind == "celery":
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench_celery_bridge", "worker",
                 "-c", "2", "-P", "prefork", "-Q", QUEUE, "-n", "bench@%h",
                 "--without-heartbeat", "--without-mingle", "--without-gossip",
                 "-l", "warning"],
                env=self.env(track), cwd=self.here, stdout=log, stderr=log)

            def ready():
                at = self.redis.get("bench:ready")
                return float(at) if at else None

            return proc, ready
        http = free_port()
        config = os.path.join(self.tmp, "bridge.toml")
        with open(config, "w") as f:
            f.write(f"""
[runtime]
shutdown_grace = "5s"
node_name = "bench"

[http]
bind = "127.0.0.1:{http}"

[broker]
url = "{self.url}"

[queues.default]
concurrency = {self.args.concurrency}
prefetch = {self.args.concurrency}

[tasks.rt_noop]
handler = {{ kind = "native" }}
{self.args.events}

[celery]
queues = ["{QUEUE}"]
{self.args.celery_extra}

[celery.tasks."bench.noop"]
task = "rt_noop"
track_started = {"true" if track else "false"}
""")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        proc = subprocess.Popen([self.args.runtime, "--config", config], env=env,
                                stdout=log, stderr=log)

        def ready():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=1) as r:
                    return time.time() if r.status == 200 else None
            except OSError:
                return None

        return proc, ready

    def wait_ready(self, proc, ready, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"consumer exited ({proc.returncode}); logs in {self.tmp}")
            at = ready()
            if at:
                return at
            time.sleep(0.005)
        raise SystemExit(f"consumer not ready within {timeout}s; logs in {self.tmp}")

    def wait_results(self, ids, timeout=120, every=0.1):
        keys = [f"celery-task-meta-{i}" for i in ids]
        deadline = time.time() + timeout
        # Cheap first (the kombu list emptied), then the results (EXISTS over every key).
        while self.redis.llen(QUEUE) and time.time() < deadline:
            time.sleep(every / 5)
        while time.time() < deadline:
            done = sum(self.redis.exists(*keys[i:i + 5000]) for i in range(0, len(keys), 5000))
            if done == len(keys):
                return
            time.sleep(every)
        raise SystemExit(f"{len(keys) - done} of {len(keys)} results missing after {timeout}s")

    def redis_cpu(self):
        return proc_stat(self.redis_proc.pid)[1]

    # -- phases

    def latency(self, kind):
        self.redis.flushall()
        n = int(self.args.rate * self.args.seconds)
        proc, ready = self.start(kind, track=True)
        try:
            self.wait_ready(proc, ready)
            out = os.path.join(self.tmp, f"{kind}-arrivals.json")
            sub = self.role("_subscribe", out, track=True, stdout=subprocess.PIPE, text=True)
            assert sub.stdout.readline().strip() == "subscribed"
            warm = os.path.join(self.tmp, f"{kind}-warm.json")
            self.role("_produce", 200, 200, warm, track=True).wait()
            self.wait_results(json.load(open(warm))["sent"])
            cpu0, rcpu0 = tree_cpu(proc.pid), self.redis_cpu()
            sent_file = os.path.join(self.tmp, f"{kind}-sent.json")
            if self.role("_produce", n, self.args.rate, sent_file, track=True).wait() != 0:
                raise SystemExit("the producer failed")
            produced = json.load(open(sent_file))
            sent = produced["sent"]
            self.wait_results(sent)
            cpu1, rcpu1 = tree_cpu(proc.pid), self.redis_cpu()
            time.sleep(0.2)  # the last messages reach the subscriber
            sub.send_signal(signal.SIGTERM)
            sub.wait(30)
            arrivals = json.load(open(out))
        finally:
            stop(proc)
        row = {"n": n}
        for status, name in (("STARTED", "start"), ("SUCCESS", "result")):
            waits = [(arrivals[status][i] - at) * 1000 for i, at in sent.items()
                     if i in arrivals[status]]
            row[f"{name}_missing"] = n - len(waits)
            row[f"{name}_p50"] = quantile(waits, 0.5)
            row[f"{name}_p99"] = quantile(waits, 0.99)
        row["delay_p50"] = quantile(produced["calls"], 0.5) * 1000
        row["cpu_ms"] = (cpu1 - cpu0) / n * 1000
        row["redis_cpu_ms"] = (rcpu1 - rcpu0) / n * 1000
        return row

    def drain(self, kind):
        self.redis.flushall()
        n = self.args.tasks
        ids_file = os.path.join(self.tmp, f"{kind}-ids.txt")
        if self.role("_prefill", n, ids_file).wait() != 0:
            raise SystemExit("the prefill failed")
        ids = open(ids_file).read().split()
        queued = self.redis.llen(QUEUE)
        if queued != n:
            raise SystemExit(f"{queued} messages in `{QUEUE}`, expected {n}")
        rcpu0 = self.redis_cpu()
        t0 = time.time()
        proc, ready = self.start(kind, track=False)
        try:
            t_ready = self.wait_ready(proc, ready)
            self.wait_results(ids, every=0.05)
            cpu, rcpu1 = tree_cpu(proc.pid), self.redis_cpu()
        finally:
            stop(proc)
        metas = []
        for i in range(0, n, 5000):
            metas += self.redis.mget([f"celery-task-meta-{t}" for t in ids[i:i + 5000]])
        metas = [json.loads(m) for m in metas]
        failed = [m for m in metas if m["status"] != "SUCCESS"]
        if failed:
            raise SystemExit(f"{len(failed)} tasks did not succeed: {failed[0]}")
        t_end = max(date_done(m["date_done"]) for m in metas)
        left = self.redis.llen(QUEUE)
        return {
            "n": n,
            "secs": t_end - t0,
            "rate": n / (t_end - t0),
            "ready_s": t_ready - t0,
            "rate_after_ready": n / (t_end - t_ready),
            "cpu_ms": cpu / n * 1000,
            "redis_cpu_ms": (rcpu1 - rcpu0) / n * 1000,
            "left": left,
        }


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores (nproc), {model}"


def median_row(rows):
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", default="target/release/runtime",
                        help="the runtime binary (default target/release/runtime)")
    parser.add_argument("--tasks", type=int, default=20000, help="drain: pre-filled messages")
    parser.add_argument("--rate", type=float, default=200, help="latency: .delay() calls/s")
    parser.add_argument("--seconds", type=float, default=10, help="latency: how long")
    parser.add_argument("--runs", type=int, default=1, help="runs of each phase (medians shown)")
    parser.add_argument("--concurrency", type=int, default=256,
                        help="the bridge node's queue concurrency (and prefetch)")
    parser.add_argument("--batch", type=int, help="the bridge's celery.batch (default: its default)")
    parser.add_argument("--movers", type=int,
                        help="the bridge's celery.movers (default: its default)")
    parser.add_argument("--no-events", action="store_true",
                        help="the bridge node with [events] enabled = false")
    parser.add_argument("--only", choices=["celery", "bridge"], help="one consumer only")
    args = parser.parse_args()
    args.celery_extra = "".join(
        f"{key} = {value}\n" for key, value in (("batch", args.batch), ("movers", args.movers))
        if value is not None)
    args.events = "" if not args.no_events else "\n[events]\nenabled = false\n"
    args.runtime = os.path.abspath(args.runtime)
    if not os.access(args.runtime, os.X_OK):
        raise SystemExit(f"no runtime binary at {args.runtime} (cargo build --release)")
    command = " ".join([os.path.relpath(sys.executable) if not sys.executable.startswith("/usr")
                        else sys.executable, os.path.relpath(__file__), *sys.argv[1:]])
    kinds = [args.only] if args.only else ["celery", "bridge"]
    bench = Bench(args)
    load_before = loadavg()
    results = {k: {"latency": [], "drain": []} for k in kinds}
    ok = False
    try:
        for run in range(args.runs):
            for kind in kinds:
                lat = bench.latency(kind)
                results[kind]["latency"].append(lat)
                print(f"run {run + 1} {kind} latency: " + json.dumps(
                    {k: round(v, 3) for k, v in lat.items()}), file=sys.stderr, flush=True)
                dr = bench.drain(kind)
                results[kind]["drain"].append(dr)
                print(f"run {run + 1} {kind} drain: " + json.dumps(
                    {k: round(v, 3) for k, v in dr.items()}), file=sys.stderr, flush=True)
        ok = True
    finally:
        bench.close(keep=not ok)
    load_after = loadavg()
    med = {k: {p: median_row(v) for p, v in r.items()} for k, r in results.items()}
    base = med.get("celery", {}).get("drain", {}).get("rate")
    print(f"\n```sh\n{command}\n```\n")
    print(f"Machine: {machine()}; redis-server {bench.redis_version} (private, loopback, no "
          f"persistence); load average before {load_before}, after {load_after}; "
          f"{args.runs} run(s), medians.\n")
    print("| consumer | enqueue→start p50 | p99 | enqueue→result p50 | p99 | `.delay()` call p50 | CPU/task at "
          f"{args.rate:g}/s (consumer + redis) | drain {args.tasks:,} (tasks/s) | × Celery | "
          "time to ready | tasks/s after ready | CPU/task in drain (consumer + redis) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    names = {"celery": "Celery worker `-c 2` (prefork)", "bridge": "runtime + bridge (`rt_noop`)"}
    for kind in kinds:
        lat, dr = med[kind]["latency"], med[kind]["drain"]
        ratio = f"{dr['rate'] / base:.1f}×" if base else "–"
        print(f"| {names[kind]} | {lat['start_p50']:.2f} ms | {lat['start_p99']:.2f} ms | "
              f"{lat['result_p50']:.2f} ms | {lat['result_p99']:.2f} ms | {lat['delay_p50']:.2f} ms | "
              f"{lat['cpu_ms']:.3f} + {lat['redis_cpu_ms']:.3f} ms | {dr['rate']:,.0f} | {ratio} | "
              f"{dr['ready_s'] * 1000:.0f} ms | {dr['rate_after_ready']:,.0f} | "
              f"{dr['cpu_ms']:.3f} + {dr['redis_cpu_ms']:.3f} ms |")
    missing = {k: (med[k]["latency"]["start_missing"], med[k]["latency"]["result_missing"])
               for k in kinds}
    if any(a or b for a, b in missing.values()):
        print(f"\nmissing STARTED/SUCCESS arrivals (median per run): {missing}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        role, rest = sys.argv[1], sys.argv[2:]
        if role == "_prefill":
            role_prefill(int(rest[0]), rest[1])
        elif role == "_produce":
            role_produce(int(float(rest[0])), float(rest[1]), rest[2])
        elif role == "_subscribe":
            role_subscribe(rest[0])
        else:
            raise SystemExit(f"unknown role {role}")
    else:
        main()
