"""The ``natlab`` marker: these tests build network namespaces as root and take ~1 minute.

Plain ``pytest`` (``nox -s tests``) skips them with a reason; they run when the marker
expression asks for them (``pytest -m natlab``, which ``nox -s natlab`` does). Without
root, ``ip netns`` or iptables they skip with the reason even then.
"""

from __future__ import annotations

import pytest

from tests.natlab.topology import lab_unavailable


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "natlab: real kernel NAT in network namespaces (root); run by nox -s natlab"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lab_items = [item for item in items if item.get_closest_marker("natlab") is not None]
    if not lab_items:
        return
    if "natlab" not in (config.option.markexpr or ""):
        reason = "the NAT lab runs only when asked: pytest -m natlab (nox -s natlab)"
    else:
        reason = lab_unavailable() or ""
    if reason:
        for item in lab_items:
            item.add_marker(pytest.mark.skip(reason=reason))
