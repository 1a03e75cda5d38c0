"""The systems file: which systems exist and their keys (``systems.toml``).

This module owns the file's format — parsing its text and writing one entry.
It does not read or write files (the adapters do) and does not generate keys
(that needs the operating system's randomness; ``wavesync keygen`` does it).

    [[system]]
    id = "04f5a9ea-3cb8-44b0-bb62-401b420701de"   # RFC 4122 UUID
    key = "kq3...:"                                 # the shared secret, ASCII
    name = "Main office"                            # optional
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Mapping

from ..errors import LocalProtocolError

__all__ = ["MIN_KEY_LENGTH", "format_system_entry", "parse_systems"]

# A key shorter than this is guessable offline from one captured signed listen.
MIN_KEY_LENGTH = 16


def parse_systems(text: str) -> Mapping[uuid.UUID, str]:
    """``{system id: key}`` from the file's text; a clear error for anything off."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LocalProtocolError(f"systems file is not valid TOML: {exc}") from None
    entries = document.get("system", [])
    if not isinstance(entries, list):
        raise LocalProtocolError("systems file: 'system' must be an array of tables ([[system]])")
    systems: dict[uuid.UUID, str] = {}
    for index, entry in enumerate(entries, start=1):
        where = f"systems file, system #{index}"
        if not isinstance(entry, dict):
            raise LocalProtocolError(f"{where}: must be a table")
        unknown = set(entry) - {"id", "key", "name"}
        if unknown:
            raise LocalProtocolError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        raw_id, key = entry.get("id"), entry.get("key")
        if not isinstance(raw_id, str):
            raise LocalProtocolError(f"{where}: 'id' must be a UUID string")
        try:
            system_id = uuid.UUID(raw_id)
        except ValueError:
            raise LocalProtocolError(f"{where}: 'id' {raw_id!r} is not a UUID") from None
        if not isinstance(key, str) or not key.isascii() or len(key) < MIN_KEY_LENGTH:
            raise LocalProtocolError(
                f"{where}: 'key' must be an ASCII string of at least {MIN_KEY_LENGTH} characters"
            )
        if system_id in systems:
            raise LocalProtocolError(f"{where}: system {system_id} is listed twice")
        systems[system_id] = key
    return systems


def format_system_entry(system_id: uuid.UUID, key: str, name: str | None = None) -> str:
    """One ``[[system]]`` table, ready to append to a systems file."""
    if not key.isascii() or len(key) < MIN_KEY_LENGTH or '"' in key or "\\" in key:
        raise LocalProtocolError(f"a key is printable ASCII, at least {MIN_KEY_LENGTH} characters")
    lines = ["[[system]]", f'id = "{system_id}"', f'key = "{key}"']
    if name is not None:
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'name = "{escaped}"')
    return "\n".join(lines) + "\n"
