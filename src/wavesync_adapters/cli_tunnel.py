"""The ``wavesync`` command's tunnel options (``--tunnel``, ``--proxy``) and ``tunnel-probe``.

``add_tunnel_options`` and ``tunnel_settings`` are what every program with a
session to the mediator or the relay takes (docs/tunnel.md §9): ``--tunnel
auto|METHOD|ssl+METHOD`` and ``--proxy URL``, with the proxy otherwise taken
from ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``/``NO_PROXY``.
``wavesync tunnel-probe`` uses them to say which method works from here, on the
runtime ``--adapter`` names (only that one is imported).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.tunnel import ALL_KINDS, ProxyConfig, TunnelKind, TunnelMemory

from ._common import AUTO, TunnelChoice, environment_proxy, parse_tunnel_choice
from .cli_args import adapter_option
from .errors import TunnelError

__all__ = [
    "DIRECT",
    "add_tunnel_options",
    "add_tunnel_probe_command",
    "run_tunnel_probe",
    "tunnel_settings",
]

#: ``--proxy direct``: no proxy, whatever the environment says.
DIRECT = "direct"


def _tunnel_choice(text: str) -> TunnelChoice:
    try:
        return parse_tunnel_choice(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _proxy(text: str) -> ProxyConfig | str:
    if text == DIRECT:
        return DIRECT
    try:
        return ProxyConfig.from_url(text)
    except (LocalProtocolError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_tunnel_options(parser: argparse.ArgumentParser, *, default: str | None) -> None:
    """``--tunnel`` (default ``default``; None: plain TCP unless given) and ``--proxy``."""
    parser.add_argument(
        "--tunnel",
        type=_tunnel_choice,
        default=None if default is None else parse_tunnel_choice(default),
        metavar="auto|METHOD|ssl+METHOD",
        help=(
            "reach the service through an HTTP tunnel: auto (probe, keep what works),"
            " upgrade, websocket, connect (needs a proxy), getpost, or ssl+ any of them"
            + (f" (default {default})" if default else "")
        ),
    )
    parser.add_argument(
        "--proxy",
        type=_proxy,
        metavar="URL",
        help=(
            "HTTP proxy, http://[user:pass@]host:port; default: HTTPS_PROXY (ssl+ kinds) or"
            " HTTP_PROXY, else ALL_PROXY, unless NO_PROXY names the target; 'direct': none"
        ),
    )


def tunnel_settings(
    args: argparse.Namespace, target: str
) -> tuple[TunnelChoice | None, ProxyConfig | None]:
    """The tunnel and the proxy for ``target``: ``--proxy``, else the environment's
    (``https_proxy`` when the named kind is ``ssl+``; ``auto`` and plain kinds take
    ``http_proxy``)."""
    tunnel: TunnelChoice | None = args.tunnel
    given: ProxyConfig | str | None = args.proxy
    if isinstance(given, ProxyConfig):
        return tunnel, given
    if given == DIRECT or tunnel is None:
        return tunnel, None
    tls = isinstance(tunnel, TunnelKind) and tunnel.tls
    return tunnel, environment_proxy(target, tls=tls)


def add_tunnel_probe_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    probe = commands.add_parser(
        "tunnel-probe",
        parents=[common, adapter_option()],
        help="find which HTTP tunnel method reaches a mediator's or relay's HTTP face",
        description=(
            "Open tunnels to TARGET (a mediator's --http face or a relay's port) by every"
            " method, or the one named, through the proxy; validate each end to end with an"
            " echo and print the first that works. Exit status 1 when none does."
        ),
    )
    probe.add_argument("target", metavar="TARGET", help="host:port or http[s]://host[:port]")
    add_tunnel_options(probe, default=AUTO)
    probe.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per attempt (default 10)"
    )


def run_tunnel_probe(args: argparse.Namespace) -> int:
    try:
        tunnel, proxy = tunnel_settings(args, args.target)
    except (ValueError, LocalProtocolError) as exc:
        print(f"wavesync tunnel-probe: {exc}", file=sys.stderr)
        return 1
    kinds = ALL_KINDS if tunnel == AUTO or tunnel is None else (tunnel,)
    try:
        kind = _probe_on(args.adapter, args.target, kinds, proxy=proxy, timeout=args.timeout)
    except (TunnelError, ValueError) as exc:
        print(f"wavesync tunnel-probe: {exc}", file=sys.stderr)
        return 1
    via = f"proxy {proxy.host}:{proxy.port}" if proxy is not None else "no proxy"
    print(f"{kind} ({via})")
    return 0


def _probe_on(
    adapter: str,
    target: str,
    kinds: Sequence[TunnelKind],
    *,
    proxy: ProxyConfig | None,
    timeout: float,
) -> TunnelKind:
    """The first kind whose tunnel passes the echo, probed on ``adapter`` (only that
    runtime is imported); the tunnel itself is closed at once."""
    # Each attempt gets the timeout; the whole probe three times it.
    if adapter == "blocking":
        from .blocking.tunnel import probe_tunnel as probe_blocking  # noqa: PLC0415

        sock, kind = probe_blocking(
            target,
            kinds,
            proxy=proxy,
            memory=TunnelMemory(),
            attempt_timeout=timeout,
            deadline=3 * timeout,
        )
        sock.close()
        return kind
    if adapter == "asyncio":
        import asyncio  # noqa: PLC0415

        from .asyncio.tunnel import probe_tunnel as probe_asyncio  # noqa: PLC0415

        async def probe_on_asyncio() -> TunnelKind:
            _, writer, kind = await probe_asyncio(
                target,
                kinds,
                proxy=proxy,
                memory=TunnelMemory(),
                attempt_timeout=timeout,
                deadline=3 * timeout,
            )
            writer.close()
            with contextlib.suppress(OSError):  # a tunnel that ends unclean is no matter now
                await asyncio.wait_for(writer.wait_closed(), timeout)
            return kind

        return asyncio.run(probe_on_asyncio())
    # anyio, or trio through it
    import anyio  # noqa: PLC0415

    from .anyio.tunnel import probe_tunnel as probe_anyio  # noqa: PLC0415

    async def probe_on_anyio() -> TunnelKind:
        stream, kind = await probe_anyio(
            target,
            kinds,
            proxy=proxy,
            memory=TunnelMemory(),
            attempt_timeout=timeout,
            deadline=3 * timeout,
        )
        await stream.aclose()
        return kind

    return anyio.run(probe_on_anyio, backend="trio" if adapter == "trio" else "asyncio")
