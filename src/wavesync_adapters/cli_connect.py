"""``wavesync server``, ``client`` and ``demo``: the programs that make the parts a product.

``server`` exposes a local TCP service behind NAT (every accepted stream is piped
to ``--forward``); ``client`` opens a local port whose connections reach that
service by the best path, or the one ``--path`` names; ``demo`` runs all of it
in one process on loopback and prints what worked and how fast (DESIGN.md §5).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import math
import sys
import uuid
from collections.abc import Callable
from typing import Any

from wavesync_proto.addresses import format_endpoint
from wavesync_proto.discovery import DEFAULT_GROUP
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.race import ALL_PATHS, RELAY_GRACE, PathKind

from ._demo import DemoRow
from .cli_args import adapter_option, address, stun_address
from .cli_tunnel import add_tunnel_options, tunnel_settings
from .errors import RegistrationError
from .programs import programs_for

__all__ = [
    "add_connect_commands",
    "announce",
    "run_client",
    "run_demo_command",
    "run_program",
    "run_server",
]

log = logging.getLogger("wavesync")


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def _start_delay(text: str) -> tuple[PathKind, float]:
    name, _, seconds = text.partition("=")
    try:
        kind = PathKind(name)
        delay = float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"want PATH=SECONDS with PATH one of lan, tcp, udp, relay: {text!r}"
        ) from None
    if not 0.0 <= delay < float("inf"):
        raise argparse.ArgumentTypeError(f"a delay is 0 or more seconds: {text!r}")
    return kind, delay


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return value


def _relay_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        text = f"http://{text}"
    return text


def add_connect_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``server``, ``client`` and ``demo`` to the ``wavesync`` command."""
    runtime = adapter_option()
    server = commands.add_parser(
        "server",
        parents=[common, runtime],
        help="expose a local TCP service behind NAT",
        description=(
            "Register with the mediator, keep standby connections to the relays, answer LAN"
            " searches and accept streams by every path; each is piped to --forward."
        ),
    )
    server.add_argument("--system-id", type=_uuid, required=True, metavar="UUID")
    server.add_argument("--key", required=True, help="the system's key (from keygen)")
    server.add_argument(
        "--server-id", type=_uuid, metavar="UUID", help="this server's id (default: a new one)"
    )
    _add_reach_options(server)
    server.add_argument(
        "--forward", type=address, required=True, metavar="HOST:PORT", help="the local service"
    )
    server.add_argument(
        "--tcp-listen",
        type=address,
        default=("0.0.0.0", 0),  # noqa: S104 - a server's default is every interface
        metavar="HOST:PORT",
        help="where direct and LAN clients connect (default 0.0.0.0, any free port)",
    )
    server.add_argument(
        "--udp-host",
        default="0.0.0.0",  # noqa: S104 - punching sockets answer only their peers
        metavar="HOST",
        help="address the punching UDP sockets bind (default 0.0.0.0)",
    )
    server.add_argument(
        "--standby-count",
        type=int,
        default=7,
        metavar="N",
        help="idle connections kept at each relay (default 7)",
    )

    client = commands.add_parser(
        "client",
        parents=[common, runtime],
        help="a local port that reaches a service behind NAT",
        description=(
            "Listen on --listen; each connection there is carried to the server's service"
            " by the first path that works (LAN, direct TCP, punched UDT, relay), or by"
            " the one --path names."
        ),
    )
    target = client.add_mutually_exclusive_group(required=True)
    target.add_argument("--system-id", type=_uuid, metavar="UUID", help="any server of a system")
    target.add_argument("--server-id", type=_uuid, metavar="UUID", help="one server")
    _add_reach_options(client)
    client.add_argument(
        "--listen", type=address, required=True, metavar="HOST:PORT", help="the local port"
    )
    client.add_argument(
        "--path",
        choices=["auto", *(kind.value for kind in PathKind)],
        default="auto",
        help="race every path (auto, the default) or use one",
    )
    client.add_argument(
        "--delay",
        type=_start_delay,
        action="append",
        default=[],
        metavar="PATH=SECONDS",
        help=(
            "hold a path back when racing, e.g. relay=0.1 lets a punch or a direct"
            " connection that works within 100 ms win over the relay (repeatable; default 0)"
        ),
    )
    client.add_argument(
        "--relay-grace",
        type=_seconds,
        default=RELAY_GRACE,
        metavar="SECONDS",
        help=(
            "how long a connected relay waits for a direct or punched path still under way"
            f" before it wins (default {RELAY_GRACE:g}; 0: the first path up wins)"
        ),
    )
    client.add_argument(
        "--deadline",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up connecting after this long (default 10)",
    )

    demo = commands.add_parser(
        "demo",
        parents=[common, runtime],
        help="run everything on loopback and connect over every path",
        description=(
            "Start a mediator, a relay, a server agent in front of a small HTTP service and"
            " a client, all in this process on loopback; fetch a page over each path in"
            " turn and over auto, and print a table. Exit 0 when every path worked."
        ),
    )
    demo.add_argument(
        "--page-bytes",
        type=int,
        default=4 * 1024 * 1024,
        metavar="N",
        help="size of the page fetched over each path (default 4 MiB)",
    )


