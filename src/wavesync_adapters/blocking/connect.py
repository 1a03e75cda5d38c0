"""A client's connect request to the mediator on plain sockets, driven by ``ConnectRequest``.

Thin by design: the same request goes out over UDP (from the socket the client will punch
from) and over a TCP connection at once; which answer counts, when to resend and when to
give up are ``ConnectRequest``'s decisions. The calling thread runs one selector over the
TCP connection and the UDP socket. A punching socket whose datagrams another thread reads
(a UDT endpoint's ``datagram_port()``) cannot be selected on: its I/O thread pokes the
selector's wake-up socket when a datagram is queued (``UdtEndpoint.wake_on_foreign``), so
no thread is started per request (each start and hand-off costs context switches, which
a loaded machine turns into latency). Any other port gets one named reader thread, joined
before the call returns.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import ssl
import threading
import time
import uuid
from typing import Any

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.mediator.connect import ConnectFailed, ConnectRequest, ConnectSucceeded
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory

from ..errors import ConnectError
from ._dial import Dialer, TunnelChoice, dialer_for
from ._net import DatagramPort, SocketDatagramPort, resolve
from .udt import UdtDatagramPort

__all__ = ["ConnectError", "request_connection"]

log = logging.getLogger("wavesync.connect")

_RECEIVE_BYTES = 65536
#: Datagrams taken per wake-up, so a flood on the UDP copy does not starve the TCP copy.
_DATAGRAMS_PER_TURN = 64
#: How often the reader of a non-selectable port looks whether the request is over: the
#: bound on how long returning waits for it when the TCP copy won.
_PORT_POLL_SECONDS = 0.05


def open_udp_for(remote: Endpoint) -> socket.socket:
    """An unconnected UDP socket on every local address of ``remote``'s family, any port."""
    family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # Every interface: a client socket, reachable only by whom it talks to first.
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))  # noqa: S104
    except BaseException:
        sock.close()
        raise
    return sock


def request_connection(
    mediator: Endpoint,
    *,
    server_id: uuid.UUID | None = None,
    system_id: uuid.UUID | None = None,
    udp: DatagramPort | None = None,
    timeout: float = 10.0,
    tunnel: TunnelChoice | None = None,
    http: str | None = None,
    proxy: ProxyConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tunnel_memory: TunnelMemory | None = None,
) -> ConnectSucceeded:
    """Ask the mediator for a server (by id, or any online server of a system).

    ``udp`` is the socket the client will punch from: the mediator tells the server the
    address it saw this request come from. Without one, a fresh socket is used and closed
    (the answer is then good for TCP paths and the relay only). Datagrams on ``udp`` from
    anyone but the mediator are dropped while the request runs. Raises ``ConnectError``
    when the mediator says no or nothing answered within ``timeout`` seconds.

    ``tunnel`` sends the TCP copy through an HTTP tunnel of that kind (or the
    one the probe picks: ``"auto"``) to the mediator's HTTP face ``http``
    (default: ``mediator``), through ``proxy`` when given; the UDP copy still
    goes to ``mediator``. ``tunnel_memory`` keeps the probe's winner between
    requests. The tunnel opens in a named thread of its own, so the UDP copy is
    not held up by it.
    """
    dialer = dialer_for(
        mediator,
        tunnel=tunnel,
        target=http,
        proxy=proxy,
        ssl_context=ssl_context,
        memory=tunnel_memory,
    )
    target = resolve(mediator)
    request = ConnectRequest(
        server_id=server_id, system_id=system_id, now=time.monotonic(), timeout=timeout
    )
    own_socket = None if udp is not None else open_udp_for(target)
    port = udp if own_socket is None else SocketDatagramPort(own_socket)
    assert port is not None  # exactly one of the two is set
    try:
        _Exchange(request, port, target, dialer, timeout).run()
    finally:
        if own_socket is not None:
            own_socket.close()
    return _outcome(request, mediator)


