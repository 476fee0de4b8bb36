"""A real HTTP/1.1 server on 127.0.0.1 for the blocking client's tests: each request is handed
to a handler as an ``httpx.Request`` (the same handlers the asyncio client's tests give
``httpx.MockTransport``) and its ``httpx.Response`` written back, keep-alive included."""

from __future__ import annotations

import http.server
import socket
import threading
from typing import Any, Callable

import httpx

Handler = Callable[[httpx.Request], httpx.Response]


class Loopback:
    """``with Loopback(handler) as node:`` serves ``node.url`` until the block ends;
    ``node.connections`` counts the connections it accepted, ``node.sockets`` holds them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.sockets: list[socket.socket] = []
        outer = self

        class RequestHandler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # The headers and the body are two writes: without NODELAY the body waits for
                # the client's delayed ACK (40 ms).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                outer.connections += 1
                outer.sockets.append(self.connection)

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = httpx.Request(
                    self.command, f"{outer.url}{self.path}", headers=list(self.headers.items()), content=body
                )
                try:
                    response = outer.handler(request)
                except _Hangup:
                    self.close_connection = True
                    return
                response.read()
                self.send_response(response.status_code)
                for name, value in response.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> Loopback:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Hangup(Exception):
    """Raised by a handler: the server closes the connection without answering."""


def hangup(_request: httpx.Request) -> httpx.Response:
    raise _Hangup


def closed_port() -> int:
    """A loopback port nothing listens on (connecting is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
