"""wavesync_proto does no I/O: no module of it imports a socket, clock, loop or thread library."""

from __future__ import annotations

import ast
from pathlib import Path

import wavesync_proto

FORBIDDEN = {"socket", "asyncio", "anyio", "trio", "threading", "time", "selectors", "select"}
PACKAGE = Path(wavesync_proto.__file__).parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_guard_sees_the_whole_package() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "stun" / "message.py" in modules
    assert len(modules) >= 8


def test_the_guard_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom time import monotonic\nimport asyncio.events\n")
    assert imported_modules(sample) & FORBIDDEN == {"time", "asyncio"}


def test_wavesync_proto_imports_no_io_library() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(imported_modules(path) & FORBIDDEN)
        for path in PACKAGE.rglob("*.py")
        if imported_modules(path) & FORBIDDEN
    }
    assert offenders == {}
