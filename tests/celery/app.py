"""The Python side of tests/it/celery.rs: a Celery 5 app whose tasks the runtime runs (queue
`celery`, taken over) or a real Celery worker runs (`tasks.mul`, queue `py`).

Usage: python app.py SCENARIO  (CELERY_BROKER = the private redis URL). Prints one JSON line.
"""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

from celery import Celery, chain
from celery.result import AsyncResult

BROKER = os.environ["CELERY_BROKER"]
app = Celery("tasks", broker=BROKER, backend=BROKER)
app.conf.broker_connection_retry_on_startup = True
app.conf.task_routes = {"tasks.mul": {"queue": "py"}}


@app.task(name="tasks.add")
def add(x, y):  # run by the runtime (rt_add)
    raise RuntimeError("the runtime runs tasks.add, not Python")


@app.task(name="tasks.fail")
def fail(**kwargs):  # run by the runtime (rt_fail)
    raise RuntimeError("the runtime runs tasks.fail, not Python")


@app.task(name="tasks.sleep")
def sleep():  # run by the runtime (an exec task sleeping 5 s)
    raise RuntimeError("the runtime runs tasks.sleep, not Python")


@app.task(name="tasks.noop")
def noop(n):  # run by the runtime (rt_noop)
    raise RuntimeError("the runtime runs tasks.noop, not Python")


@app.task(name="tasks.on_error")
def on_error(task_id):  # run by the runtime (rt_echo)
    raise RuntimeError("the runtime runs tasks.on_error, not Python")


@app.task(name="tasks.mul")
def mul(x, y):  # run by the Python worker on queue `py`
    return x * y


def events(kind):
    """(task_id, at) of the runtime's events of `kind`.

    An entry holds one event per field (its kind -> the rest as JSON; a task's start and its
    outcome share one), or, in the layout the Lua scripts once wrote, one event with a field
    per attribute."""
    client = app.backend.client
    out = []
    for _id, fields in client.xrange("rt:events"):
        fields = {k.decode(): v.decode() for k, v in fields.items()}
        if "kind" in fields:
            if fields["kind"] == kind:
                out.append((fields.get("task_id"), fields.get("at")))
            continue
        for name, rest in fields.items():
            if name == kind:
                rest = json.loads(rest)
                out.append((rest.get("task_id"), rest.get("at")))
    return out


def epoch(at):
    from datetime import datetime

    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def error_of(result, timeout):
    try:
        value = result.get(timeout=timeout)
        return {"value": value}
    except Exception as exc:  # noqa: BLE001 — the test looks at what was raised
        return {"type": type(exc).__name__, "message": str(exc), "state": result.state}


