"""DGRAM message assembly of a UDT receiver (UDT 4.11 buffer.cpp ``CRcvBuffer::readMsg``,
``scanMsg``, ``dropMsg``).

This module owns how received packets become whole messages: a message is handed
out only from its FIRST (or SOLO) packet to its LAST, a fragment is thrown away,
a message drop request makes the receiver skip a message, and a whole message
whose in-order bit is 0 is handed out at once, ahead of earlier messages still
missing packets (``scanMsg`` reads such a message past the ACK point). It is a part of
``UdtReceiver`` (a base class sharing its slots, so the per-packet path pays no
extra indirection) and knows nothing of ACKs, timers or the wire's encoding.
docs/protocol.md §4.8.4 has the rules.
"""

from __future__ import annotations

from .loss_list import LossList
from .packet_types import Boundary
from .sender import IN_ORDER_BIT, unwrap
from .seqnum import MSG_MAX, SEQ_MAX

__all__ = ["MessageAssembly"]

_LAST_BIT = Boundary.LAST << 30  # set in LAST and SOLO
_FIRST_BIT = Boundary.FIRST << 30  # set in FIRST and SOLO
#: The word of a packet a message drop request skipped (no real word is negative).
_DROPPED = -1
#: The word of a packet whose message was handed out ahead of the first missing
#: packet: its number stays taken until the ACK point passes it (4.11 keeps such a
#: unit in the buffer, flagged read, until then).
_DELIVERED = -2


class MessageAssembly:
    """The DGRAM half of ``UdtReceiver``: the partial message and the skipping of dropped ones.

    The slots this part writes live here (the type checker wants their writer to own
    them); ``UdtReceiver`` describes them. The rest are the receiver's, declared for
    the type checker only.
    """

    __slots__ = (
        "_ahead",
        "_partial",
        "_partial_open",
        "_partial_packets",
        "_words",
        "contig",
        "discarded",
        "highest",
        "lost",
        "ready_packets",
    )

    _ahead: int
    contig: int
    highest: int
    lost: int
    discarded: int
    ready_packets: int
    loss: LossList
    undelivered_packets: int
    _capacity: int
    _message_mode: bool
    _ooo: dict[int, bytes]
    _words: dict[int, int]
    _ready: list[bytes]
    _partial: list[bytes]
    _partial_packets: int
    _partial_open: bool

    def _release_messages(self) -> None:
        """DGRAM: move in-order packets to the partial message; whole messages to ready.

        A message is delivered only from its FIRST (or SOLO) packet to its LAST: a
        fragment whose start was dropped (a message drop request) or whose end never
        came (a peer that broke the rules) is discarded, never delivered as a message.
        """
        ooo, words = self._ooo, self._words
        seq = self.contig
        payload = ooo.pop(seq, None)
        while payload is not None:
            word = words.pop(seq)
            if word < 0:
                if word == _DELIVERED:
                    self._ahead -= 1
                # A message that began before a skipped or handed-out one lacks its end.
                self._discard_partial()
            else:
                if word & _FIRST_BIT:
                    self._discard_partial()
                    self._partial_open = True
                if self._partial_open:
                    self._partial.append(payload)
                    self._partial_packets += 1
                    if word & _LAST_BIT:
                        self._ready.append(b"".join(self._partial))
                        self.ready_packets += self._partial_packets
                        self._partial = []
                        self._partial_packets = 0
                        self._partial_open = False
                else:
                    self.discarded += 1
            seq += 1
            payload = ooo.pop(seq, None)
        self.contig = seq

    def _discard_partial(self) -> None:
        if self._partial:
            self.discarded += len(self._partial)
            self._partial = []
            self._partial_packets = 0
        self._partial_open = False

    def _deliver_ahead(self, seq: int) -> None:
        """``seq`` arrived beyond the first missing packet: hand its message out if now whole.

        4.11 ``scanMsg`` lets the application read a whole message past the ACK point when
        its LAST packet's in-order bit is 0; one whose bit is 1 waits for everything
        before it (``_release_messages``). The caller has checked the arriving packet's
        bit is 0 too (4.11's sender sets it alike on every packet), so a retransmission
        of an in-order message costs no scan. The packets' numbers stay marked
        ``_DELIVERED`` until the ACK point passes them, so late copies are duplicates.
        """
        words = self._words
        first = seq
        word = words[seq]
        while not word & _FIRST_BIT:
            first -= 1
            word = words.get(first, _DROPPED)
            if word < 0:
                return  # a hole, or another message's skipped/handed-out packet
        last = seq
        word = words[seq]
        while not word & _LAST_BIT:
            last += 1
            word = words.get(last, _DROPPED)
            if word < 0:
                return
        if word & IN_ORDER_BIT:
            return
        ooo = self._ooo
        parts = []
        for number in range(first, last + 1):
            parts.append(ooo[number])
            ooo[number] = b""
            words[number] = _DELIVERED
        self._ready.append(b"".join(parts))
        count = last - first + 1
        self.ready_packets += count
        self._ahead += count

    def drop_message(self, message_number: int, first_wire: int, last_wire: int) -> int:
        """DGRAM: the sender gave up on a message; stop waiting for ``first``..``last``.

        Packets of the range that arrived are discarded if they belong to that message;
        the missing ones are marked dropped, so the message is skipped when its turn
        comes and never delivered in part. Returns how many numbers were marked. A byte
        stream cannot skip bytes: in STREAM mode the request is ignored (0).
        """
        if not self._message_mode:
            return 0
        contig = self.contig
        first = unwrap(first_wire, contig)
        last = first + ((last_wire - first_wire) & SEQ_MAX)
        # Only what the window holds: never before contig, never past the free buffer.
        room = self._capacity - self.ready_packets - self.undelivered_packets
        first = max(first, contig)
        last = min(last, contig + room + self._ahead - self._partial_packets - 1)
        if first > last:
            return 0
        ooo, words = self._ooo, self._words
        marked = 0
        for seq in range(first, last + 1):
            word = words.get(seq)
            if word is None:
                ooo[seq] = b""
                words[seq] = _DROPPED
                marked += 1
            elif word >= 0 and word & MSG_MAX == message_number:
                ooo[seq] = b""
                words[seq] = _DROPPED
        self.loss.remove_range(first, last)
        if last > self.highest:
            if first > self.highest + 1:
                # Packets before the dropped message were lost unnoticed: report them.
                self.lost += self.loss.insert(self.highest + 1, first - 1)
            self.highest = last
        self._release_messages()
        return marked
