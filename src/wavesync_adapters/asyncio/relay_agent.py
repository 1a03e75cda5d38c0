"""The server agent's relay side on asyncio: keep standby connections open, hand over tunnels.

The twin of ``wavesync_adapters.anyio.relay_agent``: ``StandbyPool`` decides how many
connections to keep and when to back off, ``StandbyConnection`` speaks each one; this
module opens TCP connections when the pool says so, moves bytes and the loop's clock,
reports what happened, and gives every tunnel to the application's handler as an
``(asyncio.StreamReader, asyncio.StreamWriter)`` pair.

Nothing is over-read: the standby exchange (the HTTP 101 answer, then PING/OPEN control
lines) is line-based, so it is fed to the machine one ``readline()`` at a time, and the
client's first bytes, sent right after OPEN, are still in the ``StreamReader`` when the
handler gets it. A standby connection may ride an HTTP tunnel (``tunnel=``), opened by
the ``Dialer`` as on anyio. This module imports nothing of anyio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.relay.standby import (
    StandbyAccepted,
    StandbyConnection,
    StandbyEnded,
    StandbyEvent,
    StandbyRefused,
    TunnelOpened,
)
from wavesync_proto.relay.standby_pool import StandbyPool
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory

from .._common import RelayTunnelInfo
from ._dial import TunnelChoice, dialer_for

__all__ = ["RelayAgent", "RelayTunnelInfo", "TunnelHandler"]

log = logging.getLogger("wavesync.relay.agent")


TunnelHandler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter, RelayTunnelInfo], Awaitable[None]
]


async def _wait_until_or(wake: asyncio.Event, deadline: float | None) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            await wake.wait()


class RelayAgent:
    """Keeps ``target`` standby connections to one relay and serves each tunnel."""

    def __init__(
        self,
        relay: Endpoint,
        *,
        system_id: uuid.UUID,
        server_id: uuid.UUID,
        key: str,
        relay_host: str | None = None,
        target: int = 7,
        handshake_timeout: float = 10.0,
        tunnel: TunnelChoice | None = None,
        proxy: ProxyConfig | None = None,
        tunnel_target: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        tunnel_memory: TunnelMemory | None = None,
    ) -> None:
        """``relay_host`` is the Host header standby requests are signed for (default
        ``host:port`` of ``relay``: it must be what the relay is told it is called).
        ``handshake_timeout`` bounds the TCP connect (or the tunnel's opening) and the
        relay's answer.

        ``tunnel``: each standby connection rides an HTTP tunnel of that kind, or
        the one the probe picks (``"auto"``; the winner is remembered, so later
        connections go straight to it), to the relay's own port (or
        ``tunnel_target``), through ``proxy`` when given; None: plain TCP."""
        self.relay = relay
        self.dialer = dialer_for(
            relay,
            tunnel=tunnel,
            target=tunnel_target,
            proxy=proxy,
            ssl_context=ssl_context,
            memory=tunnel_memory,
        )
        self._relay_host = relay_host or format_endpoint(relay)
        self._system_id, self._server_id, self._key = system_id, server_id, key
        self._handshake_timeout = handshake_timeout
        # Jitter only spreads reconnects over time; it protects nothing.
        self.pool = StandbyPool(random=random.SystemRandom().random, target=target)
        self._changed = asyncio.Event()
        self._pool_changed: asyncio.Event | None = None
        self._handler: TunnelHandler | None = None
        self._group: asyncio.TaskGroup | None = None

    async def serve(
        self, handler: TunnelHandler, *, started: asyncio.Future[None] | None = None
    ) -> None:
        """Keep the pool full and run ``handler`` on each tunnel until cancelled.

        ``started`` is resolved once the first connections are being opened. The writer
        is closed when the handler returns; the standby connections close when this is
        cancelled.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as group:
            self._handler, self._group = handler, group
            if started is not None and not started.done():
                started.set_result(None)
            while True:
                self._changed.clear()
                for attempt in self.pool.poll(loop.time()):
                    group.create_task(self._standby(attempt.attempt_id))
                await _wait_until_or(self._changed, self.pool.get_timer())

    async def wait_for_idle(self, count: int) -> None:
        """Return once at least ``count`` standby connections are idle (no timeout of
        its own: wrap it in ``asyncio.timeout``)."""
        while self.pool.idle < count:
            await self.wait_for_change()

    async def wait_for_change(self) -> None:
        """Return after the pool's next change (an accept, a failure, a tunnel, a loss)."""
        if self._pool_changed is None:
            self._pool_changed = asyncio.Event()
        await self._pool_changed.wait()

    def _wake(self) -> None:
        # Every report to the pool comes through here: the serve loop may have new
        # connections to open, and wait_for_idle a count to check.
        self._changed.set()
        if self._pool_changed is not None:
            self._pool_changed.set()
            self._pool_changed = None

    async def _standby(self, attempt_id: int) -> None:
        pool = self.pool
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await self.dialer.open(self._handshake_timeout)
        except (OSError, TimeoutError) as exc:
            log.info("relay %s unreachable: %s", self.dialer.describe(), exc)
            pool.attempt_failed(attempt_id, loop.time())
            self._wake()
            return
        handed_over = False
        try:
            handed_over = await self._speak(attempt_id, reader, writer)
        finally:
            if not handed_over:
                writer.close()
            self._wake()

    async def _read_line(
        self, machine: StandbyConnection, reader: asyncio.StreamReader
    ) -> list[StandbyEvent]:
        """One line from the relay into the machine, or its timer when the deadline passes."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(machine.get_timer()):
                line = await reader.readline()
        except TimeoutError:
            return machine.handle_timer(loop.time())
        except (OSError, ValueError):  # broken, or a line beyond the reader's limit
            return machine.connection_lost()
        if not line.endswith(b"\n"):  # the relay closed (after a partial line, maybe)
            events = machine.data_received(line, loop.time()) if line else []
            return events or machine.connection_lost()
        return machine.data_received(line, loop.time())

    async def _speak(
        self, attempt_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Run one standby connection; True once it became a tunnel given to the handler."""
        pool = self.pool
        loop = asyncio.get_running_loop()
        machine = StandbyConnection(
            key=self._key,
            system_id=self._system_id,
            server_id=self._server_id,
            relay_host=self._relay_host,
            unix_time=time.time(),
            nonce=os.urandom(16),
            now=loop.time(),
            handshake_timeout=self._handshake_timeout,
        )
        accepted = False
        events: list[StandbyEvent] = []
        try:
            writer.write(machine.data_to_send())
            await writer.drain()
        except OSError:
            events = machine.connection_lost()
        while True:
            if not events:
                events = await self._read_line(machine, reader)
            now = loop.time()
            for event in events:
                if isinstance(event, StandbyAccepted):
                    accepted = True
                    pool.attempt_accepted(attempt_id, now, standby_count=event.standby_count)
                    log.debug("standby %d accepted (idle: %d)", attempt_id, pool.idle)
                elif isinstance(event, StandbyRefused):
                    log.warning("relay refused standby: %d %s", event.status, event.reason)
                    pool.attempt_failed(
                        attempt_id, now, status=event.status, retry_after=event.retry_after
                    )
                    return False
                elif isinstance(event, StandbyEnded):
                    log.info("standby %d ended: %s", attempt_id, event.reason)
                    if accepted:
                        pool.standby_lost(attempt_id, now)
                    else:
                        pool.attempt_failed(attempt_id, now)
                    return False
                else:
                    await self._open_tunnel(attempt_id, reader, writer, machine, event)
                    return True
            if events:
                self._wake()
            events = []

    async def _open_tunnel(
        self,
        attempt_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        machine: StandbyConnection,
        opened: TunnelOpened,
    ) -> None:
        # Read line by line, the machine cannot have taken any of the client's bytes.
        assert not opened.first_bytes, "the standby exchange read past OPEN"
        self.pool.standby_taken(attempt_id, asyncio.get_running_loop().time())
        self._wake()  # a replacement is due at once
        writer.write(machine.data_to_send())  # READY
        info = RelayTunnelInfo(session_id=opened.session_id, client_address=opened.client_address)
        log.debug(
            "tunnel %s from %s", opened.session_id.hex(), format_endpoint(opened.client_address)
        )
        assert self._group is not None
        self._group.create_task(self._run_handler(attempt_id, reader, writer, opened, info))

    async def _run_handler(
        self,
        attempt_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        opened: TunnelOpened,
        info: RelayTunnelInfo,
    ) -> None:
        try:
            assert self._handler is not None
            await self._handler(reader, writer, info)
        except Exception:
            # One tunnel's failure is the application's bug or its peer's doing; the
            # agent and its other tunnels carry on.
            log.exception("tunnel %s handler failed", opened.session_id.hex())
        finally:
            writer.close()
            self.pool.tunnel_closed(attempt_id)
            self._wake()
