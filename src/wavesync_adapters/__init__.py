"""wavesync_adapters: runtimes for the sans-I/O core (anyio, asyncio, blocking sockets).

Adapters move bytes and time between the operating system and the state
machines of ``wavesync_proto``; every protocol decision stays in the core.
"""

from __future__ import annotations

__all__: list[str] = []
