#!/usr/bin/env python3
"""The Python worker's own cost per task: `python -m taskrt.worker` driven over a socket pair
with no-op tasks, one at a time (the runtime's side replaced by this script).

    target/py-venv/bin/python examples/bench_worker_protocol.py 20000

Prints round trips per second and the worker process's CPU (utime + stime, its start-up
included) per task. Writes nothing into the repository (the task module goes to a temporary
directory).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "python" / "src"


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    if n < 1:
        sys.exit("N must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        Path(tmp, "noop_tasks.py").write_text(
            "from taskrt import task\n\n@task(name='noop')\ndef noop():\n    return None\n"
        )
        ours, theirs = socket.socketpair()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": f"{SRC}:{tmp}",
            "PYTHONDONTWRITEBYTECODE": "1",
            "RT_WORKER_FD": str(theirs.fileno()),
            "RT_WORKER_MODULES": "noop_tasks",
            "RT_WORKER_CONCURRENCY": "1",
            "PYTHONUNBUFFERED": "1",
        }
        worker = subprocess.Popen([sys.executable, "-u", "-m", "taskrt.worker"], env=env,
                                  pass_fds=[theirs.fileno()], stderr=subprocess.DEVNULL)
        theirs.close()
        channel = ours.makefile("rwb")
        ready = json.loads(channel.readline())
        assert ready["t"] == "ready", ready
        started = time.perf_counter()
        for i in range(n):
            run = {"t": "run", "id": f"t{i}", "task": "noop", "queue": "q", "attempt": 0,
                   "args": [], "kwargs": {}, "soft_ms": None, "hard_ms": 300000}
            channel.write((json.dumps(run) + "\n").encode())
            channel.flush()
            done = json.loads(channel.readline())
            assert done["ok"], done
        took = time.perf_counter() - started
        worker.terminate()
        worker.wait()
        children = os.times()
        cpu = children.children_user + children.children_system
        print(f"{n / took:,.0f} round trips/s ({took / n * 1e6:.1f} µs each); "
              f"worker CPU {cpu / n * 1e6:.1f} µs per task (start-up included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
