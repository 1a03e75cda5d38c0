"""A small HTTP service to put behind a server, and the GET a user would send to a client.

The programs' end-to-end tests fetch ``PAGE`` through ``wavesync client``'s local
port; whatever path carried it, it must come back byte-exact.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["LOOPBACK", "PAGE", "http_get", "page_body", "serve_page"]

LOOPBACK = "127.0.0.1"
PAGE = b"<h1>behind the NAT</h1>" * 2000


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the tests read the page, not the access log


@contextmanager
def serve_page() -> Iterator[tuple[str, int]]:
    """An HTTP server on loopback answering every GET with ``PAGE``; yields its address."""
    server = ThreadingHTTPServer((LOOPBACK, 0), _Page)
    thread = threading.Thread(target=server.serve_forever, name="page-service", daemon=True)
    thread.start()
    try:
        yield (LOOPBACK, int(server.server_address[1]))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def http_get(port: int, timeout: float = 20.0) -> bytes:
    """A plain HTTP/1.0 GET to a client's local port, as curl would send it."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: service\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def page_body(answer: bytes) -> bytes:
    """The body of a 200 answer; an AssertionError naming what came instead."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), answer[:200]
    return body
