"""The anyio adapter (asyncio or trio underneath): daemons and library calls."""

from __future__ import annotations

__all__: list[str] = []
