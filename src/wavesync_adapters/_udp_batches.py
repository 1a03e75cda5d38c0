"""Batched datagram I/O on one non-blocking UDP socket, with Linux GSO and GRO.

Standard library only, so that every runtime's UDT endpoint can read and send
through it (the asyncio adapter imports nothing of anyio's).

The UDT driver reads every datagram the kernel holds before it asks the core what
to send, then sends the whole answer: one wake-up per batch, not per packet. On
Linux >= 4.18, runs of equal-sized datagrams to one address go out as one
``sendmsg`` with a ``UDP_SEGMENT`` control message (the kernel cuts them into
datagrams), which saves a system call per packet on the sending side (``gso``).

On Linux >= 5.0 the socket also asks for ``UDP_GRO`` (``gro``, on by default): the
kernel may then hand over a run of datagrams of one flow as one buffer with the
segment size in a control message (a GSO batch over loopback arrives so, and a NIC's
GRO may coalesce a real flow). They are cut back into the same datagrams here, so
the core sees exactly what it would have; the receiver pays one system call per
run, not per datagram, and the kernel's receive buffer holds a run in one entry,
which a Python receiver a little behind a C sender (or a GSO one) needs.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable

from wavesync_proto.addresses import Endpoint

from ._udp_socket import open_udp_socket, tune_udp_socket

__all__ = ["BatchedUdpSocket", "open_udp_socket", "tune_udp_socket"]

log = logging.getLogger("wavesync.udt")

# <netinet/udp.h>: not in Python's socket module.
_SOL_UDP = 17
_UDP_SEGMENT = 103
#: "#define UDP_MAX_SEGMENTS (1 << 6UL)" (include/linux/udp.h).
_GSO_MAX_SEGMENTS = 64
_U16 = struct.Struct("=H")  # the cmsg carries a native-order __u16
#: One IPv4 datagram's largest UDP payload: a GSO batch may not exceed it either.
_GSO_MAX_BYTES = 65507
_UDP_GRO = 104
#: A coalesced run is at most one IP datagram (udp_gro_receive stops at 64 KiB).
_GRO_BUFFER_BYTES = 65535
#: GRO's control message carries the segment size as a native int.
_GRO_SIZE = struct.Struct("=i")
_GRO_CMSG_SPACE = socket.CMSG_SPACE(_GRO_SIZE.size) if hasattr(socket, "CMSG_SPACE") else 0

#: Called with (datagram, source, arrival time); False: not ours (not UDT), hand it on.
Feed = Callable[[bytes, Endpoint, float], bool]


class BatchedUdpSocket:
    """Reads all waiting datagrams into a feed; sends lists of datagrams, queueing on EAGAIN."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        datagram_bytes: int,
        clock: Callable[[], float],
        gso: bool = False,
        gro: bool = True,
    ) -> None:
        self.sock = sock
        self._datagram_bytes = datagram_bytes
        self._clock = clock
        self._ipv6 = sock.family == socket.AF_INET6
        self._gso = gso and hasattr(socket, "CMSG_LEN") and sock.family == socket.AF_INET
        #: Datagrams the kernel would not take yet (its send buffer was full).
        self.pending: deque[tuple[bytes, Endpoint]] = deque()
        self.send_errors = 0
        self.receive_errors = 0
        self.gso_batches = 0
        #: Reads that returned a run of datagrams coalesced by the kernel (GRO).
        self.gro_batches = 0
        self._gro = gro and _ask_for_gro(sock)

    def receive_all(
        self, feed: Feed, limit: int, foreign: Callable[[bytes, Endpoint], None]
    ) -> int:
        """Feed up to ``limit`` waiting datagrams, each stamped when read; return the count.

        A datagram ``feed`` does not take (it returns False: not UDT) goes to ``foreign``.
        """
        if self._gro:
            return self._receive_runs(feed, limit, foreign)
        recvfrom = self.sock.recvfrom
        size = self._datagram_bytes
        clock = self._clock
        count = 0
        while count < limit:
            try:
                data, source = recvfrom(size)
            except BlockingIOError:
                break
            except OSError as exc:
                count += self._receive_failed(exc)
                continue
            count += 1
            if self._ipv6:
                source = (source[0], source[1])
            if not feed(data, source, clock()):
                foreign(data, source)
        return count

    def release(self, *, closing: bool) -> None:
        """The endpoint is done with the socket. One it does not close (handed in by
        the caller, who may read it with a plain ``recvfrom`` next) gets GRO turned
        off again: a run a GSO peer sends would otherwise arrive as one buffer."""
        if closing or not self._gro:
            return
        self._gro = False
        try:
            self.sock.setsockopt(_SOL_UDP, _UDP_GRO, 0)
        except OSError as exc:  # a socket already closed by its owner
            log.debug("udp: could not turn GRO off again: %s", exc)

    def _receive_runs(
        self, feed: Feed, limit: int, foreign: Callable[[bytes, Endpoint], None]
    ) -> int:
        """``receive_all`` on a GRO socket: each read may be a run of equal datagrams
        (the last may be shorter), cut at the segment size its control message gives."""
        recvmsg = self.sock.recvmsg
        clock = self._clock
        count = 0
        while count < limit:
            try:
                data, ancillary, _flags, source = recvmsg(_GRO_BUFFER_BYTES, _GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:
                count += self._receive_failed(exc)
                continue
            if self._ipv6:
                source = (source[0], source[1])
            now = clock()
            size = _segment_size(ancillary)
            if size <= 0 or size >= len(data):
                count += 1
                if not feed(data, source, now):
                    foreign(data, source)
                continue
            self.gro_batches += 1
            view = memoryview(data)
            for start in range(0, len(data), size):
                count += 1
                datagram = bytes(view[start : start + size])
                if not feed(datagram, source, now):
                    foreign(datagram, source)
        return count

    def _receive_failed(self, exc: OSError) -> int:
        """Count a failed read (it counts against the batch's limit: return 1). An ICMP
        error queued on the socket (port unreachable after a send to a peer that is
        gone) says nothing the UDT timers will not find out."""
        self.receive_errors += 1
        log.debug("udp receive: %s", exc)
        return 1

    def send_all(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        """Send ``datagrams`` in order; what the kernel refuses with EAGAIN waits in ``pending``."""
        if self.pending:
            self.pending.extend(datagrams)
            self.flush()
            return
        self._send_list(datagrams, 0)

    def flush(self) -> None:
        """Send what waits in ``pending`` until the kernel refuses again."""
        pending = self.pending
        batch = list(pending)
        pending.clear()
        self._send_list(batch, 0)

    def _send_list(self, datagrams: list[tuple[bytes, Endpoint]], start: int) -> None:
        sendto = self.sock.sendto
        count = len(datagrams)
        index = start
        while index < count:
            data, destination = datagrams[index]
            end = index + 1
            if self._gso:
                end = self._gso_run_end(datagrams, index)
            try:
                if end - index > 1:
                    self._send_segments(datagrams, index, end)
                else:
                    sendto(data, destination)
            except BlockingIOError:
                self.pending.extend(datagrams[index:])
                return
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT) and end - index > 1:
                    # This path (or kernel) cannot segment: send one by one from now on.
                    log.info("udp: GSO unavailable (%s); sending datagrams one by one", exc)
                    self._gso = False
                    continue
                # A full device queue (ENOBUFS), an unreachable network: the datagram
                # is lost like any other, and UDT's loss recovery resends it.
                self.send_errors += 1
                log.debug("udp send to %s: %s", destination, exc)
            index = end

    @staticmethod
    def _gso_run_end(datagrams: list[tuple[bytes, Endpoint]], start: int) -> int:
        # Segments must share the destination and the size; only the last may be shorter.
        data, destination = datagrams[start]
        size = len(data)
        limit = min(len(datagrams), start + min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // size))
        end = start + 1
        while end < limit:
            other, other_destination = datagrams[end]
            if other_destination != destination or len(other) > size:
                break
            end += 1
            if len(other) < size:
                break
        return end

    def _send_segments(self, datagrams: list[tuple[bytes, Endpoint]], start: int, end: int) -> None:
        size = len(datagrams[start][0])
        self.sock.sendmsg(
            [data for data, _ in datagrams[start:end]],
            [(_SOL_UDP, _UDP_SEGMENT, _U16.pack(size))],
            0,
            datagrams[start][1],
        )
        self.gso_batches += 1


def _ask_for_gro(sock: socket.socket) -> bool:
    """Turn UDP_GRO on (Linux >= 5.0, IPv4 and IPv6); False where the kernel refuses."""
    if not _GRO_CMSG_SPACE or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
    except OSError as exc:
        log.debug("udp: GRO unavailable (%s); reading datagrams one by one", exc)
        return False
    return True


def _segment_size(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The GRO segment size in ``ancillary``, or 0: the read is one datagram."""
    for level, kind, value in ancillary:
        if level == _SOL_UDP and kind == _UDP_GRO and len(value) >= _GRO_SIZE.size:
            size: int = _GRO_SIZE.unpack_from(value)[0]
            return size
    return 0
