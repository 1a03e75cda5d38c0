"""Every ```python block of docs/embedding.md runs as is.

The page's convention (stated at its top): each block runs in a fresh interpreter with
MEDIATOR, RELAY, SYSTEM_ID, KEY and SERVER_ID defined before it. This module starts
what those names point at, on loopback: ``wavesync relay`` and ``wavesync mediator``,
and ``wavesync server`` (SERVER_ID) in front of an echo service. A block must exit 0;
one that sends "hello" must print the echo it got back.
"""

from __future__ import annotations

import re
import socketserver
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemons import new_system, relay_and_mediator, wavesync_daemon
from tests.pages import LOOPBACK

DOC = Path(__file__).resolve().parent.parent / "docs" / "embedding.md"
BLOCK = re.compile(r"^```python\n(?P<code>.*?)^```$", re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^#+ (?P<title>.+)$", re.MULTILINE)
SERVER_READY = r"server (?P<id>[0-9a-f-]+) of system .* accepting on tcp"
#: Each block starts an interpreter, connects or serves once and stops.
BLOCK_SECONDS = 60.0


def doc_blocks() -> list[tuple[str, str]]:
    """(where: the headings above it, code) for every python block of the page."""
    text = DOC.read_text(encoding="utf-8")
    found = []
    for index, block in enumerate(BLOCK.finditer(text)):
        headings = [m["title"] for m in HEADING.finditer(text, 0, block.start())]
        where = " / ".join(headings[-2:]) if headings else "top"
        found.append((f"{index}: {where}", block["code"]))
    return found


BLOCKS = doc_blocks()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@contextmanager
def echo_service() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer((LOOPBACK, 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="echo-service", daemon=True)
    thread.start()
    try:
        yield (LOOPBACK, int(server.server_address[1]))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def prelude(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The five names every block may use, as Python source run before it."""
    systems, system_id, key = new_system(tmp_path_factory.mktemp("embedding"), "embedding")
    server_id = uuid.uuid4()
    with echo_service() as echo, relay_and_mediator(systems) as daemons:
        mediator = f"{LOOPBACK}:{daemons.mediator[1]}"
        with wavesync_daemon(
            "server",
            "--system-id",
            str(system_id),
            f"--key={key}",
            "--server-id",
            str(server_id),
            "--mediator",
            mediator,
            "--relay",
            daemons.relay_url,
            "--forward",
            f"{echo[0]}:{echo[1]}",
            "--tcp-listen",
            f"{LOOPBACK}:0",
            "--udp-host",
            LOOPBACK,
            "--no-lan",
            ready=SERVER_READY,
        ):
            # __import__ so that no name but these five leaks into the block.
            yield "\n".join(
                [
                    f"MEDIATOR = {daemons.mediator!r}",
                    f"RELAY = {daemons.relay_url!r}",
                    f"SYSTEM_ID = __import__('uuid').UUID({str(system_id)!r})",
                    f"KEY = {key!r}",
                    f"SERVER_ID = __import__('uuid').UUID({str(server_id)!r})",
                    "",
                ]
            )


def test_the_page_has_a_block_for_each_side_of_each_adapter() -> None:
    code = "\n".join(code for _, code in BLOCKS)
    for package in ("anyio", "asyncio", "blocking"):
        assert f"wavesync_adapters.{package}.agent import" in code, package
        assert f"wavesync_adapters.{package}.connector import" in code, package
    assert code.count("trio.run(main)") == 2  # trio: a server and a client
    assert "UdtConnection" in code  # the core driven by hand


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[where for where, _ in BLOCKS])
def test_a_python_block_runs_as_is(prelude: str, code: str) -> None:
    done = subprocess.run(  # noqa: S603 - the page's own code
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=BLOCK_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if "hello" in code:
        assert "hello" in done.stdout, (done.stdout, done.stderr)
