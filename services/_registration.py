"""A worker's registration in the workers KV bucket: written with a TTL, refreshed by heartbeats.

The server removes a registration that was not refreshed within its TTL and leaves a marker
that every executor's watch sees, so "this worker is gone" is decided in one place for all of
them, not by each executor's clock. Heartbeats are compare-and-set on the last revision the
worker wrote: when the server expired the registration meanwhile (the worker was stalled or cut
off), the next beat fails with :class:`RegistrationLost`, the worker gives up its slots (their
leases are already taken as lost) and registers again under a new incarnation.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from pydantic import ValidationError

from schemas.internal import WorkerInfo

from ._kv import KvBucket, RevisionMismatch

log = structlog.get_logger("toolbus.worker")

MISSED_HEARTBEATS = 3  # a registration lives this many heartbeats
MIN_REGISTRATION_TTL_S = 5  # and at least this long: a busy event loop must not look dead
WORKER_MARKER_TTL_S = 60  # how long executors' watches can see that a registration expired


def registration_ttl_s(heartbeat_s: float) -> int:
    """Whole seconds (the server's unit)."""
    return max(math.ceil(heartbeat_s * MISSED_HEARTBEATS), MIN_REGISTRATION_TTL_S)


class RegistrationLost(Exception):
    """The registration expired or was replaced while this worker was not looking."""


class WorkerRegistration:
    def __init__(self, bucket: KvBucket, worker_id: str, *, ttl_s: int) -> None:
        self._bucket = bucket
        self._key = worker_id
        self.ttl_s = ttl_s
        self.incarnation = ""
        self._revision = 0
        self._lock = asyncio.Lock()  # one write at a time: each needs the revision before it

    async def register(self, info: Callable[[], WorkerInfo]) -> None:
        """A new incarnation, written over whatever a previous process left."""
        async with self._lock:
            self.incarnation = uuid.uuid4().hex
            self._revision = await self._bucket.write(
                self._key, self._encode(info), expect=None, ttl_s=self.ttl_s
            )

    async def refresh(self, info: Callable[[], WorkerInfo]) -> None:
        """A heartbeat; RegistrationLost when the stored registration is no longer ours."""
        async with self._lock:
            payload = self._encode(info)
            try:
                self._revision = await self._bucket.write(
                    self._key, payload, expect=self._revision, ttl_s=self.ttl_s
                )
            except RevisionMismatch:
                # An earlier write of ours may have been stored with its ack lost: adopt it.
                if not await self._adopt_own_write():
                    raise RegistrationLost(self._key) from None
                self._revision = await self._bucket.write(
                    self._key, payload, expect=self._revision, ttl_s=self.ttl_s
                )

    async def deregister(self) -> None:
        async with self._lock:
            if not self.incarnation:
                return  # never registered (a start that failed first): nothing is ours
            if not self._revision and await self._adopt_stored() is None:
                return  # its write never landed (one whose ack was lost is adopted here)
            with contextlib.suppress(RevisionMismatch):  # expired or replaced already
                await self._bucket.remove(self._key, expect=self._revision)

    async def stored_age_s(self) -> float | None:
        """How old the stored registration is, if it is this incarnation's (its revision is
        adopted: a write whose ack was lost counts); None when it is gone or not ours."""
        async with self._lock:
            return await self._adopt_stored()

    async def _adopt_own_write(self) -> bool:
        return await self._adopt_stored() is not None

    async def _adopt_stored(self) -> float | None:
        """(Under the lock) :meth:`stored_age_s`."""
        entry = await self._bucket.get(self._key)
        if entry is None or entry.value is None:
            return None
        try:
            stored = WorkerInfo.model_validate_json(entry.value)
        except ValidationError:
            return None
        if stored.incarnation != self.incarnation:
            return None
        self._revision = entry.revision
        # Written after it was encoded: it is at most this old, by the worker's own clock.
        return max(time.time() - stored.updated_at, 0.0)

    def _encode(self, info: Callable[[], WorkerInfo]) -> bytes:
        return info().model_dump_json().encode()


ANNOUNCE_DELAY_S = 0.05  # a burst of slot changes becomes one registration write


class Heartbeat:
    """Refreshes a registration every ``heartbeat_s`` and soon after a change (coalesced).

    ``rejoin`` is called when the registration is lost, or may be: a beat that finds it gone,
    or beats failing for as long as its TTL (executors then take the worker for gone, and it
    must not go on serving the workspaces they have said are lost). Nothing else happens in the
    loop: a beat never waits behind slot work.
    """

    def __init__(
        self,
        registration: WorkerRegistration,
        *,
        heartbeat_s: float,
        info: Callable[[], WorkerInfo],
        rejoin: Callable[[], Awaitable[None]],
        spawn: Callable[[Awaitable[object]], None],
    ) -> None:
        self._registration = registration
        self._heartbeat_s = heartbeat_s
        self._info = info
        self._rejoin = rejoin
        self._spawn = spawn
        self._soon: asyncio.TimerHandle | None = None
        self._last_stored = time.monotonic()

    async def register(self) -> None:
        """A new incarnation (at start, and after a rejoin)."""
        await self._registration.register(self._info)
        self._last_stored = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await self.beat()

    def soon(self) -> None:
        """A beat soon, for a change of free slots; a burst of changes makes one write."""
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(ANNOUNCE_DELAY_S, self._fire)

    def cancel(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None

    def _fire(self) -> None:
        self._soon = None
        self._spawn(self.beat())

    async def beat(self) -> None:
        try:
            await self._registration.refresh(self._info)
        except RegistrationLost:
            await self._rejoin()
            return
        except Exception as exc:  # a missed beat is logged; the next one retries ...
            log.warning("heartbeat failed", error=str(exc) or type(exc).__name__)
            # ... until the registration may have expired. A write whose ack was late or lost
            # may have landed: the stored registration says (a slow server is not a lost one).
            if time.monotonic() - self._last_stored >= self._registration.ttl_s - 1:
                age = await self._stored_age_s()
                if age is not None and age < self._registration.ttl_s - 1:
                    self._last_stored = time.monotonic() - age
                    return
                await self._rejoin()
            return
        self._last_stored = time.monotonic()

    async def _stored_age_s(self) -> float | None:
        try:
            return await self._registration.stored_age_s()
        except Exception as exc:  # unreadable too: it may have expired
            log.warning("the registration could not be read", error=str(exc) or type(exc).__name__)
            return None
