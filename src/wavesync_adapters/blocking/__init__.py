"""The blocking adapter: plain sockets, selectors and threads, no event loop.

Every stream is a real ``socket.socket`` (a punched UDT stream is one end of a
socket pair its endpoint's I/O thread pumps), so ``ssl``, ``http.client`` and
``makefile`` work on it unchanged. The programs: ``mediator.MediatorDaemon``,
``relay.RelayDaemon`` (``serve_forever``/``shutdown``), ``agent.ServerAgent``
(``with agent.running(handler)``) and ``connector.Connector`` (``with
Connector(...) as c: c.connect()``), with ``forward`` for port forwarding; UDT
on its own in ``udt``; HTTP tunnels in ``tunnel`` (the daemons' faces in
``tunnel_server``); STUN Binding in ``stun``. docs/embedding.md shows each in use.
"""

from __future__ import annotations

from .stun import (
    BindingResult,
    StunError,
    StunRejectedError,
    StunTimeoutError,
    binding_request,
    serve_binding,
)

__all__ = [
    "BindingResult",
    "StunError",
    "StunRejectedError",
    "StunTimeoutError",
    "binding_request",
    "serve_binding",
]
