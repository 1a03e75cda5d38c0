"""The ``wavesync`` command.

Each subcommand is a thin program over an adapter (server, client and demo live
in cli_connect.py, tunnel-probe in cli_tunnel.py). Exit status: 0 on success, 1 when the
network operation failed, 2 for a usage error (argparse's convention).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import resource
import secrets
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from wavesync_proto import __version__
from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.mediator.systems import format_system_entry, parse_systems
from wavesync_proto.relay import RelayLimits, RelayService
from wavesync_proto.stun.transaction import DEFAULT_RC, DEFAULT_RM, DEFAULT_RTO
from wavesync_proto.udt.congestion import CongestionControl, UdtNativeCongestion
from wavesync_proto.udt.congestion_rate import DeliveryRateCongestion
from wavesync_proto.udt.connection_types import UdtConfig

from ._udt_cat import UdtCatError, UdtCatMode
from .blocking.stun import StunError, binding_request, serve_binding
from .cli_args import STUN_PORT, adapter_option, address, stun_address
from .cli_connect import (
    add_connect_commands,
    announce,
    run_client,
    run_demo_command,
    run_program,
    run_server,
)
from .cli_tunnel import add_tunnel_probe_command, run_tunnel_probe
from .programs import programs_for

__all__ = ["main"]

log = logging.getLogger("wavesync")

#: ``wavesync udt send --congestion``: the sender's congestion control (only the sender's
#: matters in UDT; the receiver never sees which one runs).
_CONGESTION: dict[str, Callable[..., CongestionControl]] = {
    "native": UdtNativeCongestion,
    "rate": DeliveryRateCongestion,
}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(level: str, json_logs: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("wavesync")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {text!r}")
    return int(text)


def _common_options(*, top_level: bool) -> argparse.ArgumentParser:
    # The options work before or after the subcommand. A subcommand's parser must not
    # set defaults, or it would overwrite what was given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default="warning" if top_level else argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help="what to log on stderr (default: warning)",
    )
    common.add_argument(
        "--json-logs",
        action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="log one JSON object per line",
    )
    return common


def _build_parser() -> argparse.ArgumentParser:
    common = _common_options(top_level=False)
    parser = argparse.ArgumentParser(
        prog="wavesync",
        description="Reach servers behind NAT: hole punching, reliable UDP, relays, HTTP tunnels.",
        parents=[_common_options(top_level=True)],
    )
    parser.add_argument("--version", action="version", version=f"wavesync {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    binding = commands.add_parser(
        "stun-binding",
        parents=[common],
        help="ask a STUN server for this host's public (mapped) address",
        description=(
            "Send a STUN Binding request over UDP and print the mapped address the server saw."
            " Retransmits on the RFC 8489 schedule: by default 7 requests at 0, 0.5, 1.5, 3.5,"
            " 7.5, 15.5 and 31.5 s, giving up at 39.5 s."
        ),
    )
    binding.add_argument(
        "server", type=stun_address, metavar="HOST[:PORT]", help="STUN server (port 3478)"
    )
    binding.add_argument(
        "--rto",
        type=_positive_float,
        default=DEFAULT_RTO,
        help=f"initial retransmission timeout in seconds (default {DEFAULT_RTO})",
    )
    binding.add_argument(
        "--requests",
        type=_positive_int,
        default=DEFAULT_RC,
        help=f"how many times to send the request, Rc (default {DEFAULT_RC})",
    )
    binding.add_argument(
        "--final-wait",
        type=_positive_int,
        default=DEFAULT_RM,
        help=f"wait this many RTOs after the last request, Rm (default {DEFAULT_RM})",
    )

    server = commands.add_parser(
        "stun-server",
        parents=[common],
        help="answer STUN Binding requests on a UDP port",
        description="Answer STUN Binding requests (RFC 8489) on UDP until interrupted.",
    )
    server.add_argument(
        "--listen",
        type=stun_address,
        default=("0.0.0.0", STUN_PORT),  # noqa: S104 - a server's default is every interface
        metavar="HOST:PORT",
        help="address to answer on (default 0.0.0.0:3478; port 0 picks a free one)",
    )
    keygen = commands.add_parser(
        "keygen",
        parents=[common],
        help="print a new system id and key as a systems.toml entry",
        description=(
            "Generate a system: a random RFC 4122 UUID and a 256-bit key, printed as a"
            " [[system]] entry to append to the mediator's systems file."
        ),
    )
    keygen.add_argument("--name", help="a label stored with the entry")

    runtime = adapter_option()
    mediator = commands.add_parser(
        "mediator",
        parents=[common, runtime],
        help="run the mediator: STUN over UDP and TCP on one port",
        description=(
            "Run the mediator: servers register over TCP, clients ask to be connected over"
            " UDP and TCP, and plain STUN Binding requests are answered on both."
        ),
    )
    mediator.add_argument(
        "--listen",
        type=stun_address,
        default=("0.0.0.0", STUN_PORT),  # noqa: S104 - a server's default is every interface
        metavar="HOST:PORT",
        help="address for both UDP and TCP (default 0.0.0.0:3478; port 0 picks a free one)",
    )
    mediator.add_argument(
        "--systems", type=Path, required=True, metavar="FILE", help="systems.toml (see keygen)"
    )
    mediator.add_argument(
        "--relay-url",
        action="append",
        default=[],
        metavar="URL",
        help="a relay to offer clients (repeatable)",
    )
    mediator.add_argument(
        "--http",
        type=stun_address,
        metavar="HOST:PORT",
        help=(
            "also serve the HTTP face there: every HTTP tunnel method (docs/tunnel.md)"
            " carries a TCP session, for servers and clients behind HTTP proxies"
        ),
    )
    relay = commands.add_parser(
        "relay",
        parents=[common, runtime],
        help="run the relay: standby pools of servers, clients paired to them",
        description=(
            "Run the relay: servers keep idle standby connections to it, clients ask for a"
            " server (or any server of a system) and get one of them as a tunnel; the relay"
            " then copies bytes both ways without looking inside."
        ),
    )
    relay.add_argument(
        "--listen", type=address, required=True, metavar="HOST:PORT", help="TCP address"
    )
    relay.add_argument(
        "--systems", type=Path, required=True, metavar="FILE", help="systems.toml (see keygen)"
    )
    relay.add_argument(
        "--host-name",
        action="append",
        metavar="NAME",
        help=(
            "a name servers reach this relay by (repeatable); when given, standby requests"
            " signed for any other name are refused"
        ),
    )
    relay.add_argument(
        "--standby-count",
        type=_positive_int,
        default=RelayLimits.standby_count,
        help=f"standby connections to ask of each server (default {RelayLimits.standby_count})",
    )
    _add_udt_commands(commands, common)
    add_tunnel_probe_command(commands, common)
    add_connect_commands(commands, common)
    return parser


def _add_udt_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    udt = commands.add_parser(
        "udt",
        parents=[common],
        help="netcat over UDT: send stdin to a peer, or write what a peer sends to stdout",
        description=(
            "Carry a byte stream over UDT (reliable UDP, UDT4 wire format). Exit status 0"
            " only when the whole stream was delivered and the connection closed cleanly."
        ),
    )
    directions = udt.add_subparsers(dest="udt_command", metavar="send|recv", required=True)
    runtime = adapter_option()
    recv = directions.add_parser(
        "recv",
        parents=[common, runtime],
        help="accept one connection (or rendezvous) and write its bytes to stdout",
        description=(
            "Take one UDT connection and write the stream to stdout until the peer closes."
            " With --listen HOST:0 the bound address is printed on stderr"
            " ('listening on udp HOST:PORT')."
        ),
    )
    send = directions.add_parser(
        "send",
        parents=[common, runtime],
        help="connect (or rendezvous) and send stdin until its end",
        description=(
            "Send stdin over one UDT connection, then close and wait until the peer has"
            " acknowledged every byte."
        ),
    )
    send.add_argument(
        "--gso",
        action="store_true",
        help=(
            "send runs of equal datagrams as one system call (Linux UDP GSO, >= 4.18);"
            " about 2 x the goodput to a receiver with GRO (every wavesync one), off by"
            " default (docs/udt.md)"
        ),
    )
    send.add_argument(
        "--max-bandwidth",
        type=_bytes_per_second,
        metavar="BYTES/S",
        default=None,
        help="never send faster than this, UDP and IP headers included (UDT_MAXBW)",
    )
    send.add_argument(
        "--congestion",
        choices=sorted(_CONGESTION),
        default=None,
        help=(
            "the sender's congestion control: 'native' is UDT 4.11's DAIMD, 'rate' the"
            " loss-tolerant delivery-rate control (default: UdtConfig's)"
        ),
    )
    for parser, how, how_help in (
        (recv, "--listen", "accept a regular connect on this UDP address"),
        (send, "--connect", "connect to a UDT listener at this address"),
    ):
        mode = parser.add_mutually_exclusive_group(required=True)
        mode.add_argument(how, type=address, metavar="HOST:PORT", help=how_help)
        mode.add_argument(
            "--rendezvous",
            action="store_true",
            help="rendezvous connect (both peers start at once): needs --local and --peer",
        )
        parser.add_argument(
            "--local",
            type=_local_endpoint,
            metavar="[HOST:]PORT",
            help="with --rendezvous: the UDP port (and address, default every one) to use",
        )
        parser.add_argument(
            "--peer",
            type=address,
            metavar="HOST:PORT",
            help="with --rendezvous: the peer's UDP address",
        )


def _bytes_per_second(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive rate")
    return value


def _local_endpoint(text: str) -> tuple[str, int]:
    if text.isdigit():
        text = f"0.0.0.0:{text}"
    return address(text)


def _load_systems(command: str, path: Path) -> dict[uuid.UUID, str] | None:
    try:
        return dict(parse_systems(path.read_text(encoding="utf-8")))
    except (OSError, LocalProtocolError) as exc:
        print(f"wavesync {command}: {exc}", file=sys.stderr)
        return None


def _raise_open_file_limit() -> None:
    """Let the relay use every file descriptor the system allows it.

    Each idle standby connection is one descriptor and each spliced session six (two
    sockets, two pipes of two ends); the usual soft limit of 1,024 would cap a relay
    at a few hundred sessions long before any of its own limits.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
            return
    log.info("open-file limit: %d", hard)


