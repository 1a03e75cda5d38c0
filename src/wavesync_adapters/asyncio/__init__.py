"""The asyncio adapter: plain asyncio (and uvloop), without anyio.

Every stream is an ``(asyncio.StreamReader, asyncio.StreamWriter)`` pair, whichever
path carried it (TCP, LAN, relay or punched UDT). The programs:
``mediator.MediatorDaemon``, ``relay.RelayDaemon``, ``agent.ServerAgent`` and
``connector.Connector`` (with ``forward`` for port forwarding); UDT on its own in
``udt`` (endpoints, transports and stream pairs over one UDP socket); HTTP
tunnels in ``tunnel`` (the daemons' faces in ``tunnel_server``). docs/embedding.md
shows each in use.
"""

from __future__ import annotations

__all__: list[str] = []
