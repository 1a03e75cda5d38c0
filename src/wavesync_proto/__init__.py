"""wavesync_proto: the sans-I/O core of wavesync.

Everything in this package is a pure state machine or codec: it never opens a
socket, never reads a clock (time is passed in as ``now``) and never starts a
thread. The adapters in ``wavesync_adapters`` move bytes and time in and out.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
