"""Pairing getpost legs with their tunnels on the server (docs/tunnel.md §5.3).

This module owns the server's table of live getpost tunnels by tunnel id and
the answers to a GET or POST that cannot join one: 409 for an id already open
or a POST out of turn, 404 for a POST naming no live tunnel, 503 when the table
is full. It also remembers recently finished ids (a bounded number), so a
replayed GET cannot reopen a tunnel that ended, and fails a tunnel whose
first POST does not follow its GET in time, so GETs alone cannot fill the
table. It does not read requests or move bytes: ``requests.py`` and
``GetPostServer`` do.
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import LocalProtocolError
from ..mediator.timeouts import TimeoutLane
from .getpost import GetPostServer
from .requests import RequestRejected, TunnelRequest, rejection
from .wire import TunnelLimits, TunnelMethod

__all__ = ["GetPostRegistry"]


class GetPostRegistry:
    """The live getpost tunnels of one server, by tunnel id; bounded in every table."""

    def __init__(
        self,
        *,
        max_tunnels: int = 10_000,
        remember_finished: int = 65_536,
        first_post_timeout: float = 10.0,
        limits: TunnelLimits | None = None,
    ) -> None:
        """``first_post_timeout``: how long after its GET a tunnel may wait for POST 0 (the
        client sends it one round trip after the GET's answer)."""
        if max_tunnels < 1 or remember_finished < 0:
            raise LocalProtocolError("need max_tunnels >= 1 and remember_finished >= 0")
        self._first_posts: TimeoutLane[bytes] = TimeoutLane(first_post_timeout)
        self.limits = limits or TunnelLimits()
        self._max_tunnels = max_tunnels
        self._remember = remember_finished
        self._live: dict[bytes, GetPostServer] = {}
        self._finished: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._live)

    def get(self, tunnel_id: bytes) -> GetPostServer | None:
        return self._live.get(tunnel_id)

    def open(self, request: TunnelRequest, now: float) -> GetPostServer | RequestRejected:
        """A GET: a new tunnel (its leg 0 is this connection), or the answer to refuse it with."""
        self._check(request, "GET")
        assert request.tunnel_id is not None
        if request.tunnel_id in self._live or request.tunnel_id in self._finished:
            # The first GET owns the id: a second one (a guess, a replay, a confused
            # client) is refused and the live tunnel goes on untouched.
            return rejection(409, "this tunnel id is taken")
        if len(self._live) >= self._max_tunnels:
            return rejection(503, "too many getpost tunnels")
        tunnel = GetPostServer(request, limits=self.limits)
        self._live[request.tunnel_id] = tunnel
        self._first_posts.touch(request.tunnel_id, now)
        return tunnel

    def join(self, request: TunnelRequest) -> tuple[GetPostServer, int] | RequestRejected:
        """A POST: the tunnel and the leg number it gave this connection, or the refusal."""
        self._check(request, "POST")
        assert request.tunnel_id is not None
        tunnel = self._live.get(request.tunnel_id)
        if tunnel is None:
            return rejection(404, "no such getpost tunnel")
        leg = tunnel.join(request)
        if isinstance(leg, RequestRejected):
            return leg
        self._first_posts.discard(request.tunnel_id)
        return tunnel, leg

    def get_timer(self) -> float | None:
        """When the oldest tunnel still waiting for its first POST runs out of time."""
        return self._first_posts.next_deadline()

    def handle_timer(self, now: float) -> list[GetPostServer]:
        """Fail the tunnels whose first POST did not come in time; the adapter drains their
        ``TunnelFailed``, closes their GET connection and calls ``release``."""
        expired = []
        while (tunnel_id := self._first_posts.pop_expired(now)) is not None:
            tunnel = self._live.get(tunnel_id)
            if tunnel is not None:
                tunnel.abort("no POST followed the GET in time")
                expired.append(tunnel)
        return expired

    def release(self, tunnel_id: bytes) -> None:
        """The adapter closed every leg of the tunnel: forget it, and keep its id retired."""
        self._first_posts.discard(tunnel_id)
        if self._live.pop(tunnel_id, None) is None:
            return
        if self._remember:
            self._finished[tunnel_id] = None
            while len(self._finished) > self._remember:
                self._finished.popitem(last=False)

    @staticmethod
    def _check(request: TunnelRequest, verb: str) -> None:
        if request.method is not TunnelMethod.GETPOST or request.verb != verb:
            raise LocalProtocolError(
                f"expected a getpost {verb}, not {request.verb} {request.path}"
            )
