"""Which proxy a tunnel goes through (docs/tunnel.md §9): ``--proxy URL`` and the environment.

This module owns the rules curl and Python's requests users expect: a proxy
URL ``http://user:pass@host:port`` (percent-decoded credentials, port 80 when
absent, a bare ``host:port`` taken as http), ``https_proxy``/``http_proxy``
chosen by whether the tunnel runs TLS (lower case wins over upper case,
``all_proxy`` as the fallback, an empty value counts as unset), and
``no_proxy`` (``*``, host suffixes with or without a leading dot, ``:port``,
IP addresses and CIDR blocks). It reads no environment itself: the adapter
passes ``os.environ`` (or any mapping) in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from ..errors import LocalProtocolError
from .wire import ProxyConfig

__all__ = ["bypasses_proxy", "parse_proxy_url", "proxy_from_environment"]

_DEFAULT_PORT = 80


def parse_proxy_url(url: str) -> ProxyConfig:
    """``http://[user[:password]@]host[:port][/]`` as a ``ProxyConfig``; LocalProtocolError
    for anything else (an ``https://`` proxy — TLS to the proxy itself — is not supported)."""
    text = url.strip()
    if not text:
        raise LocalProtocolError("an empty proxy URL")
    if "://" not in text:
        text = "http://" + text  # curl and requests read "host:port" as an http proxy
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise LocalProtocolError(f"bad proxy URL {url!r}: {exc}") from None
    if parts.scheme.lower() != "http":
        raise LocalProtocolError(
            f"proxy URL {url!r}: only http:// proxies are supported, not {parts.scheme}://"
        )
    if not parts.hostname:
        raise LocalProtocolError(f"proxy URL {url!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise LocalProtocolError(f"proxy URL {url!r}: a proxy URL has no path or query")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    config = ProxyConfig(
        host=parts.hostname,
        port=_DEFAULT_PORT if port is None else port,
        username=username or None,
        password=password if username else None,
    )
    if config.port == 0:
        raise LocalProtocolError(f"proxy URL {url!r}: port 0")
    config.authorization()  # a user-id with ':' cannot be sent: say so now, not per request
    return config


def _lookup(environ: Mapping[str, str], name: str) -> str | None:
    for key in (name.lower(), name.upper()):
        value = environ.get(key, "").strip()
        if value:
            return value
    return None


def proxy_from_environment(
    host: str, port: int, *, tls: bool, environ: Mapping[str, str]
) -> ProxyConfig | None:
    """The proxy for a tunnel to ``host:port`` by the environment, or None (go direct).

    ``tls``: the tunnel runs TLS (an ``ssl+`` kind), so ``https_proxy`` applies;
    otherwise ``http_proxy``. Either falls back to ``all_proxy``. ``no_proxy``
    is checked first.
    """
    if bypasses_proxy(host, port, _lookup(environ, "no_proxy") or ""):
        return None
    url = _lookup(environ, "https_proxy" if tls else "http_proxy") or _lookup(environ, "all_proxy")
    return None if url is None else parse_proxy_url(url)


def bypasses_proxy(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (comma- or space-separated) says to reach ``host:port`` directly.

    ``*`` matches everything; ``example.com``, ``.example.com`` and ``*.example.com``
    each match example.com and every name under it (not ``badexample.com``);
    ``host:port`` matches that port only; ``10.0.0.0/8`` and ``::1`` match
    addresses. Names compare case-insensitively; no name is resolved.
    """
    name = host.strip().strip("[]").rstrip(".").lower()
    address = _address(name)
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            if _address_matches(address, entry):
                return True
            continue
        suffix = entry.removeprefix("*").lstrip(".").rstrip(".")
        if suffix and (name == suffix or name.endswith("." + suffix)):
            return True
    return False


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port``, ``[v6]``, bare IPv6 (several colons: no port)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def _address_matches(address: ipaddress.IPv4Address | ipaddress.IPv6Address, entry: str) -> bool:
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return address in network
