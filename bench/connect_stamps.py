"""Time stamps of the steps of a connect, for ``bench/connect.py --breakdown``.

Wrappers installed around the connector's and the agent's steps (nothing in src/ is
changed): when each step starts and how long it takes, relative to the connect it
belongs to; ``summarise_stamps`` gives the median start and duration per step.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from wavesync_adapters.anyio import agent as agent_module
from wavesync_adapters.anyio import connector as connector_module
from wavesync_adapters.anyio import listen as listen_module
from wavesync_adapters.anyio import udt as udt_module

__all__ = ["STAMPS", "Stamps", "install_stamps", "percentile", "summarise_stamps"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Stamps:
    """(step, start, end) in ms since the current connect began; only while one runs."""

    began: float | None = None
    steps: list[tuple[str, float, float]] = field(default_factory=list)
    per_connect: list[list[tuple[str, float, float]]] = field(default_factory=list)

    @contextlib.contextmanager
    def connect(self) -> Iterator[None]:
        self.began, self.steps = time.perf_counter(), []
        try:
            yield
        finally:
            self.per_connect.append(self.steps)
            self.began = None

    def record(self, step: str, start: float) -> None:
        # A step that began before this connect (a rendezvous left from an earlier one) is
        # not this connect's.
        if self.began is not None and start >= self.began:
            end = time.perf_counter()
            self.steps.append((step, (start - self.began) * 1e3, (end - self.began) * 1e3))


STAMPS = Stamps()


def _wrap_async(step: str, function: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(function)
    async def stamped(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await function(*args, **kwargs)
        finally:
            STAMPS.record(step, start)

    return stamped


def _wrap_sync(step: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def stamped(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            STAMPS.record(step, start)

    return stamped


def install_stamps() -> None:
    """Wrap the steps of a connect, client side (c:) and server side (s:)."""
    patches: list[tuple[Any, str, str, bool]] = [
        (connector_module, "request_connection", "c: mediator round trip", True),
        (connector_module, "search_lan", "c: lan search", True),
        (connector_module, "open_relay_stream", "c: relay pairing (connect + 101)", True),
        (connector_module, "verify_server", "c: tunnel_syn (verify_server)", True),
        (connector_module.Connector, "_open_hole", "c: bind punching socket + holder task", True),
        (agent_module, "answer_client", "s: tunnel_syn (answer_client)", True),
        (listen_module.MediatorListener, "acknowledge", "s: connection_ack round trip", True),
    ]
    for owner, name, step, is_async in patches:
        original = getattr(owner, name)
        setattr(owner, name, (_wrap_async if is_async else _wrap_sync)(step, original))
    # UdtEndpoint's steps run on both sides: tell them apart by the calling function.
    endpoint = udt_module.UdtEndpoint
    rendezvous, connect = endpoint.rendezvous, endpoint.connect

    async def stamped_rendezvous(self: Any, candidates: Any) -> Any:
        side = "s" if sys._getframe(1).f_code.co_name == "_rendezvous" else "c"
        return await _wrap_async(f"{side}: udt rendezvous", rendezvous)(self, candidates)

    async def stamped_connect(self: Any, peer: Any) -> Any:
        return await _wrap_async("c: udt connect through the hole", connect)(self, peer)

    endpoint.rendezvous = stamped_rendezvous  # type: ignore[method-assign]
    endpoint.connect = stamped_connect  # type: ignore[method-assign]
    original_connect_tcp = anyio.connect_tcp
    # The connector module calls ``anyio.connect_tcp``: give it an ``anyio`` of its own.
    vars(connector_module)["anyio"] = _AnyioWithStampedDial(original_connect_tcp)


class _AnyioWithStampedDial:
    """``anyio`` as the connector module sees it, with ``connect_tcp`` stamped."""

    def __init__(self, connect_tcp: Callable[..., Awaitable[Any]]) -> None:
        self.connect_tcp = _wrap_async("c: tcp connect", connect_tcp)

    def __getattr__(self, name: str) -> Any:
        return getattr(anyio, name)


def summarise_stamps(per_connect: list[list[tuple[str, float, float]]]) -> list[str]:
    """Per step: how many connects had it, median start and median duration (ms)."""
    starts: dict[str, list[float]] = defaultdict(list)
    spans: dict[str, list[float]] = defaultdict(list)
    for steps in per_connect:
        for step, start, end in steps:
            starts[step].append(start)
            spans[step].append(end - start)
    order = sorted(starts, key=lambda step: statistics.median(starts[step]))
    return [
        f"  {step:48} {len(starts[step]):>5} {statistics.median(starts[step]):>8.2f}"
        f" {statistics.median(spans[step]):>8.2f} {percentile(spans[step], 0.95):>8.2f}"
        for step in order
    ]
