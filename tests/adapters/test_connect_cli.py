"""The programs: `wavesync server` and `wavesync client` as port forwarders, and `wavesync demo`.

Everything is a real subprocess started as a user would: a mediator, a relay, a
server forwarding to a small HTTP service, a client listening on a local port.
An HTTP request to the client's port must come back from the service behind the
server, over every path the client can be told to use.
"""

from __future__ import annotations

import re
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.daemons import (
    free_udp_port,
    new_system,
    relay_and_mediator,
    run_wavesync,
    wavesync_daemon,
)
from wavesync_proto.discovery import DEFAULT_GROUP

LOOPBACK = "127.0.0.1"
SERVER_READY = r"server (?P<id>[0-9a-f-]+) of system .* accepting on tcp"
CLIENT_READY = r"client listening on tcp (?P<host>[\d.]+):(?P<port>\d+)"
PAGE = b"<h1>behind the NAT</h1>" * 2000


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the test reads the page, not the access log


@pytest.fixture(scope="module")
def web_service() -> Iterator[tuple[str, int]]:
    server = ThreadingHTTPServer((LOOPBACK, 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (LOOPBACK, int(server.server_address[1]))
    finally:
        server.shutdown()
        server.server_close()


def http_get(port: int) -> bytes:
    """A plain HTTP/1.0 GET to the client's local port, as curl would send it."""
    with socket.create_connection((LOOPBACK, port), timeout=20) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: service\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("path", ["auto", "lan", "tcp", "udp", "relay"])
def test_a_client_port_reaches_the_service_behind_the_server(
    tmp_path: Path, web_service: tuple[str, int], path: str
) -> None:
    systems, system_id, key = new_system(tmp_path, "cli")
    group = f"{DEFAULT_GROUP[0]}:{free_udp_port()}"
    lan = ("--lan-group", group, "--lan-interface", LOOPBACK)
    with relay_and_mediator(systems) as daemons, ExitStack() as stack:
        relay_url = daemons.relay_url
        mediator_at = f"{LOOPBACK}:{daemons.mediator[1]}"
        server_id = uuid.uuid4()
        stack.enter_context(
            wavesync_daemon(
                "server",
                "--system-id",
                str(system_id),
                f"--key={key}",
                "--server-id",
                str(server_id),
                "--mediator",
                mediator_at,
                "--relay",
                relay_url,
                "--forward",
                f"{web_service[0]}:{web_service[1]}",
                "--tcp-listen",
                f"{LOOPBACK}:0",
                "--udp-host",
                LOOPBACK,
                *lan,
                ready=SERVER_READY,
            )
        )
        _, client = stack.enter_context(
            wavesync_daemon(
                "client",
                "--server-id",
                str(server_id),
                "--mediator",
                mediator_at,
                "--relay",
                relay_url,
                "--listen",
                f"{LOOPBACK}:0",
                "--path",
                path,
                *lan,
                ready=CLIENT_READY,
            )
        )
        answer = http_get(int(client["port"]))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), answer[:200]
    assert body == PAGE


def test_demo_prints_its_table_and_exits_zero() -> None:
    result = run_wavesync("demo", timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {
        match["path"].strip(): match["connected"]
        for match in re.finditer(
            r"^(?P<path>lan|tcp|udp|udp \(reused\)|relay|auto)\s+(?P<connected>yes|no)\b",
            result.stdout,
            re.MULTILINE,
        )
    }
    assert rows == dict.fromkeys(("lan", "tcp", "udp", "udp (reused)", "relay", "auto"), "yes")
