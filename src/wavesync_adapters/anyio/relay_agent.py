"""The server agent's relay side on anyio: keep standby connections open, hand over each tunnel.

Thin by design: ``StandbyPool`` decides how many connections to keep and when
to back off, ``StandbyConnection`` speaks each one; this module opens TCP
connections when the pool says so, moves bytes and time, reports what
happened, and gives every tunnel to the application's handler as a stream.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

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
from ._net import sleep_until_or
from ._streams import PrefixedStream

__all__ = ["RelayAgent", "RelayTunnelInfo"]

log = logging.getLogger("wavesync.relay.agent")

_RECEIVE_BYTES = 65536


TunnelHandler = Callable[[anyio.abc.ByteStream, RelayTunnelInfo], Awaitable[None]]


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
        self._changed = anyio.Event()
        self._pool_changed: anyio.Event | None = None
        self._handler: TunnelHandler | None = None
        self._group: anyio.abc.TaskGroup | None = None

    async def serve(
        self,
        handler: TunnelHandler,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the pool full and run ``handler`` on each tunnel until cancelled.

        The handler owns the stream it is given (and should close it); the agent's
        standby connections close when this is cancelled.
        """
        async with anyio.create_task_group() as group:
            self._handler, self._group = handler, group
            task_status.started()
            while True:
                for attempt in self.pool.poll(anyio.current_time()):
                    group.start_soon(self._standby, attempt.attempt_id)
                self._changed = anyio.Event()
                await sleep_until_or(self._changed, self.pool.get_timer())

    async def wait_for_idle(self, count: int) -> None:
        """Return once at least ``count`` standby connections are idle (no timeout of
        its own: wrap it in ``anyio.fail_after``)."""
        while self.pool.idle < count:
            await self.wait_for_change()

    async def wait_for_change(self) -> None:
        """Return after the pool's next change (an accept, a failure, a tunnel, a loss)."""
        if self._pool_changed is None:
            self._pool_changed = anyio.Event()
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
        try:
            stream = await self.dialer.open(self._handshake_timeout)
        except (OSError, TimeoutError) as exc:
            log.info("relay %s unreachable: %s", self.dialer.describe(), exc)
            pool.attempt_failed(attempt_id, anyio.current_time())
            self._wake()
            return
        handed_over = False
        try:
            handed_over = await self._speak(attempt_id, stream)
        finally:
            if not handed_over:
                await anyio.aclose_forcefully(stream)
            self._wake()

    async def _speak(self, attempt_id: int, stream: anyio.abc.ByteStream) -> bool:
        """Run one standby connection; True once it became a tunnel given to the handler."""
        pool = self.pool
        machine = StandbyConnection(
            key=self._key,
            system_id=self._system_id,
            server_id=self._server_id,
            relay_host=self._relay_host,
            unix_time=time.time(),
            nonce=os.urandom(16),
            now=anyio.current_time(),
            handshake_timeout=self._handshake_timeout,
        )
        accepted = False
        await stream.send(machine.data_to_send())
        while True:
            deadline = machine.get_timer()
            events: list[StandbyEvent] = []
            with anyio.move_on_after(None if deadline is None else deadline - anyio.current_time()):
                try:
                    data = await stream.receive(_RECEIVE_BYTES)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    events = machine.connection_lost()
                else:
                    events = machine.data_received(data, anyio.current_time())
            if not events:
                events = machine.handle_timer(anyio.current_time())
            now = anyio.current_time()
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
                    await self._open_tunnel(attempt_id, stream, machine, event)
                    return True
            self._wake()

    async def _open_tunnel(
        self,
        attempt_id: int,
        stream: anyio.abc.ByteStream,
        machine: StandbyConnection,
        opened: TunnelOpened,
    ) -> None:
        self.pool.standby_taken(attempt_id, anyio.current_time())
        self._wake()  # a replacement is due at once
        await stream.send(machine.data_to_send())  # READY
        info = RelayTunnelInfo(session_id=opened.session_id, client_address=opened.client_address)
        log.debug(
            "tunnel %s from %s", opened.session_id.hex(), format_endpoint(opened.client_address)
        )
        assert self._group is not None
        self._group.start_soon(self._run_handler, attempt_id, stream, opened, info)

    async def _run_handler(
        self,
        attempt_id: int,
        stream: anyio.abc.ByteStream,
        opened: TunnelOpened,
        info: RelayTunnelInfo,
    ) -> None:
        try:
            assert self._handler is not None
            await self._handler(PrefixedStream(stream, opened.first_bytes), info)
        except Exception:
            # One tunnel's failure is the application's bug or its peer's doing; the
            # agent and its other tunnels carry on.
            log.exception("tunnel %s handler failed", opened.session_id.hex())
        finally:
            await anyio.aclose_forcefully(stream)
            self.pool.tunnel_closed(attempt_id)
            self._wake()
