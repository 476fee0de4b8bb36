"""The clients' HTTP/1.1: keep-alive connections to one node over the standard library's
``http.client``, shared by threads (the asyncio client runs requests on threads of its own).

Why not httpx: a ``.delay()`` through ``httpx.Client`` cost ~0.5 ms of the producer's CPU
(request and cookie models, hooks, its connection pool), most of a task's enqueue-to-start
time on a quiet node, and one through ``httpx.AsyncClient`` ~1 ms of the event loop's;
``http.client`` does the same request in about a quarter of the first
(``examples/bench_python_workers.py`` reports the producer's CPU per ``.delay()``).

- A request takes an idle connection (the most recently used) or opens one, and gives it back
  once its answer is read whole; at most :data:`MAX_IDLE` stay open.
- An idle connection whose socket is readable was closed by the node (a restart) or carries
  bytes nobody asked for: it is dropped before use, never written to. Nothing is retried: a
  ``POST /tasks`` that failed in flight may have been enqueued, and only its caller can decide
  (an ``idempotency_key`` makes a retry safe).
- After a ``fork()`` the child never uses its parent's connections (a shared socket would mix
  both processes' answers).
- An answer longer than the caller's cap is not read: :class:`TooLarge`, and the connection
  is closed.
"""

from __future__ import annotations

import http.client
import os
import select
import threading
import urllib.parse

#: Idle connections kept open per client.
MAX_IDLE = 16
_CHUNK = 64 * 1024


class TooLarge(Exception):
    """The answer is longer than the cap; ``status`` is its HTTP status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Connections:
    """Keep-alive connections to ``base_url`` (``http`` or ``https``; a path prefix is kept)."""

    def __init__(self, base_url: str, timeout: float, headers: dict[str, str]) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._headers = headers
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    def request(
        self, method: str, path: str, body: bytes | None, max_bytes: int
    ) -> tuple[int, bytes]:
        """Sends one request; its status and body. Raises ``OSError`` or
        ``http.client.HTTPException`` when the node cannot be reached or breaks the protocol,
        :class:`TooLarge` past ``max_bytes``."""
        conn = self._take()
        headers = self._headers
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        try:
            conn.request(method, self._prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            status = response.status
            length = response.length
            if length is not None and length > max_bytes:
                raise TooLarge(status)
            chunks, size = [], 0
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(status)
                chunks.append(chunk)
        except BaseException:
            conn.close()
            raise
        if response.will_close:
            conn.close()
        else:
            self._give_back(conn)
        return status, b"".join(chunks)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            if self._pid != os.getpid():
                # A forked child: the idle sockets are its parent's too. Forget them (closing
                # this process's copies leaves the parent's connections as they are).
                for conn in self._idle:
                    conn.close()
                self._idle.clear()
                self._pid = os.getpid()
            while self._idle:
                conn = self._idle.pop()
                if _still_open(conn):
                    return conn
                conn.close()
        if self._https:
            import ssl

            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE and self._pid == os.getpid():
                self._idle.append(conn)
                return
        conn.close()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle connection is usable while its socket has nothing to read: a readable one was
    closed by the node, or holds bytes that answer nothing we asked."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
