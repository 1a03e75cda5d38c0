"""The asyncio adapter: plain asyncio (and uvloop), without anyio.

So far UDT only (``wavesync_adapters.asyncio.udt``): endpoints, transports and
``asyncio`` stream pairs over one UDP socket.
"""

from __future__ import annotations

__all__: list[str] = []
