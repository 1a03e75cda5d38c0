"""A byte stream that first yields bytes already read, then reads its underlying stream.

Handshakes read whole chunks, so the end of a chunk may already be the other
side's first data. The handshake machines hand those bytes back; this wrapper
gives them to the application first, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio.abc

__all__ = ["PrefixedStream"]


class PrefixedStream(anyio.abc.ByteStream):
    """``stream``, with ``prefix`` delivered before anything it receives."""

    def __init__(self, stream: anyio.abc.ByteStream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = prefix

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self.stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.stream.send(item)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.stream.extra_attributes
