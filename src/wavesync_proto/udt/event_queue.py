"""What a UDT connection's application has not read yet: its events, and the buffer they hold.

This module owns the hand-off of received data to the application (UDT 4.11
``CUDT::recv``/``recvmsg`` reading ``m_pRcvBuffer``): it turns the receiver's in-order
payloads into ``DataReceived`` events (one per batch; one per message in DGRAM mode),
keeps the packets of each counted as occupied receive buffer until its event is taken,
and asks for a window update when taking frees enough. Data that nobody reads thus
closes the flow window instead of growing memory. It does not know the connection's
states, the wire, sockets or clocks.
"""

from __future__ import annotations

from collections import deque

from .connection_types import DataReceived, UdtEvent
from .receiver import UdtReceiver

__all__ = ["UdtEventQueue"]


class UdtEventQueue:
    """The events of one connection, in order, each with the receive-buffer packets it holds."""

    def __init__(self, *, message_mode: bool, receive_buffer_packets: int) -> None:
        self._events: deque[tuple[UdtEvent, int]] = deque()
        self._message_mode = message_mode
        self._half_buffer = receive_buffer_packets // 2

    def append(self, event: UdtEvent) -> None:
        """An event that holds no receive buffer (established, closed)."""
        self._events.append((event, 0))

    def take_ready(self, receiver: UdtReceiver) -> None:
        """Queue what ``receiver`` has in order as ``DataReceived`` events."""
        if not receiver.ready_packets:
            return
        chunks, packets = receiver.take_ready()
        receiver.undelivered_packets += packets
        if self._message_mode:
            last = len(chunks) - 1
            for index, message in enumerate(chunks):
                self._events.append(
                    (
                        DataReceived(data=message, message_complete=True),
                        packets if index == last else 0,
                    )
                )
        else:
            self._events.append((DataReceived(data=b"".join(chunks)), packets))

    def pop(self, receiver: UdtReceiver | None) -> UdtEvent | None:
        """The next event, or None; ``receiver`` (None before established) is read first."""
        events = self._events
        if not events:
            if receiver is not None:
                self.take_ready(receiver)
            if not events:
                return None
        event, packets = events.popleft()
        if packets:
            assert receiver is not None
            receiver.undelivered_packets -= packets
            # The application freed buffer after an ACK announced little of it: say so.
            half = self._half_buffer
            if receiver.last_available < half <= receiver.available:
                receiver.window_update = True
        return event
