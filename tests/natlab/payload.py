"""The service behind the server and the fetch that checks it, run inside lab namespaces.

``python -m tests.natlab.payload serve PORT`` sends ``SIZE`` known bytes to every connection
on 127.0.0.1:PORT, then closes it (it prints "serving" once it listens);
``python -m tests.natlab.payload fetch PORT TIMEOUT`` connects to 127.0.0.1:PORT, reads until
the end or ``SIZE`` bytes, and prints one JSON line: how many bytes came, whether they were
exactly the known ones, and the seconds it took. Every socket call has a timeout, so a fetch
through a dead path ends with a result instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time

__all__ = ["SIZE", "expected_digest", "known_bytes"]

SIZE = 10 * 1024 * 1024
_BLOCK = 64 * 1024


def known_bytes() -> bytes:
    """``SIZE`` bytes that no path can produce by accident (a counter hashed block by block)."""
    blocks = (
        hashlib.shake_256(index.to_bytes(4, "big")).digest(_BLOCK)
        for index in range(SIZE // _BLOCK)
    )
    return b"".join(blocks)


def expected_digest() -> str:
    return hashlib.sha256(known_bytes()).hexdigest()


def _serve(port: int) -> None:
    payload = known_bytes()
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    print("serving", flush=True)

    def send(connection: socket.socket) -> None:
        with connection:
            connection.settimeout(60)
            try:
                connection.sendall(payload)
                connection.shutdown(socket.SHUT_WR)
                connection.recv(1)  # the reader closes first: no RST eats the tail
            except OSError:
                pass

    while True:
        connection, _ = listener.accept()
        threading.Thread(target=send, args=(connection,), daemon=True).start()


def _fetch(port: int, timeout: float) -> dict[str, object]:
    started = time.monotonic()
    deadline = started + timeout
    digest = hashlib.sha256()
    received = 0
    error = ""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
            while received < SIZE:
                left = deadline - time.monotonic()
                if left <= 0:
                    error = f"timed out after {timeout:g} s"
                    break
                connection.settimeout(left)
                chunk = connection.recv(min(_BLOCK, SIZE - received))
                if not chunk:
                    break
                digest.update(chunk)
                received += len(chunk)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    exact = received == SIZE and digest.hexdigest() == expected_digest()
    return {
        "received": received,
        "exact": exact,
        "seconds": round(time.monotonic() - started, 3),
        "error": error,
    }


def main(argv: list[str]) -> int:
    command, port = argv[0], int(argv[1])
    if command == "serve":
        _serve(port)
        return 0
    print(json.dumps(_fetch(port, float(argv[2]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
