"""wavesync_adapters.programs: the adapter names and what a missing runtime says."""

from __future__ import annotations

import importlib.util

import pytest

from wavesync_adapters.anyio.programs import AnyioPrograms
from wavesync_adapters.programs import ADAPTERS, programs_for
from wavesync_proto.errors import LocalProtocolError


def test_every_adapter_name_gives_its_programs() -> None:
    for adapter in ADAPTERS:
        programs = programs_for(adapter)
        for name in ("run_mediator", "run_relay", "run_server", "run_client"):
            assert callable(getattr(programs, name))
    with pytest.raises(ValueError, match="no such adapter"):
        programs_for("twisted")


def test_trio_without_its_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def no_trio(name: str, package: str | None = None) -> object:
        return None if name == "trio" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", no_trio)

    async def never_run() -> None:
        raise AssertionError("the program must not start")

    with pytest.raises(LocalProtocolError, match=r"wavesync\[trio\]"):
        AnyioPrograms("trio")._run(never_run)