def scenario(name):
    if name == "add":
        result = add.delay(2, 3)
        return {"id": result.id, "value": result.get(timeout=10), "state": result.state}
    if name == "fail":
        result = fail.apply_async(kwargs={"message": "boom from the handler", "permanent": True})
        return error_of(result, 10)
    if name == "countdown":
        sent = time.time()
        result = add.apply_async((1, 1), countdown=2)
        value = result.get(timeout=10)
        # The bridge publishes Celery's SUCCESS before the runtime's own outcome (which carries
        # the `started` event) is committed: wait a moment for the event, do not race it.
        deadline = time.time() + 3
        while True:
            started = [epoch(at) for (tid, at) in events("started") if tid == result.id]
            if started or time.time() > deadline:
                break
            time.sleep(0.02)
        return {"value": value, "started_after": [s - sent for s in started]}
    if name == "time_limit":
        sent = time.time()
        result = sleep.apply_async(time_limit=1)
        time.sleep(0.5)
        running = AsyncResult(result.id, app=app).state
        out = error_of(result, 10)
        out["state_while_running"] = running
        out["elapsed"] = time.time() - sent
        return out
    if name == "revoked":
        # Revoked through the runtime (RT_URL) while it waits for its countdown: never runs,
        # and .get() raises Celery's TaskRevokedError.
        url = os.environ["RT_URL"]
        result = add.apply_async((1, 1), countdown=30)
        deadline = time.time() + 10
        while True:  # until the bridge moved it (its record exists)
            try:
                urllib.request.urlopen(f"{url}/tasks/{result.id}")
                break
            except urllib.error.HTTPError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        revoke = urllib.request.Request(f"{url}/tasks/{result.id}/revoke", data=b"",
                                        method="POST")
        answer = json.load(urllib.request.urlopen(revoke))
        out = error_of(result, 10)
        out["answer"] = answer
        out["ran"] = sum(1 for (tid, _) in events("started") if tid == result.id)
        return out
    if name == "link_error":
        errback = on_error.s().set(task_id="errback-1")
        result = fail.apply_async(kwargs={"message": "no", "permanent": True}, link_error=errback)
        out = error_of(result, 10)
        out["errback"] = AsyncResult("errback-1", app=app).get(timeout=10)
        out["failed_id"] = result.id
        time.sleep(1.0)
        out["errback_runs"] = sum(1 for (tid, _) in events("started") if tid == "errback-1")
        return out
    if name == "chain":
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "app", "worker", "-Q", "py", "--pool=solo",
             "--concurrency=1", "--without-mingle", "--without-gossip", "--without-heartbeat",
             "-l", "warning"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        try:
            result = chain(add.s(2, 3), mul.s(10)).apply_async()
            value = result.get(timeout=20)
            side = mul.delay(6, 7).get(timeout=20)
            return {"value": value, "python_only": side, "parent": result.parent.get(timeout=5)}
        finally:
            worker.terminate()
            worker.wait(timeout=10)
    if name == "malformed":
        client = app.backend.client
        client.lpush("celery", "not json at all")
        unmapped = app.send_task("tasks.unknown", args=(1,))
        bad = {"body": "%%%", "content-type": "application/json", "content-encoding": "utf-8",
               "headers": {"id": "bad-body-1", "task": "tasks.add", "lang": "py"},
               "properties": {"body_encoding": "base64"}}
        client.lpush("celery", json.dumps(bad))
        out = error_of(AsyncResult("bad-body-1", app=app), 10)
        out["unmapped"] = error_of(unmapped, 10)
        # Expired when sent (the bridge moves a message within a millisecond: a short `expires`
        # would race it): the runtime's consumer must not run it.
        expired = add.apply_async(
            (1, 2), expires=datetime.now(timezone.utc) - timedelta(seconds=1))
        out["expired"] = error_of(expired, 10)
        return out
    if name == "flood":
        n = int(os.environ.get("FLOOD", "1000"))
        ids = [noop.delay(i).id for i in range(n)]
        print(json.dumps({"sent": n}), flush=True)
        client = app.backend.client
        keys = [f"celery-task-meta-{i}" for i in ids]
        deadline = time.time() + 25
        done = 0
        while time.time() < deadline:
            metas = client.mget(keys)
            done = sum(1 for m in metas if m and json.loads(m)["status"] == "SUCCESS")
            if done == n:
                break
            time.sleep(0.2)
        # A task's `started` event is buffered (written with the next outcome or by a flusher),
        # so it can come after the task's Celery result: a node SIGKILLed in between leaves a
        # SUCCESS without the event, and the task runs again (writing it) once its lease has
        # passed. Wait for that before counting runs.
        deadline = time.time() + 15
        while True:
            started = {}
            for tid, _ in events("started"):
                started[tid] = started.get(tid, 0) + 1
            if all(i in started for i in ids) or time.time() > deadline:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        started = {}
        for tid, _ in events("started"):
            started[tid] = started.get(tid, 0) + 1
        runs = [started.get(i, 0) for i in ids]
        return {"done": done, "min_runs": min(runs), "max_runs": max(runs),
                "left_in_kombu": client.llen("celery")}
    if name == "latency":
        # enqueue→start: RATE `.delay()` calls a second for N tasks, each one's send time
        # against its runtime `started` event (millisecond resolution), as quantiles in ms.
        n, rate = int(os.environ.get("N", "2000")), float(os.environ.get("RATE", "200"))
        sent, t0 = {}, time.time()
        for i in range(n):
            pause = t0 + i / rate - time.time()
            if pause > 0:
                time.sleep(pause)
            at = time.time()
            sent[noop.delay(i).id] = at
        client = app.backend.client
        keys = [f"celery-task-meta-{i}" for i in sent]
        deadline = time.time() + 30
        while time.time() < deadline:
            if all(m and json.loads(m)["status"] == "SUCCESS" for m in client.mget(keys)):
                break
            time.sleep(0.2)
        waits = sorted((epoch(at) - sent[tid]) * 1000 for (tid, at) in events("started")
                       if tid in sent)
        q = lambda p: round(waits[min(len(waits) - 1, int(p * len(waits)))], 2)
        return {"n": len(waits), "rate": rate, "p50_ms": q(0.5), "p90_ms": q(0.9),
                "p99_ms": q(0.99), "max_ms": round(waits[-1], 2)}
    raise SystemExit(f"unknown scenario {name}")


if __name__ == "__main__":
    print(json.dumps(scenario(sys.argv[1])), flush=True)
