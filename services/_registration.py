"""A worker's registration in the workers KV bucket: written with a TTL, refreshed by heartbeats.

The server removes a registration that was not refreshed within its TTL and leaves a marker
that every executor's watch sees, so "this worker is gone" is decided in one place for all of
them, not by each executor's clock. Heartbeats are compare-and-set on the last revision the
worker wrote. When the server expired the registration meanwhile (the worker was stalled or cut
off, or the server was down), the next beat writes it back over the server's marker, with the
same incarnation and its slots kept, unless an executor settled the expiry first (it removed
the marker: the worker is gone, see ``_registry.py``); then the beat fails with
:class:`RegistrationLost`, the worker gives up its slots (their leases are already taken as
lost) and registers again under a new incarnation.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Awaitable, Callable

import structlog
from pydantic import ValidationError

from schemas.internal import WorkerInfo

from ._kv import KvBucket, KvEntry, RevisionMismatch

log = structlog.get_logger("toolbus.worker")

MISSED_HEARTBEATS = 3  # a registration lives this many heartbeats
# And at least this long: a busy event loop must not look dead (and one that misses it is
# still asked over core NATS before it is said gone, see _registry.py).
MIN_REGISTRATION_TTL_S = 4
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
                await self._after_mismatch(payload)

    async def _after_mismatch(self, payload: bytes) -> None:
        """(Under the lock) the stored registration decides, read once: the server's expiry
        marker, which nobody settled yet (written back over); ours, stored with its ack lost
        (adopted, and written over); else it is not ours any more (RegistrationLost)."""
        entry = await self._bucket.get(self._key)
        if entry is not None and entry.expired:
            try:
                self._revision = await self._bucket.write(
                    self._key, payload, expect=entry.revision, ttl_s=self.ttl_s
                )
            except RevisionMismatch:
                raise RegistrationLost(self._key) from None  # an executor settled it first
            log.warning(
                "the registration had expired (the server was unreachable, or the worker "
                "stalled): written back, nothing was lost"
            )
            return
        if not self._adopt(entry):
            raise RegistrationLost(self._key)
        self._revision = await self._bucket.write(
            self._key, payload, expect=self._revision, ttl_s=self.ttl_s
        )

    async def deregister(self) -> None:
        async with self._lock:
            if not self.incarnation:
                return  # never registered (a start that failed first): nothing is ours
            if not self._revision and not self._adopt(await self._bucket.get(self._key)):
                return  # its write never landed (one whose ack was lost is adopted here)
            with contextlib.suppress(RevisionMismatch):  # expired or replaced already
                await self._bucket.remove(self._key, expect=self._revision)

    def _adopt(self, entry: KvEntry | None) -> bool:
        """(Under the lock) whether the stored registration is this incarnation's; if so its
        revision is adopted (a write whose ack was lost counts)."""
        if entry is None or entry.value is None:
            return False
        try:
            stored = WorkerInfo.model_validate_json(entry.value)
        except ValidationError:
            return False
        if stored.incarnation != self.incarnation:
            return False
        self._revision = entry.revision
        return True

    def _encode(self, info: Callable[[], WorkerInfo]) -> bytes:
        return info().model_dump_json().encode()


ANNOUNCE_DELAY_S = 0.05  # a burst of slot changes becomes one registration write


class Heartbeat:
    """Refreshes a registration every ``heartbeat_s`` and soon after a change (coalesced).

    ``rejoin`` is called when the registration is lost: a beat that finds it removed or
    replaced (executors have taken the worker for gone, and it must not go on serving the
    workspaces they said are lost). A beat that fails (the server is unreachable or slow) is
    only logged: the worker cannot serve while cut off, and the beat after it finds out where
    the registration stands (a beat follows each reconnect at once). Nothing else happens in
    the loop: a beat never waits behind slot work.
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

    async def register(self) -> None:
        """A new incarnation (at start, and after a rejoin)."""
        await self._registration.register(self._info)

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
        except Exception as exc:  # a missed beat is logged; the next one finds out
            log.warning("heartbeat failed", error=str(exc) or type(exc).__name__)