def _add_reach_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mediator", type=stun_address, metavar="HOST[:PORT]", help="the mediator (port 3478)"
    )
    parser.add_argument(
        "--relay",
        type=_relay_url,
        action="append",
        default=[],
        metavar="URL",
        help="a relay, http://HOST:PORT (repeatable)",
    )
    parser.add_argument(
        "--mediator-http",
        metavar="HOST:PORT|URL",
        help="the mediator's HTTP face, for --tunnel (default: --mediator)",
    )
    add_tunnel_options(parser, default=None)
    parser.add_argument(
        "--no-lan", dest="lan", action="store_false", help="no LAN discovery (search or answer)"
    )
    parser.add_argument(
        "--lan-interface",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="the IPv4 address of an interface LAN discovery uses (default: the kernel's pick)",
    )
    parser.add_argument(
        "--lan-group",
        type=address,
        default=DEFAULT_GROUP,
        metavar="GROUP:PORT",
        help=f"the discovery multicast group (default {format_endpoint(DEFAULT_GROUP)})",
    )


def _tunnel(args: argparse.Namespace, command: str) -> tuple[dict[str, Any], int | None]:
    """The tunnel keyword arguments for the agent or the connector, or an exit status."""
    if args.tunnel is None:
        return {}, None
    target = args.mediator_http or (format_endpoint(args.mediator) if args.mediator else None)
    target = target or (args.relay[0] if args.relay else None)
    if target is None:
        print(f"wavesync {command}: --tunnel needs --mediator or --relay", file=sys.stderr)
        return {}, 2
    try:
        tunnel, proxy = tunnel_settings(args, target)
    except (ValueError, LocalProtocolError) as exc:
        print(f"wavesync {command}: {exc}", file=sys.stderr)
        return {}, 2
    return {"tunnel": tunnel, "proxy": proxy, "mediator_http": args.mediator_http}, None


def run_server(args: argparse.Namespace) -> int:
    server_id = args.server_id or uuid.uuid4()
    if args.mediator is None and not args.relay and not args.lan:
        print("wavesync server: give --mediator, --relay or LAN discovery", file=sys.stderr)
        return 2
    tunnel, status = _tunnel(args, "server")
    if status is not None:
        return status
    options = {
        "system_id": args.system_id,
        "server_id": server_id,
        "key": args.key,
        "mediator": args.mediator,
        "relays": args.relay,
        "tcp_listen": args.tcp_listen,
        "udp_host": args.udp_host,
        "lan": args.lan,
        "lan_group": args.lan_group,
        "lan_interfaces": args.lan_interface or ("0.0.0.0",),  # noqa: S104 - kernel's pick
        "standby_count": args.standby_count,
        **tunnel,
    }
    programs = programs_for(args.adapter)
    counters: list[object] = []

    def serve() -> None:
        counters.append(programs.run_server(options, forward=args.forward, announce=announce))

    status = run_program("server", serve)
    log.info("server stopped: %s", counters[0] if counters else "not started")
    return status


def run_client(args: argparse.Namespace) -> int:
    paths = ALL_PATHS if args.path == "auto" else frozenset({PathKind(args.path)})
    tunnel, status = _tunnel(args, "client")
    if status is not None:
        return status
    options = {
        "server_id": args.server_id,
        "system_id": args.system_id,
        "mediator": args.mediator,
        "relays": args.relay,
        "paths": paths,
        "lan": args.lan,
        "lan_group": args.lan_group,
        "lan_interface": args.lan_interface[0] if args.lan_interface else None,
        "deadline": args.deadline,
        "start_delays": dict(args.delay),
        "relay_grace": args.relay_grace,
        **tunnel,
    }
    programs = programs_for(args.adapter)
    return run_program(
        "client",
        functools.partial(programs.run_client, options, listen=args.listen, announce=announce),
    )


def run_demo_command(args: argparse.Namespace) -> int:
    if args.adapter == "trio" and importlib.util.find_spec("trio") is None:
        # An optional extra: say how to get it rather than anyio's LookupError traceback.
        print("wavesync demo: --adapter trio needs pip install 'wavesync[trio]'", file=sys.stderr)
        return 2
    rows = _run_demo(args.adapter, args.page_bytes)
    failed = [row.path for row in rows if not row.connected]
    if failed:
        print(f"wavesync demo: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _run_demo(adapter: str, page_bytes: int) -> list[DemoRow]:
    """The demo on ``adapter``'s runtime, importing only that runtime (PLC0415 below)."""
    if adapter == "asyncio":
        import asyncio  # noqa: PLC0415

        from .asyncio.demo import run_demo as run_asyncio_demo  # noqa: PLC0415

        return asyncio.run(run_asyncio_demo(page_bytes=page_bytes))
    if adapter == "blocking":
        from .blocking.demo import run_demo as run_blocking_demo  # noqa: PLC0415

        return run_blocking_demo(page_bytes=page_bytes)
    import anyio  # noqa: PLC0415

    from .anyio.demo import run_demo  # noqa: PLC0415

    backend = "trio" if adapter == "trio" else "asyncio"
    return anyio.run(functools.partial(run_demo, page_bytes=page_bytes), backend=backend)


def announce(line: str) -> None:
    """Print a program's ready line (scripts and tests wait for it on stdout)."""
    print(line, flush=True)


def run_program(command: str, program: Callable[[], None]) -> int:
    """Run a daemon program to its end: 0 after a signal stopped it, 1 when the network
    said no (an address not bound, a key refused), 2 for options this runtime lacks."""
    try:
        program()
    except (RegistrationError, OSError) as exc:
        print(f"wavesync {command}: {exc}", file=sys.stderr)
        return 1
    except LocalProtocolError as exc:
        print(f"wavesync {command}: {exc}", file=sys.stderr)
        return 2
    return 0
