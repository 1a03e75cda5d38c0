"""STUN codec throughput: wavesync vs aioice, decode + encode of the same messages.

Each message is decoded and re-encoded ITERATIONS times by each codec, best of
REPEATS runs, and the ratio wavesync/aioice is printed per message and for the
whole set (total time). Both codecs check FINGERPRINT while decoding; neither
checks MESSAGE-INTEGRITY (that needs a key and is the same HMAC call for both).

    python bench/stun_codec.py [--iterations N] [--repeats R]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aioice import stun as aioice_stun

from wavesync_proto import __version__
from wavesync_proto.stun import (
    BINDING,
    Message,
    MessageClass,
    Software,
    XorMappedAddress,
    decode_message,
    encode_message,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.proto.stun import rfc5769

TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")


def _messages() -> dict[str, bytes]:
    request = Message(message_class=MessageClass.REQUEST, method=BINDING, transaction_id=TID)
    response = request.success_response(
        XorMappedAddress(("198.51.100.23", 40001)), Software("wavesync 0.1.0")
    )
    return {
        "binding request + FINGERPRINT": encode_message(request, fingerprint=True),
        "binding response IPv4 + FINGERPRINT": encode_message(response, fingerprint=True),
        "RFC 5769 2.1 ICE request": rfc5769.SAMPLE_REQUEST,
        "RFC 5769 2.2 IPv4 response": rfc5769.SAMPLE_IPV4_RESPONSE,
        "RFC 5769 2.3 IPv6 response": rfc5769.SAMPLE_IPV6_RESPONSE,
        "RFC 5769 2.4 long-term request": rfc5769.SAMPLE_LONG_TERM_REQUEST,
    }


def _best_time(round_trip: Callable[[], object], iterations: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            round_trip()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"wavesync {__version__} vs aioice, Python {platform.python_version()}")
    print(f"{args.iterations} decode+encode per message, best of {args.repeats}\n")
    print(f"{'message':38} {'wavesync/s':>12} {'aioice/s':>12} {'ratio':>7}")
    total_ours = total_theirs = 0.0
    for name, data in _messages().items():
        # Both must understand the message before we time them.
        assert decode_message(data).transaction_id == aioice_stun.parse_message(data).transaction_id

        def ours(data: bytes = data) -> bytes:
            return encode_message(decode_message(data))

        def theirs(data: bytes = data) -> bytes:
            return bytes(aioice_stun.parse_message(data))

        ours_time = _best_time(ours, args.iterations, args.repeats)
        theirs_time = _best_time(theirs, args.iterations, args.repeats)
        total_ours += ours_time
        total_theirs += theirs_time
        print(
            f"{name:38} {args.iterations / ours_time:12,.0f} {args.iterations / theirs_time:12,.0f}"
            f" {theirs_time / ours_time:7.2f}"
        )
    count = args.iterations * len(_messages())
    print(
        f"{'all messages':38} {count / total_ours:12,.0f} {count / total_theirs:12,.0f}"
        f" {total_theirs / total_ours:7.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