def _run_keygen(args: argparse.Namespace) -> int:
    # 32 bytes of the OS's randomness, URL-safe base64: ASCII, no quoting needed in TOML.
    # Not starting with "-", which `--key KEY` would read as an option (1 key in 64).
    key = secrets.token_urlsafe(32)
    while key.startswith("-"):
        key = secrets.token_urlsafe(32)
    print(format_system_entry(uuid.uuid4(), key, args.name), end="")
    return 0


def _run_mediator(args: argparse.Namespace) -> int:
    systems = _load_systems("mediator", args.systems)
    if systems is None:
        return 1
    service = MediatorService(
        systems=systems, relay_urls=tuple(args.relay_url), nonce_secret=secrets.token_bytes(32)
    )
    log.info("%d system(s) loaded from %s", len(systems), args.systems)
    programs = programs_for(args.adapter)
    status = run_program(
        "mediator",
        functools.partial(
            programs.run_mediator, service, listen=args.listen, http=args.http, announce=announce
        ),
    )
    log.info("mediator stopped: %s", service.counters)
    return status


def _run_relay(args: argparse.Namespace) -> int:
    systems = _load_systems("relay", args.systems)
    if systems is None:
        return 1
    _raise_open_file_limit()
    limits = RelayLimits(standby_count=args.standby_count)
    service = RelayService(systems, limits=limits, host_names=args.host_name)
    log.info("%d system(s) loaded from %s", len(systems), args.systems)
    programs = programs_for(args.adapter)
    status = run_program(
        "relay",
        functools.partial(programs.run_relay, service, listen=args.listen, announce=announce),
    )
    log.info("relay stopped: %s", service.counters)
    return status


