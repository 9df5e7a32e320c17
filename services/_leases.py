"""Trajectory leases in the leases KV bucket: trajectory → (worker, incarnation, slot, epoch).

The worker that holds a slot writes its lease: it creates it (compare-and-set, so a trajectory
has one lease however many executors and workers race), renews its TTL, replaces it with a
tombstone (``lost`` set) when the workspace is lost, and removes it when the slot is released.
An executor removes a lease only on the word of the worker (it rejected a call on it, or said
on release that it does not hold it), when its worker incarnation is gone from the workers
bucket, or to take a tombstone it will report. An executor's cache of leases is only a
shortcut: whenever a worker does not have what a cached lease says, the stored lease decides.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import structlog
from nats.js import JetStreamContext
from pydantic import ValidationError

from schemas.internal import Lease, LostReason
from schemas.subjects import LEASES_BUCKET

from ._kv import KvBucket, RevisionMismatch, encode_key

log = structlog.get_logger("toolbus.leases")

DEFAULT_CACHE_ENTRIES = 100_000
DEFAULT_CACHE_IDLE_S = 60.0
# Nobody watches the leases bucket, and every trajectory's release removes a key: a marker that
# stayed the workers bucket's 5 minutes held the nats-server's memory up by that much churn (the
# soak: +17% RSS at 80 releases a second); half a minute is plenty for a read racing a removal.
REMOVED_LEASE_MARKER_TTL_S = 30
TOMBSTONE_TTL_S = 24 * 3600  # a lost workspace is announced to a trajectory that comes back


class LeaseExists(Exception):
    """The trajectory already has a lease (maybe a tombstone)."""


class LeaseStore:
    def __init__(self, bucket: KvBucket) -> None:
        self._bucket = bucket

    @classmethod
    def on(cls, js: JetStreamContext) -> LeaseStore:
        """The leases of the ``toolbus-leases`` bucket."""
        return cls(KvBucket(js, LEASES_BUCKET, removal_marker_ttl_s=REMOVED_LEASE_MARKER_TTL_S))

    async def get(self, trajectory_id: str) -> tuple[Lease, int] | None:
        """The stored lease (or tombstone) and its revision; None when there is none."""
        entry = await self._bucket.get(encode_key(trajectory_id))
        if entry is None or entry.value is None:
            return None
        try:
            return Lease.model_validate_json(entry.value), entry.revision
        except ValidationError:
            # Written by another release of toolbus: its workspace cannot be found any more.
            log.warning("unreadable lease", trajectory_id=trajectory_id, revision=entry.revision)
            unreadable = Lease(
                worker_id="", incarnation="", slot=-1, epoch=0, acquired_at=0.0,
                lost=LostReason.UNREADABLE,
            )  # fmt: skip
            return unreadable, entry.revision

    async def create(self, trajectory_id: str, lease: Lease, *, ttl_s: float | None) -> int:
        """Store a new lease; LeaseExists when the trajectory has one (or a tombstone)."""
        try:
            return await self._bucket.create(
                encode_key(trajectory_id), lease.model_dump_json().encode(), ttl_s=ttl_s
            )
        except RevisionMismatch:
            raise LeaseExists(trajectory_id) from None

    async def replace(
        self, trajectory_id: str, lease: Lease, *, expect: int, ttl_s: float | None
    ) -> int:
        """Overwrite the lease at revision ``expect`` (RevisionMismatch if it changed)."""
        return await self._bucket.write(
            encode_key(trajectory_id), lease.model_dump_json().encode(), expect=expect, ttl_s=ttl_s
        )

    async def remove(self, trajectory_id: str, *, expect: int) -> bool:
        """Remove the lease at revision ``expect``; False when it changed meanwhile."""
        try:
            await self._bucket.remove(encode_key(trajectory_id), expect=expect)
        except RevisionMismatch:
            return False
        return True


class LeaseCache:
    """An executor's recently used leases, bounded: least recently used out, and any not used
    for ``idle_s``. A trajectory's release goes through one executor, so the others keep its
    entry until it is evicted; the idle bound keeps the cache at the trajectories of the last
    ``idle_s`` under churn (the soak found RSS growing with every trajectory ever served). A
    trajectory idle longer reads its lease from KV again at its next call."""

    def __init__(
        self,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        *,
        idle_s: float = DEFAULT_CACHE_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: collections.OrderedDict[str, tuple[Lease, float]] = collections.OrderedDict()
        self._max_entries = max_entries
        self._idle_s = idle_s
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, trajectory_id: str) -> Lease | None:
        now = self._clock()
        self._evict(now)
        entry = self._entries.get(trajectory_id)
        if entry is None:
            return None
        self._entries[trajectory_id] = (entry[0], now)
        self._entries.move_to_end(trajectory_id)
        return entry[0]

    def put(self, trajectory_id: str, lease: Lease) -> None:
        now = self._clock()
        self._entries[trajectory_id] = (lease, now)
        self._entries.move_to_end(trajectory_id)
        self._evict(now)

    def _evict(self, now: float) -> None:
        """The oldest first (the order is of last use): past the bound, or idle too long."""
        while self._entries:
            _, (_, used_at) = next(iter(self._entries.items()))
            if len(self._entries) <= self._max_entries and now - used_at < self._idle_s:
                return
            self._entries.popitem(last=False)

    def forget(self, trajectory_id: str, lease: Lease | None = None) -> None:
        """Drop the entry (only if it is still ``lease``, when given)."""
        entry = self._entries.get(trajectory_id)
        if lease is None or (entry is not None and entry[0] == lease):
            self._entries.pop(trajectory_id, None)
