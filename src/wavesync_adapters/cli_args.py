"""Argument types the ``wavesync`` subcommands share (cli.py, cli_connect.py).

Here, not in cli.py, because cli.py imports the modules that add subcommands.
"""

from __future__ import annotations

import argparse

from wavesync_proto.addresses import Endpoint, parse_endpoint
from wavesync_proto.errors import LocalProtocolError

from .programs import ADAPTERS

__all__ = ["STUN_PORT", "address", "stun_address"]

STUN_PORT = 3478  # RFC 8489 §18.6: the default port for STUN over UDP and TCP


def address(text: str) -> Endpoint:
    """``HOST:PORT``, the port required."""
    return _parsed(text, None)


def stun_address(text: str) -> Endpoint:
    """``HOST[:PORT]``, port 3478 when left out (a STUN server, the mediator)."""
    return _parsed(text, STUN_PORT)


def _parsed(text: str, default_port: int | None) -> Endpoint:
    try:
        return parse_endpoint(text, default_port=default_port)
    except LocalProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def adapter_option() -> argparse.ArgumentParser:
    """A parent parser with ``--adapter``: the runtime a daemon program runs on."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--adapter",
        choices=ADAPTERS,
        default="anyio",
        help="the runtime: anyio (on asyncio, the default), asyncio, trio or blocking threads",
    )
    return parent