def _run_udt(args: argparse.Namespace) -> int:
    command = f"udt {args.udt_command}"
    gso = getattr(args, "gso", False)
    if args.rendezvous:
        if args.local is None or args.peer is None:
            print(f"wavesync {command}: --rendezvous needs --local and --peer", file=sys.stderr)
            return 2
        mode = UdtCatMode(local=args.local, peer=args.peer, gso=gso)
    elif args.local is not None or args.peer is not None:
        print(f"wavesync {command}: --local and --peer go with --rendezvous", file=sys.stderr)
        return 2
    elif args.udt_command == "recv":
        mode = UdtCatMode(listen=args.listen)
    else:
        mode = UdtCatMode(connect=args.connect, gso=gso)

    def announce(line: str) -> None:
        # stdout carries the stream: the address (port 0 picks one) goes to stderr.
        print(line, file=sys.stderr, flush=True)

    receiving = args.udt_command == "recv"
    config = None
    if not receiving and (args.congestion or args.max_bandwidth):
        congestion = _CONGESTION[args.congestion] if args.congestion else None
        config = UdtConfig(congestion=congestion, max_bandwidth=args.max_bandwidth)
    fd = sys.stdout.fileno() if receiving else sys.stdin.fileno()
    try:
        _run_udt_on(args.adapter, receiving, mode, fd, announce=announce, config=config)
    except (UdtCatError, OSError) as exc:
        print(f"wavesync {command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_udt_on(
    adapter: str,
    receiving: bool,
    mode: UdtCatMode,
    fd: int,
    *,
    announce: Callable[[str], None],
    config: UdtConfig | None,
) -> None:
    """Run ``wavesync udt recv`` (or send) on ``adapter``, importing only that runtime:
    a blocking program should not load asyncio's event loop machinery, nor asyncio anyio."""
    if adapter == "blocking":
        from .blocking import udt_cat as blocking_cat  # noqa: PLC0415

        run_blocking = blocking_cat.receive_stream if receiving else blocking_cat.send_stream
        run_blocking(mode, fd, announce=announce, config=config)
    elif adapter == "asyncio":
        import asyncio  # noqa: PLC0415

        from .asyncio import udt_cat as asyncio_cat  # noqa: PLC0415

        run_asyncio = asyncio_cat.receive_stream if receiving else asyncio_cat.send_stream
        asyncio.run(run_asyncio(mode, fd, announce=announce, config=config))
    else:  # anyio, or trio through it
        import anyio  # noqa: PLC0415

        from .anyio import udt_cat as anyio_cat  # noqa: PLC0415

        run_anyio = anyio_cat.receive_stream if receiving else anyio_cat.send_stream
        backend = "trio" if adapter == "trio" else "asyncio"
        program = functools.partial(run_anyio, mode, fd, announce=announce, config=config)
        anyio.run(program, backend=backend)


