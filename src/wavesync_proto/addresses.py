"""Transport addresses as the core sees them: ``(host, port)`` tuples.

The host is a textual IPv4 or IPv6 address, never a name: resolving names is
I/O and belongs to the adapters. These helpers convert between that text and
the packed form the wire formats carry (STUN address attributes, RFC 8489
§14.1-14.2), without importing ``socket``.
"""

from __future__ import annotations

import functools
import ipaddress

from .errors import LocalProtocolError

__all__ = [
    "FAMILY_IPV4",
    "FAMILY_IPV6",
    "Endpoint",
    "format_endpoint",
    "pack_host",
    "parse_endpoint",
    "unpack_ipv4",
    "unpack_ipv6",
]

Endpoint = tuple[str, int]
"""A transport address: textual IP address and port, as sockets use it."""

# Address family codes of the STUN address attributes (RFC 8489 §14.1).
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02


@functools.lru_cache(maxsize=4096)
def pack_host(host: str) -> tuple[int, bytes]:
    """Return ``(family, packed address)`` for a textual IPv4 or IPv6 address.

    Cached because a responder packs the same few peer addresses over and over
    and ``ipaddress`` parsing dominates an otherwise cheap encode.
    """
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        raise LocalProtocolError(f"not an IP address: {host!r}") from None
    if parsed.version == 4:
        return FAMILY_IPV4, parsed.packed
    return FAMILY_IPV6, parsed.packed


def unpack_ipv4(packed: bytes) -> str:
    """Format four bytes as dotted-quad text."""
    return "%d.%d.%d.%d" % (packed[0], packed[1], packed[2], packed[3])  # noqa: UP031 - fastest here


@functools.lru_cache(maxsize=1024)
def unpack_ipv6(packed: bytes) -> str:
    """Format sixteen bytes as compressed IPv6 text (RFC 5952)."""
    return ipaddress.IPv6Address(packed).compressed


def format_endpoint(endpoint: Endpoint) -> str:
    """``1.2.3.4:5`` or ``[2001:db8::1]:5``, the way URLs and logs write them."""
    host, port = endpoint
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_endpoint(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[V6HOST]:PORT`` into ``(host, port)``.

    The host may be a name here (the adapter resolves it); the port must be a
    decimal number in 0..65535.
    """
    host: str
    port_text: str | None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise LocalProtocolError(f"unbalanced '[' in address {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise LocalProtocolError(f"expected ':PORT' after ']' in address {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise LocalProtocolError(f"write IPv6 addresses as [ADDRESS]:PORT, not {text!r}")
    else:
        host, port_text = text, None
    if not host:
        raise LocalProtocolError(f"missing host in address {text!r}")
    if port_text is None:
        if default_port is None:
            raise LocalProtocolError(f"missing ':PORT' in address {text!r}")
        return host, default_port
    if not port_text.isdigit() or not port_text.isascii() or int(port_text) > 65535:
        raise LocalProtocolError(f"port must be a number in 0..65535, not {port_text!r}")
    return host, int(port_text)
