"""An in-memory harness for tunnel machines: a client, the server side it reaches, and the wire.

``Link`` plays both adapters and the network between them. Each client leg
gets a server-side connection that reads the first request with
``TunnelRequestReader`` and hands it to the method's server machine (or, for
getpost, to a ``GetPostRegistry``), as an HTTP face would; a connect client's
legs meet a canned proxy instead, which answers and then passes raw bytes to a
``RawEndpoint`` target. Bytes can be delivered in pieces cut by a caller's
``split``, so properties can vary read sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from wavesync_proto.tunnel import (
    ConnectClient,
    GetPostClient,
    GetPostRegistry,
    GetPostServer,
    OpenLeg,
    ProxyConfig,
    RawEndpoint,
    RequestRejected,
    StreamData,
    TunnelEndpoint,
    TunnelEvent,
    TunnelLimits,
    TunnelMethod,
    TunnelRequest,
    TunnelRequestReader,
    TunnelState,
    UpgradeClient,
    UpgradeServer,
    WebSocketClient,
    WebSocketServer,
)

HOST, PORT = "mediator.example", 8080
PROXY = ProxyConfig(host="proxy.example", port=3128)
TUNNEL_ID = bytes(range(16))
CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
ALL_METHODS = list(TunnelMethod)

Split = Callable[[bytes], list[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def cutter(sizes: list[int]) -> Split:
    """Cut data into pieces of ``sizes`` (cycled; 0 means "the rest")."""

    def split(data: bytes) -> list[bytes]:
        if not sizes:
            return [data]
        pieces, start, index = [], 0, 0
        while start < len(data):
            size = sizes[index % len(sizes)] or len(data)
            pieces.append(data[start : start + size])
            start += size
            index += 1
        return pieces

    return split


def make_client(
    method: TunnelMethod, *, limits: TunnelLimits | None = None, tunnel_id: bytes = TUNNEL_ID
) -> TunnelEndpoint:
    if method is TunnelMethod.UPGRADE:
        return UpgradeClient(host=HOST, port=PORT, limits=limits)
    if method is TunnelMethod.WEBSOCKET:
        return WebSocketClient(host=HOST, port=PORT, limits=limits)
    if method is TunnelMethod.CONNECT:
        return ConnectClient(host=HOST, port=PORT, proxy=PROXY, limits=limits)
    return GetPostClient(host=HOST, port=PORT, tunnel_id=tunnel_id, limits=limits)


def drain(machine: TunnelEndpoint) -> list[TunnelEvent]:
    events = []
    while (event := machine.next_event()) is not None:
        events.append(event)
    return events


def stream_bytes(events: list[TunnelEvent]) -> bytes:
    return b"".join(event.data for event in events if isinstance(event, StreamData))


@dataclass
class ServerLeg:
    """The server side of one client leg."""

    reader: TunnelRequestReader | None
    machine: TunnelEndpoint | None = None
    leg: int = 0
    #: For connect: the proxy's view until it answered.
    proxy_head: bytearray = field(default_factory=bytearray)
    #: Bytes the server side wrote to the client that are not delivered yet.
    to_client: bytearray = field(default_factory=bytearray)
    client_eof_delivered: bool = False
    server_eof_delivered: bool = False
    rejected: RequestRejected | None = None
    request: TunnelRequest | None = None


class Link:
    """A client machine wired to its server side in memory."""

    def __init__(
        self,
        client: TunnelEndpoint,
        *,
        limits: TunnelLimits | None = None,
        registry: GetPostRegistry | None = None,
        split: Split = whole,
        connect_answer: bytes = CONNECT_OK,
    ) -> None:
        self.client = client
        self.limits = limits
        # ``registry or ...`` would replace an empty registry: it has a length, 0.
        self.registry = GetPostRegistry(limits=limits) if registry is None else registry
        self.split = split
        self.connect_answer = connect_answer
        self.is_connect = isinstance(client, ConnectClient)
        self.legs: dict[int, ServerLeg] = {}
        self.client_events: list[TunnelEvent] = []
        self.server_events: list[TunnelEvent] = []
        self._servers: list[TunnelEndpoint] = []
        self._open_leg(0)

    @property
    def server(self) -> TunnelEndpoint:
        """The server-side machine (the first one; getpost has exactly one)."""
        assert self._servers, "no server machine yet"
        return self._servers[0]

    def _open_leg(self, leg: int) -> None:
        reader = None if self.is_connect else TunnelRequestReader(limits=self.limits)
        self.legs[leg] = ServerLeg(reader=reader)

    def pump(self, *, max_rounds: int = 10_000) -> None:
        """Move bytes and events both ways until nothing moves."""
        for _ in range(max_rounds):
            if not self._step():
                return
        raise AssertionError("the link did not settle")

    def _step(self) -> bool:
        moved = False
        for event in drain(self.client):
            moved = True
            self.client_events.append(event)
            if isinstance(event, OpenLeg):
                self._open_leg(event.leg)
        for leg, side in list(self.legs.items()):
            data = self.client.data_to_send(leg)
            if data:
                moved = True
                for piece in self.split(data):
                    self._to_server(side, piece)
            if self.client.eof_to_send(leg) and not side.client_eof_delivered:
                moved = True
                side.client_eof_delivered = True
                self._to_server(side, b"")
            if side.machine is not None:
                side.to_client += side.machine.data_to_send(side.leg)
            if side.to_client:
                moved = True
                data = bytes(side.to_client)
                side.to_client.clear()
                for piece in self.split(data):
                    self.client.receive_data(piece, leg)
            server_done = side.rejected is not None or (
                side.machine is not None and side.machine.eof_to_send(side.leg)
            )
            if server_done and not side.server_eof_delivered:
                moved = True
                side.server_eof_delivered = True
                self.client.receive_data(b"", leg)
        for server in self._servers:
            for event in drain(server):
                moved = True
                self.server_events.append(event)
        return moved

    def _to_server(self, side: ServerLeg, data: bytes) -> None:
        if side.rejected is not None:
            return
        if side.machine is not None:
            side.machine.receive_data(data, side.leg)
            return
        if side.reader is None:  # connect: the proxy reads the CONNECT head
            side.proxy_head += data
            end = side.proxy_head.find(b"\r\n\r\n")
            if end < 0 and data:
                return
            side.to_client += self.connect_answer
            if not self.connect_answer.startswith(b"HTTP/1.1 2"):
                side.rejected = RequestRejected(status=0, reason="proxy refused")
                return
            target = RawEndpoint(limits=self.limits)
            self._attach(side, target, 0)
            rest = bytes(side.proxy_head[end + 4 :])
            if rest:
                target.receive_data(rest)
            if not data:
                target.receive_data(b"")
            return
        side.reader.receive_data(data)
        side.to_client += side.reader.data_to_send()
        result = side.reader.next_event()
        if isinstance(result, RequestRejected):
            side.rejected = result
        elif isinstance(result, TunnelRequest):
            side.request = result
            self._serve(side, result)

    def _serve(self, side: ServerLeg, request: TunnelRequest) -> None:
        if request.method is TunnelMethod.UPGRADE:
            self._attach(side, UpgradeServer(request, limits=self.limits), 0)
        elif request.method is TunnelMethod.WEBSOCKET:
            self._attach(side, WebSocketServer(request, limits=self.limits), 0)
        elif request.verb == "GET":
            opened = self.registry.open(request, 0.0)
            if isinstance(opened, RequestRejected):
                side.rejected = opened
                side.to_client += opened.response
            else:
                self._attach(side, opened, 0)
        else:
            joined = self.registry.join(request)
            if isinstance(joined, RequestRejected):
                side.rejected = joined
                side.to_client += joined.response
            else:
                self._attach(side, *joined)

    def _attach(self, side: ServerLeg, machine: TunnelEndpoint, leg: int) -> None:
        side.machine, side.leg = machine, leg
        if machine not in self._servers:
            self._servers.append(machine)

    # --- conveniences for tests ------------------------------------------------------

    def client_received(self) -> bytes:
        return stream_bytes(self.client_events)

    def server_received(self) -> bytes:
        return stream_bytes(self.server_events)

    def getpost_server(self) -> GetPostServer:
        assert isinstance(self.server, GetPostServer)
        return self.server


def opened_link(method: TunnelMethod, **options: object) -> Link:
    """A link whose handshake is done (both ends established)."""
    limits = options.pop("limits", None)
    assert limits is None or isinstance(limits, TunnelLimits)
    link = Link(make_client(method, limits=limits), limits=limits, **options)  # type: ignore[arg-type]
    link.pump()
    return link


def state_of(machine: TunnelEndpoint) -> TunnelState:
    """The machine's state, read through a call so that mypy does not narrow it between steps."""
    return machine.state
