"""The methods whose stream is the raw TCP bytes: upgrade and connect (docs/tunnel.md §2, §4).

This module owns the handshakes that end HTTP on a connection: the upgrade
request and its 101 (both sides), the CONNECT through a proxy and its 2xx
(client side; the target just sees raw bytes, ``RawEndpoint``). After them a
byte read is a stream byte and a clean close is a TCP half-close (FIN), which
is all a raw stream can say. It knows nothing of how the request reached the
server: ``requests.py`` read it.
"""

from __future__ import annotations

from ..errors import LocalProtocolError, RemoteProtocolError
from .answer import Answer, AnswerReader, tokens
from .requests import TunnelRequest
from .stream import TunnelEndpoint
from .wire import (
    UPGRADE_PROTOCOL,
    ProxyConfig,
    TunnelLimits,
    TunnelMethod,
    authority,
    request_target,
    tunnel_path,
)

__all__ = ["ConnectClient", "RawEndpoint", "UpgradeClient", "UpgradeServer"]


class _RawStream(TunnelEndpoint):
    """The data phase of a raw method: bytes are the stream, a FIN ends a direction."""

    def _raw_receive(self, data: bytes) -> None:
        if data:
            self._data(data)
        else:
            self._peer_end()

    def _receive(self, data: bytes, leg: int) -> None:
        self._raw_receive(data)

    def _send_stream(self, data: bytes) -> None:
        self._outgoing[0] += data

    def _send_end(self) -> None:
        self._eof.add(0)


class RawEndpoint(_RawStream):
    """A connection that is a raw stream from its first byte: the target behind a CONNECT."""

    method = TunnelMethod.CONNECT

    def __init__(self, *, limits: TunnelLimits | None = None) -> None:
        super().__init__(limits=limits)
        self._established()


class _HandshakingClient(_RawStream):
    """A raw method's client: one request, one answer, then raw bytes."""

    def __init__(self, *, reader: AnswerReader, limits: TunnelLimits) -> None:
        super().__init__(limits=limits)
        self._reader: AnswerReader | None = reader
        self._outgoing[0] += reader.request

    @property
    def buffered(self) -> int:
        return 0 if self._reader is None else self._reader.buffered

    def _receive(self, data: bytes, leg: int) -> None:
        if self._reader is None:
            self._raw_receive(data)
            return
        try:
            answer = self._reader.feed(data)
        except RemoteProtocolError as exc:
            self._fail(str(exc))
            return
        if answer is None:
            return
        self._reader = None
        refusal = self._refusal(answer)
        if refusal is not None:
            retry = answer.headers.get("retry-after")
            auth = answer.headers.get("proxy-authenticate")
            headers = tuple(
                (name, value)
                for name, value in (("Proxy-Authenticate", auth), ("Retry-After", retry))
                if value is not None
            )
            self._fail(refusal, status=answer.status, headers=headers)
            return
        self._established()
        if answer.trailing:
            self._data(answer.trailing)

    def _refusal(self, answer: Answer) -> str | None:
        raise NotImplementedError


class UpgradeClient(_HandshakingClient):
    """``GET /wavesync/tunnel/v1/upgrade`` with ``Upgrade: wavesync-tunnel/1``, then raw bytes."""

    method = TunnelMethod.UPGRADE

    def __init__(
        self,
        *,
        host: str,
        port: int,
        proxy: ProxyConfig | None = None,
        limits: TunnelLimits | None = None,
    ) -> None:
        """``host``/``port`` name the tunnel server (its Host header); ``proxy``, when the
        request goes through a forward proxy in plain HTTP (absolute-form target)."""
        limits = limits or TunnelLimits()
        target, extra = request_target(
            host=host, port=port, path=tunnel_path(TunnelMethod.UPGRADE), proxy=proxy
        )
        reader = AnswerReader(
            method="GET",
            target=target,
            headers=[
                ("Host", authority(host, port)),
                ("Connection", "Upgrade"),
                ("Upgrade", UPGRADE_PROTOCOL),
                ("Cache-Control", "no-cache"),
                *extra,
            ],
            max_head=limits.max_head,
        )
        super().__init__(reader=reader, limits=limits)

    def _refusal(self, answer: Answer) -> str | None:
        if answer.status != 101:
            return f"upgrade refused: {answer.status} {answer.reason}"
        if UPGRADE_PROTOCOL not in tokens(answer.headers.get("upgrade", "")):
            return f"101 to another protocol: {answer.headers.get('upgrade', '')[:80]!r}"
        return None


class UpgradeServer(_RawStream):
    """The server's side of an upgrade tunnel, from the request ``TunnelRequestReader`` read."""

    method = TunnelMethod.UPGRADE

    def __init__(self, request: TunnelRequest, *, limits: TunnelLimits | None = None) -> None:
        if request.method is not TunnelMethod.UPGRADE:
            raise LocalProtocolError(
                f"an upgrade tunnel cannot serve a {request.method.value} request"
            )
        super().__init__(limits=limits)
        self._outgoing[0] += (
            "HTTP/1.1 101 Switching Protocols\r\n"
            "Connection: Upgrade\r\n"
            f"Upgrade: {UPGRADE_PROTOCOL}\r\n\r\n"
        ).encode("ascii")
        self._established()
        self._data(request.trailing)


class ConnectClient(_HandshakingClient):
    """``CONNECT host:port`` through ``proxy``; after its 2xx the target's raw bytes."""

    method = TunnelMethod.CONNECT

    def __init__(
        self,
        *,
        host: str,
        port: int,
        proxy: ProxyConfig,
        limits: TunnelLimits | None = None,
    ) -> None:
        limits = limits or TunnelLimits()
        target = authority(host, port)
        reader = AnswerReader(
            method="CONNECT",
            target=target,
            headers=[("Host", target), *proxy.authorization()],
            max_head=limits.max_head,
        )
        super().__init__(reader=reader, limits=limits)

    def _refusal(self, answer: Answer) -> str | None:
        if 200 <= answer.status < 300:
            return None
        if answer.status == 407:
            return "the proxy wants credentials (407)"
        return f"CONNECT refused: {answer.status} {answer.reason}"
