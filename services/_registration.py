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
import uuid
from collections.abc import Callable

from pydantic import ValidationError

from schemas.internal import WorkerInfo

from ._kv import KvBucket, RevisionMismatch

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
            with contextlib.suppress(RevisionMismatch):  # expired or replaced already
                await self._bucket.remove(self._key, expect=self._revision)

    async def _adopt_own_write(self) -> bool:
        entry = await self._bucket.get(self._key)
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
