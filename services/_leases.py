"""Trajectory -> worker leases in JetStream KV, with a local cache.

Creating a lease is a compare-and-set (``KeyValue.create``), so when two executors race to give a
new trajectory a slot, exactly one lease wins and both serve the trajectory from it.
"""

from __future__ import annotations

import contextlib

from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.internal import Lease

from ._kv import encode_key


class LeaseTable:
    def __init__(self, bucket: KeyValue) -> None:
        self._bucket = bucket
        self._cache: dict[str, Lease] = {}

    def cached(self, trajectory_id: str) -> Lease | None:
        return self._cache.get(trajectory_id)

    def forget(self, trajectory_id: str) -> None:
        self._cache.pop(trajectory_id, None)

    async def get(self, trajectory_id: str) -> tuple[Lease, int] | None:
        """The stored lease and its revision, bypassing the cache."""
        try:
            entry = await self._bucket.get(encode_key(trajectory_id))
        except KeyNotFoundError:
            self._cache.pop(trajectory_id, None)
            return None
        if not entry.value:
            return None
        lease = Lease.model_validate_json(entry.value)
        self._cache[trajectory_id] = lease
        return lease, entry.revision or 0

    async def create(self, trajectory_id: str, lease: Lease) -> bool:
        """Store the lease unless one exists; True when this call created it."""
        try:
            await self._bucket.create(encode_key(trajectory_id), lease.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        self._cache[trajectory_id] = lease
        return True

    async def delete(self, trajectory_id: str, *, revision: int | None = None) -> None:
        """Remove the lease; with ``revision``, only if nobody replaced it meanwhile."""
        self._cache.pop(trajectory_id, None)
        # A revision mismatch means another executor already replaced or removed it.
        with contextlib.suppress(APIError, KeyNotFoundError):
            await self._bucket.delete(encode_key(trajectory_id), last=revision)