def _run_stun_binding(args: argparse.Namespace) -> int:
    host, port = args.server
    try:
        result = binding_request(host, port, rto=args.rto, rc=args.requests, rm=args.final_wait)
    except StunError as exc:
        print(f"wavesync stun-binding: {exc}", file=sys.stderr)
        return 1
    log.info(
        "%s answered after %d request(s) in %.1f ms",
        format_endpoint(result.server),
        result.attempts,
        result.elapsed * 1000,
    )
    print(format_endpoint(result.mapped))
    return 0


def _run_stun_server(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    def announce(bound: Endpoint) -> None:
        # One line on stdout so scripts and tests learn the port chosen for port 0.
        print(f"listening on udp {format_endpoint(bound)}", flush=True)

    host, port = args.listen
    try:
        serve_binding(host, port, ready=announce, stop=stop)
    except (StunError, OSError) as exc:
        print(f"wavesync stun-server: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wavesync`` console script."""
    args = _build_parser().parse_args(argv)
    _configure_logging(args.log_level, args.json_logs)
    runners = {
        "client": run_client,
        "demo": run_demo_command,
        "keygen": _run_keygen,
        "mediator": _run_mediator,
        "relay": _run_relay,
        "server": run_server,
        "stun-binding": _run_stun_binding,
        "stun-server": _run_stun_server,
        "tunnel-probe": run_tunnel_probe,
        "udt": _run_udt,
    }
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
