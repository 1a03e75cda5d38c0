"""The anyio adapter (asyncio or trio underneath): daemons and library calls.

Every stream is an ``anyio.abc.ByteStream``. The programs: ``mediator``,
``relay``, ``agent.ServerAgent``, ``connector.Connector`` (with ``forward``),
UDT in ``udt``, the HTTP tunnels (``tunnel``, ``tunnel_server``), and the
``demo`` and ``udt_cat`` programs. docs/embedding.md shows each in use.
"""

from __future__ import annotations

__all__: list[str] = []
