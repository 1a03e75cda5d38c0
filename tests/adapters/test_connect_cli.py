"""The programs: `wavesync server` and `wavesync client` as port forwarders, and `wavesync demo`.

Everything is a real subprocess started as a user would: a mediator, a relay, a
server forwarding to a small HTTP service, a client listening on a local port.
An HTTP request to the client's port must come back from the service behind the
server, over every path the client can be told to use.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.daemons import (
    free_udp_port,
    new_system,
    relay_and_mediator,
    run_wavesync,
    wavesync_daemon,
)
from tests.pages import LOOPBACK, PAGE, http_get, page_body, serve_page
from wavesync_proto.discovery import DEFAULT_GROUP

SERVER_READY = r"server (?P<id>[0-9a-f-]+) of system .* accepting on tcp"
CLIENT_READY = r"client listening on tcp (?P<host>[\d.]+):(?P<port>\d+)"


@pytest.fixture(scope="module")
def web_service() -> Iterator[tuple[str, int]]:
    with serve_page() as address:
        yield address


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
    assert page_body(answer) == PAGE


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
