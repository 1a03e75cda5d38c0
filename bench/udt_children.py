"""The child processes of bench/udt.py: netcat over asyncio TCP, over aioquic, and
wavesync on uvloop.

``python bench/udt.py --child ROLE ...`` runs ``child()`` here. A receiver writes the
stream to its stdout (and says it is ready on stderr), a sender reads stdin; see
bench/udt.py's docstring for how the rows are timed and checked.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import ssl
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"
#: Bytes per read or write of a child's stdin, stdout or stream.
CHUNK = 1 << 20
#: The bench's own ALPN for aioquic (any name both ends agree on).
ALPN = "wavesync-bench"


# --- the child processes: netcat over asyncio TCP and over aioquic ----------------------


def write_stdout(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def ready() -> None:
    print("ready", file=sys.stderr, flush=True)


async def tcp_recv(port: int) -> None:
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(CHUNK):
            write_stdout(chunk)
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, LOOPBACK, port)
    ready()
    async with server:
        await done.wait()


async def tcp_send(port: int) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    while chunk := os.read(0, CHUNK):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    await reader.read()  # the receiver closes once it has everything
    writer.close()
    await writer.wait_closed()


async def quic_recv(port: int, cert: str, key: str) -> None:
    from aioquic.asyncio.protocol import QuicConnectionProtocol  # noqa: PLC0415
    from aioquic.asyncio.server import serve  # noqa: PLC0415
    from aioquic.quic.configuration import QuicConfiguration  # noqa: PLC0415
    from aioquic.quic.events import QuicEvent, StreamDataReceived  # noqa: PLC0415

    done = asyncio.Event()

    class Sink(QuicConnectionProtocol):
        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived):
                write_stdout(event.data)
                if event.end_stream:
                    self.close()  # tells the sender everything arrived
                    done.set()

    configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    configuration.load_cert_chain(cert, key)
    server = await serve(LOOPBACK, port, configuration=configuration, create_protocol=Sink)
    ready()
    await done.wait()
    server.close()


async def quic_send(port: int) -> None:
    from aioquic.asyncio.client import connect  # noqa: PLC0415
    from aioquic.quic.configuration import QuicConfiguration  # noqa: PLC0415

    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE
    )
    async with connect(LOOPBACK, port, configuration=configuration) as client:
        _, writer = await client.create_stream()
        while chunk := os.read(0, CHUNK):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        await client.wait_closed()


def uvloop_wavesync(argv: list[str]) -> int:
    """``wavesync`` with uvloop's event loop policy: ``asyncio.run`` makes a uvloop loop."""
    import uvloop  # noqa: PLC0415 - optional: the test group installs it

    from wavesync_adapters.cli import main as wavesync_main  # noqa: PLC0415

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return wavesync_main(argv)


def uvloop_missing() -> str | None:
    """Why the uvloop rows cannot run, or None."""
    try:
        import uvloop  # noqa: F401, PLC0415 - only asking
    except ImportError:
        return "not available: uvloop is not installed (the `test` group has it)"
    return None


def child(args: list[str]) -> int:
    if args[:1] == ["wavesync-uvloop"]:
        return uvloop_wavesync(args[args.index("--") + 1 :])
    parser = argparse.ArgumentParser(prog="udt.py --child")
    parser.add_argument("role", choices=["tcp-recv", "tcp-send", "quic-recv", "quic-send"])
    parser.add_argument("port", type=int)
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    options = parser.parse_args(args)
    if options.role == "tcp-recv":
        asyncio.run(tcp_recv(options.port))
    elif options.role == "tcp-send":
        asyncio.run(tcp_send(options.port))
    elif options.role == "quic-recv":
        asyncio.run(quic_recv(options.port, options.cert, options.key))
    else:
        asyncio.run(quic_send(options.port))
    return 0


def self_signed(workdir: Path) -> tuple[Path, Path]:
    """A throwaway P-256 certificate for "localhost", for the aioquic receiver."""
    # Imported here, as aioquic below: the bench group has both, the smoke test may not.
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