class _Exchange:
    """One request's two copies, on one selector in the calling thread."""

    def __init__(
        self,
        request: ConnectRequest,
        port: DatagramPort,
        target: Endpoint,
        dialer: Dialer,
        timeout: float,
    ) -> None:
        self.request = request
        self.dialer = dialer
        self.timeout = timeout
        #: A tunnel's opener thread hands its socket (or its failure) over through these.
        self.tunnel_ready: socket.socket | OSError | None = None
        self.over = False
        self.port = port
        self.target = target
        self.sid = request.connect_session_id.hex()[:12]
        self.lock = threading.Lock()  # the request, between the port reader and us
        self.tcp: socket.socket | None = None
        self.tcp_connected = False
        self.tcp_outgoing = b""
        self.udp_ended = False
        self.wake_in: socket.socket | None = None

    def run(self) -> None:
        request = self.request
        wake_out, wake_in = socket.socketpair()
        stop = threading.Event()
        with selectors.DefaultSelector() as selector, wake_out, wake_in:
            wake_out.setblocking(False)
            self.wake_in = wake_in
            selector.register(wake_out, selectors.EVENT_READ, "wake")
            reader = self._watch_port(selector, stop)
            try:
                if self.dialer.tunnel is None:
                    self._open_tcp(selector)
                else:
                    threading.Thread(
                        target=self._open_tunnel,
                        args=(wake_in,),
                        name=f"wavesync-connect-tunnel-{self.sid}",
                        daemon=True,  # holds no data: a socket it opens late, it closes
                    ).start()
                while True:
                    with self.lock:
                        if request.done:
                            break
                        for data in request.datagrams_to_send(time.monotonic()):
                            self.port.send((data, self.target))
                        timer = request.get_timer()
                    delay = None if timer is None else max(0.0, timer - time.monotonic())
                    for key, events in selector.select(delay):
                        self._ready(selector, key, events)
                    with self.lock:
                        request.handle_timer(time.monotonic())
            finally:
                if isinstance(self.port, UdtDatagramPort):
                    self.port.endpoint.wake_on_foreign(None)  # before wake_in closes
                stop.set()
                with self.lock:
                    self.over = True
                    late = self.tunnel_ready
                    self.tunnel_ready = None
                if isinstance(late, socket.socket):
                    late.close()
                if reader is not None:
                    reader.join()
                if self.tcp is not None:
                    self.tcp.close()

    # --- UDP --------------------------------------------------------------------------

    def _watch_port(
        self, selector: selectors.BaseSelector, stop: threading.Event
    ) -> threading.Thread | None:
        """Let the selector see the port's datagrams; the reader thread, if it needs one."""
        assert self.wake_in is not None
        if isinstance(self.port, SocketDatagramPort):  # a plain socket: select on it
            selector.register(self.port.sock, selectors.EVENT_READ, "udp")
            return None
        if isinstance(self.port, UdtDatagramPort):  # its I/O thread pokes wake_in
            self.port.endpoint.wake_on_foreign(self.wake_in)
            return None
        reader = threading.Thread(
            target=self._read_port,
            args=(self.wake_in, stop),
            name=f"wavesync-connect-{self.sid}",
            daemon=True,  # holds no data; joined below within one poll
        )
        reader.start()
        return reader

    def _read_port(self, wake: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                data, source = self.port.receive(_PORT_POLL_SECONDS)
            except TimeoutError:
                continue
            except OSError as exc:  # the port closed under us: the TCP copy carries on
                log.debug("connect %s: UDP copy ended: %r", self.sid, exc)
                return
            done = self._datagram(data, source)
            with contextlib.suppress(OSError):
                wake.send(b"\0")
            if done:  # the answer: stop now, not a poll later, so the join is immediate
                return

    def _take_queued(self, port: UdtDatagramPort) -> None:
        """The datagrams a UDT endpoint queued since its last poke (on the selector's thread)."""
        if self.udp_ended:
            return
        for _ in range(_DATAGRAMS_PER_TURN):
            try:
                data, source = port.endpoint.receive_foreign(0.0)
            except TimeoutError:
                return
            except OSError as exc:  # the endpoint closed under us: the TCP copy carries on
                log.debug("connect %s: UDP copy ended: %r", self.sid, exc)
                self.udp_ended = True
                return
            self._datagram(data, source)
        port.endpoint.wake_on_foreign(self.wake_in)  # more queued: poke again, next turn

    def _datagram(self, data: bytes, source: tuple[Any, ...]) -> bool:
        """Feed a datagram from the mediator (others are dropped); whether that ended it."""
        with self.lock:
            if (str(source[0]), int(source[1])) == self.target:
                self.request.datagram_received(data, time.monotonic())
            return self.request.done

    # --- TCP --------------------------------------------------------------------------

    def _open_tcp(self, selector: selectors.BaseSelector) -> None:
        family = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
        tcp = socket.socket(family, socket.SOCK_STREAM)
        self.tcp = tcp
        tcp.setblocking(False)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tcp_outgoing = self.request.tcp_data_to_send()
        code = tcp.connect_ex(self.target)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._tcp_lost(selector, OSError(code, errno.errorcode.get(code, "connect")))
            return
        selector.register(tcp, selectors.EVENT_WRITE, "tcp")

    def _ready(
        self, selector: selectors.BaseSelector, key: selectors.SelectorKey, events: int
    ) -> None:
        if key.data == "wake":
            with contextlib.suppress(BlockingIOError):
                key.fileobj.recv(4096)  # type: ignore[union-attr]
            if isinstance(self.port, UdtDatagramPort):
                self._take_queued(self.port)
            self._take_tunnel(selector)
        elif key.data == "udp":
            assert isinstance(self.port, SocketDatagramPort)
            for _ in range(64):  # a flood must not starve the TCP copy
                try:
                    data, source = self.port.sock.recvfrom(_RECEIVE_BYTES, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # an ICMP error for an earlier send: keep listening
                    log.debug("connect %s: UDP: %r", self.sid, exc)
                    break
                self._datagram(data, source)
        elif key.data == "tcp":
            self._tcp_ready(selector, events)

    def _open_tunnel(self, wake: socket.socket) -> None:
        """The opener thread: a tunnel to the mediator's HTTP face (a probe when "auto")."""
        try:
            opened: socket.socket | OSError = self.dialer.open(self.timeout)
        except OSError as exc:
            opened = exc
        with self.lock:
            if not self.over:
                self.tunnel_ready = opened
                opened = OSError("taken")
        if isinstance(opened, socket.socket):
            opened.close()  # the request ended while the tunnel opened
        with contextlib.suppress(OSError):
            wake.send(b"\0")

    def _take_tunnel(self, selector: selectors.BaseSelector) -> None:
        with self.lock:
            opened, self.tunnel_ready = self.tunnel_ready, None
        if opened is None:
            return
        if isinstance(opened, OSError):
            self._tcp_lost(selector, opened)
            return
        log.debug("connect %s: TCP copy through %s", self.sid, self.dialer.describe())
        self.tcp = opened
        self.tcp_connected = True
        opened.setblocking(False)
        self.tcp_outgoing = self.request.tcp_data_to_send()
        selector.register(opened, selectors.EVENT_WRITE, "tcp")

    def _tcp_ready(self, selector: selectors.BaseSelector, events: int) -> None:
        tcp = self.tcp
        assert tcp is not None
        try:
            if not self.tcp_connected:
                code = tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, errno.errorcode.get(code, "connect"))
                self.tcp_connected = True
            if self.tcp_outgoing and events & selectors.EVENT_WRITE:
                sent = tcp.send(self.tcp_outgoing)
                self.tcp_outgoing = self.tcp_outgoing[sent:]
                if not self.tcp_outgoing:
                    selector.modify(tcp, selectors.EVENT_READ, "tcp")
                return
            if events & selectors.EVENT_READ:
                data = tcp.recv(_RECEIVE_BYTES)
                if not data:
                    raise ConnectionResetError("the mediator closed the connection")
                with self.lock:
                    self.request.tcp_data_received(data, time.monotonic())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._tcp_lost(selector, exc)

    def _tcp_lost(self, selector: selectors.BaseSelector, exc: OSError) -> None:
        log.debug("connect %s: TCP copy ended: %r", self.sid, exc)
        tcp = self.tcp
        if tcp is not None:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(tcp)
            tcp.close()
            self.tcp = None
        with self.lock:
            self.request.tcp_connection_lost(time.monotonic())


def _outcome(request: ConnectRequest, mediator: Endpoint) -> ConnectSucceeded:
    """The finished request's answer, logged; ``ConnectError`` if it failed."""
    sid = request.connect_session_id.hex()[:12]
    event = request.next_event()
    if isinstance(event, ConnectSucceeded):
        log.info(
            "connect %s: server %s answered via %s in %.0f ms",
            sid,
            event.response.server_id,
            event.via,
            event.elapsed * 1000,
        )
        return event
    assert isinstance(event, ConnectFailed)  # a done request has reported exactly one
    log.info("connect %s via %s failed: %s", sid, format_endpoint(mediator), event.reason)
    raise ConnectError(event)
