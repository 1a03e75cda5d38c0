"""One thread's selector loop for the blocking adapter's daemons: sockets, a deadline, a wake-up.

This module owns how one thread waits: a ``selectors`` selector that calls a
callback per ready socket, sleeps no longer than the owner's next deadline (a
sans-I/O service's ``get_timer()``), and can be woken or stopped from any other
thread through a socket pair. It knows nothing about any protocol; thousands
of connections cost one thread, not thousands. ``LoopConnection`` is a socket's
buffers for such callbacks, TLS included (``ssl.SSLObject`` on memory buffers).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable

__all__ = [
    "EVENT_READ",
    "EVENT_WRITE",
    "Deadlines",
    "LoopConnection",
    "SelectorLoop",
    "earliest",
]

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

ReadyCallback = Callable[[int], None]
"""Called with the ready mask (``EVENT_READ | EVENT_WRITE`` bits) of a watched socket."""

_RECEIVE_BYTES = 65536


class SelectorLoop:
    """Runs callbacks for ready sockets and a deadline callback, in the thread calling ``run``.

    Only ``call_soon_threadsafe``, ``wake`` and ``stop`` may be called from other
    threads; everything else belongs to the loop's thread (or to set-up before ``run``).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._selector = selectors.DefaultSelector()
        # The self-pipe: a byte written to one end makes select() return at once.
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._selector.register(self._wake_in, EVENT_READ, self._drain_wake_ups)
        self._soon: collections.deque[Callable[[], None]] = collections.deque()
        self._stopping = threading.Event()

    # --- from any thread ----------------------------------------------------------------------

    def wake(self) -> None:
        """Make the loop's current (or next) wait return at once."""
        # Full: a wake-up is already pending. Closed: the loop has ended.
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_out.send(b"\0")

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the loop's thread at its next turn."""
        self._soon.append(callback)  # deque.append is atomic
        self.wake()

    def stop(self) -> None:
        """Make ``run`` return after the callbacks of its current turn."""
        self._stopping.set()
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # --- from the loop's thread -------------------------------------------------------------

    def watch(self, sock: socket.socket, events: int, callback: ReadyCallback) -> None:
        """Call ``callback(mask)`` whenever ``sock`` is ready for ``events`` (replacing any
        earlier watch of ``sock``); ``events`` 0 is the same as ``unwatch``."""
        if not events:
            self.unwatch(sock)
            return
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            self._selector.register(sock, events, callback)
            return
        if key.events != events or key.data is not callback:
            self._selector.modify(sock, events, callback)

    def unwatch(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` (nothing happens if it is not watched). Call it before
        closing a watched socket."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def run(
        self,
        next_deadline: Callable[[], float | None],
        on_deadline: Callable[[float], None],
    ) -> None:
        """Serve until ``stop()``: wait for sockets no later than ``next_deadline()`` (on
        ``clock``; None: no deadline), then call ``on_deadline(now)`` once it has passed."""
        selector, clock, soon = self._selector, self.clock, self._soon
        fd_map = selector.get_map()
        while not self._stopping.is_set():
            deadline = next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - clock())
            for key, mask in selector.select(timeout):
                # A callback earlier in this batch may have unwatched (and closed) this
                # socket, and a new socket may even have its number: skip stale events.
                if fd_map.get(key.fd) is key:
                    key.data(mask)
            while soon:
                soon.popleft()()
            deadline = next_deadline()
            if deadline is not None:
                now = clock()
                if now >= deadline:
                    on_deadline(now)

    def close(self) -> None:
        """Release the selector and the wake-up pair (after ``run`` has returned)."""
        self._selector.close()
        self._wake_in.close()
        self._wake_out.close()

    def _drain_wake_ups(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_in.recv(4096):
                pass


class Deadlines:
    """Deadlines of the loop owner's own (a closing socket's drain), soonest first.

    Entries are never removed early: a key whose work finished before its deadline
    simply comes out of ``pop_due`` later, and the owner ignores it.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int]] = []
        self._order = 0  # ties are broken by insertion, never by comparing keys

    def add(self, deadline: float, key: int) -> None:
        self._order += 1
        heapq.heappush(self._heap, (deadline, self._order, key))

    def next(self) -> float | None:
        """The soonest deadline, or None."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[int]:
        """The keys whose deadline is ``now`` or earlier, removed."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due


def earliest(*deadlines: float | None) -> float | None:
    """The soonest of the deadlines given (None: none)."""
    pending = [deadline for deadline in deadlines if deadline is not None]
    return min(pending) if pending else None


class LoopConnection:
    """A non-blocking stream socket for a loop's callbacks: what it read (decrypted, with
    TLS), what it has yet to write (encrypted), TLS through memory buffers so that a
    handshake never blocks the loop."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None = None) -> None:
        self.sock = sock
        self.tls = tls
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.handshaking = tls is not None
        #: Bytes for the socket (encrypted already, with TLS) it has not taken yet.
        self.out = bytearray()
        self.read_eof = False
        self.half_closed = False
        self.closed = False
        #: The loop's callback for this socket (one object, so re-watching is cheap).
        self.ready: Callable[[int], None] = lambda mask: None

    @classmethod
    def accept(cls, sock: socket.socket, context: ssl.SSLContext | None) -> LoopConnection:
        leg = cls(sock)
        if context is not None:
            leg.tls = context.wrap_bio(leg._incoming, leg._outgoing, server_side=True)
            leg.handshaking = True
        return leg

    def read(self) -> bytes | None:
        """Plaintext that arrived (``b""``: the end, or a broken connection), or None when
        nothing has yet. Raises ``ssl.SSLError`` for a failed handshake."""
        try:
            data = self.sock.recv(_RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if self.tls is None:
            if not data:
                self.read_eof = True
            return data
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        if self.handshaking:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._pull()
                if not data:
                    raise ssl.SSLError("the connection closed during the TLS handshake") from None
                return None
            self.handshaking = False
        return self._decrypt()

    def _decrypt(self) -> bytes | None:
        assert self.tls is not None
        chunks = []
        ended = False
        while True:
            try:
                chunk = self.tls.read(_RECEIVE_BYTES)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLError):
                ended = True
                break
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
        self._pull()  # key updates, session tickets
        if chunks:
            # The end (if any) is seen again by the next read, which finds EOF too.
            return b"".join(chunks)
        if ended:
            self.read_eof = True
            return b""
        return None

    def _pull(self) -> None:
        if self.tls is not None and self._outgoing.pending:
            self.out += self._outgoing.read()

    def write(self, data: bytes) -> None:
        """Queue ``data`` (plaintext) for the socket; ``flush`` writes it."""
        if not data:
            return
        if self.tls is None:
            self.out += data
        else:
            self.tls.write(data)
            self._pull()

    def flush(self) -> bool:
        """Write what the socket takes now; True once nothing is left. Raises ``OSError``."""
        out = self.out
        while out:
            try:
                sent = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                return False
            del out[:sent]
        return True

    def half_close(self) -> None:
        # TLS has no half-close: the leg stays open until the tunnel ends.
        self.half_closed = True
        if self.tls is None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def close(self, loop: SelectorLoop) -> None:
        if not self.closed:
            self.closed = True
            loop.unwatch(self.sock)
            self.sock.close()
