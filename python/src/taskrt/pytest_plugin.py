"""pytest fixtures of taskrt (loaded through the ``pytest11`` entry point).

* ``taskrt_eager``: eager mode for the test (tasks run in-process; the registry is left as
  it is); yields the :class:`taskrt.EagerSession` listing every run.
* ``taskrt_node``: a real ``runtime`` node (``$TASKRT_RUNTIME_BIN``, else ``runtime`` on
  ``PATH``; the test is skipped when there is none) on a free loopback port with a
  ``memory://`` broker, stopped after the test; yields a :class:`taskrt.Client` for it
  (with ``.node``: pid, address, config and log paths). Its config is the
  ``taskrt_config`` fixture (override it) or ``@pytest.mark.taskrt_config("...toml...")``;
  ``taskrt_node_env`` adds environment variables (``PYTHONPATH`` for a Python pool).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from .client import Client
from ._eager import EagerSession, eager

__all__ = ["DEFAULT_CONFIG", "NodeClient", "TaskrtNode", "start_node"]

#: The env var the node reads its admin token from (set by the fixture; name it in
#: ``http.admin_token_env`` of a config of your own to test with a token).
TOKEN_ENV = "TASKRT_TEST_TOKEN"

#: ``taskrt_config``'s default: the built-in native tasks on one queue.
DEFAULT_CONFIG = f"""\
[runtime]
shutdown_grace = "2s"

[broker]
url = "memory://"

[http]
bind = "127.0.0.1:0"
admin_token_env = "{TOKEN_ENV}"

[queues.default]
concurrency = 4
time_limit = "60s"

[tasks.rt_echo]
queue = "default"
handler = {{ kind = "native" }}

[tasks.rt_add]
queue = "default"
handler = {{ kind = "native" }}

[tasks.rt_noop]
queue = "default"
handler = {{ kind = "native" }}

[tasks.rt_sleep]
queue = "default"
handler = {{ kind = "native" }}

[tasks.rt_fail]
queue = "default"
handler = {{ kind = "native" }}
max_retries = 1
backoff = "10ms"
backoff_max = "20ms"
"""

#: How long a node has to write its address.
START_TIMEOUT = 60.0
#: How long it has to stop on SIGTERM before its process group is killed.
STOP_TIMEOUT = 15.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "taskrt_config(toml): the config the taskrt_node fixture starts its node with"
    )


@dataclass
class TaskrtNode:
    """A running node started by :func:`start_node`."""

    process: subprocess.Popen[bytes]
    address: str
    config_path: Path
    log_path: Path
    token: str

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log(self) -> str:
        """What the node has logged so far."""
        return self.log_path.read_text("utf-8", "replace")

    def stop(self) -> int | None:
        """SIGTERM to the node, then SIGKILL to its process group if it has not stopped
        within ``STOP_TIMEOUT``; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()
        return self.process.returncode


class NodeClient(Client):
    """The ``taskrt_node`` fixture's client: a :class:`taskrt.Client` with ``.node``."""

    node: TaskrtNode


def runtime_binary() -> str | None:
    """``$TASKRT_RUNTIME_BIN``, else ``runtime`` on ``PATH``."""
    given = os.environ.get("TASKRT_RUNTIME_BIN")
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("runtime")


def start_node(
    binary: str,
    config: str,
    directory: Path,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> TaskrtNode:
    """Start ``binary`` with ``config`` on a free loopback port; returns once it serves
    HTTP (``RuntimeError`` with its log if it does not)."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "node.toml"
    config_path.write_text(config, "utf-8")
    address_file = directory / "node.address"
    log_path = directory / "node.log"
    token = secrets.token_hex(16)
    # Nothing of the developer's RT_* settings (a production RT_BROKER_URL) reaches it.
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    child_env.update(
        {
            "RT_HTTP_BIND": "127.0.0.1:0",
            TOKEN_ENV: token,
            "RUST_LOG": os.environ.get("RUST_LOG", "info"),
        }
    )
    child_env.update(env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, "--config", str(config_path), "--address-file", str(address_file)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=cwd,
            start_new_session=True,
        )
    node = TaskrtNode(process, "", config_path, log_path, token)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if address_file.exists():
            text = address_file.read_text("utf-8").strip()
            if text:
                node.address = text
                return node
        status = process.poll()
        if status is not None or time.monotonic() > deadline:
            node.stop()
            why = f"exited with status {status}" if status is not None else (
                f"wrote no address within {START_TIMEOUT:g}s"
            )
            tail = "\n".join(node.log().splitlines()[-40:])
            raise RuntimeError(f"the runtime node {why}; its log ({log_path}):\n{tail}")
        time.sleep(0.02)


@pytest.fixture
def taskrt_eager() -> Iterator[EagerSession]:
    """Eager mode for this test: ``.delay()`` runs tasks in-process (failures raise)."""
    with eager() as session:
        yield session


@pytest.fixture
def taskrt_config() -> str:
    """The config ``taskrt_node`` starts its node with (override this fixture, or mark the
    test ``@pytest.mark.taskrt_config(toml)``)."""
    return DEFAULT_CONFIG


@pytest.fixture
def taskrt_node_env() -> dict[str, str]:
    """Environment variables added for the node (and so for its pools' workers)."""
    return {}


@pytest.fixture
def taskrt_node(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    taskrt_config: str,
    taskrt_node_env: dict[str, str],
) -> Iterator[NodeClient]:
    """A real node for this test; yields a client of it (``client.node`` for the rest)."""
    binary = runtime_binary()
    if binary is None:
        pytest.skip(
            "taskrt_node: no runtime binary (set TASKRT_RUNTIME_BIN to its path, or put "
            "`runtime` on PATH)"
        )
    marker = request.node.get_closest_marker("taskrt_config")
    config = str(marker.args[0]) if marker is not None and marker.args else taskrt_config
    node = start_node(binary, config, tmp_path / "taskrt-node", taskrt_node_env)
    try:
        client = NodeClient(node.url, token=node.token)
        client.node = node
        try:
            yield client
        finally:
            client.close()
    finally:
        node.stop()
