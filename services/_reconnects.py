"""When a NATS connection last (re)connected, for what must not be decided right after one.

After a nats-server restart every registration whose TTL ran out while the server was down
expires at once, before the live workers could beat again; a worker is taken as gone only when
it has not come back within a while of the connection's return (``_registry.py``), and a worker
beats as soon as its connection is back (``worker.py``). The connection is the caller's, made
with whatever callbacks it chose, so its public reconnect count is watched instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
from nats.aio.client import Client

from ._tasks import cancel_and_wait

log = structlog.get_logger("toolbus")

_CHECK_EVERY_S = 0.1


class ReconnectClock:
    """``async with ReconnectClock(nc)``: ``within(s)`` says whether the connection came (back)
    less than ``s`` seconds ago; the start counts as a connect (what was seen before it may be
    as stale as after a reconnect). ``on_reconnect`` callbacks run after each reconnect."""

    def __init__(self, nc: Client, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._nc = nc
        self._clock = clock
        self._connected_at = clock()
        self._callbacks: list[Callable[[], None]] = []
        self._seen = nc.stats["reconnects"]  # the reconnects the callbacks were called for
        self._task: asyncio.Task[None] | None = None

    def within(self, seconds: float) -> bool:
        """Connected less than ``seconds`` ago; not connected counts too."""
        return not self._nc.is_connected or self.since_connect_s() < seconds

    def since_connect_s(self) -> float:
        if self._nc.stats["reconnects"] != self._seen:  # before the watch's next look
            self._connected_at = self._clock()
        return self._clock() - self._connected_at

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    async def __aenter__(self) -> ReconnectClock:
        self._task = asyncio.create_task(self.run(), name="reconnect-clock")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    async def run(self) -> None:
        """Watch the connection for ever (``async with`` runs this in a task of its own)."""
        self._connected_at = self._clock()
        self._seen = self._nc.stats["reconnects"]
        while True:
            await asyncio.sleep(_CHECK_EVERY_S)
            count = self._nc.stats["reconnects"]
            if count != self._seen and self._nc.is_connected:
                self._seen = count
                self._connected_at = self._clock()
                for callback in self._callbacks:
                    try:
                        callback()
                    except Exception:
                        log.exception("a reconnect callback failed")
