"""One leader among the executors' autoscalers: a lease on one key of a KV bucket.

The leader holds a key of ``toolbus-scaler``, one key per pool of workers: created
(compare-and-set: only when nobody holds it) with a per-message TTL, and written again from the
revision it holds every third of the TTL. Another executor's create fails while the lease lives;
when the leader stops it removes the key (another takes over at its next try), and when it dies
the server expires the key after one TTL.

A leader counts itself one only while its last renewal is less than a TTL old, timed from
before that write was sent: the server's TTL runs from when it stored the write, which is
later, so the old leader has stopped before the key can be created by another. A renewal that
finds another revision (the key expired and someone took it) ends the leadership at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import TracebackType

import structlog

from ._kv import KvBucket, RevisionMismatch
from ._tasks import cancel_and_wait

log = structlog.get_logger("toolbus.autoscaler")

DEFAULT_LEADER_TTL_S = 10.0


class Leadership:
    def __init__(
        self, bucket: KvBucket, *, key: str, holder: str, ttl_s: float = DEFAULT_LEADER_TTL_S
    ) -> None:
        self._bucket = bucket
        self._key = key
        self._holder = holder
        self._ttl_s = ttl_s
        self._revision: int | None = None  # of our lease, while we hold it
        self._renewed_at = -float("inf")  # monotonic, before the write that renewed it
        self._since = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        fresh = time.monotonic() - self._renewed_at < self._ttl_s
        return self._revision is not None and fresh

    async def __aenter__(self) -> Leadership:
        self._task = asyncio.create_task(self._run(), name="leadership")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        await self.resign()

    async def _run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self._ttl_s / 3)

    async def step(self) -> bool:
        """Take the lease if nobody holds it, or renew ours; whether we lead now."""
        started = time.monotonic()
        try:
            if self._revision is None:
                self._since = time.time()
                self._revision = await self._bucket.create(
                    self._key, self._value(), ttl_s=self._ttl_s
                )
                log.info("autoscaler leader now", holder=self._holder)
            else:
                self._revision = await self._bucket.write(
                    self._key, self._value(), expect=self._revision, ttl_s=self._ttl_s
                )
            self._renewed_at = started
        except RevisionMismatch:
            if self._revision is not None:
                log.warning("autoscaler leadership lost to another", holder=self._holder)
            self._revision = None  # someone else holds it
        except Exception as exc:  # KV away: we lead until the last renewal is a TTL old
            log.info("the leader lease could not be written", error=repr(exc))
            if not self.is_leader:
                self._revision = None
        return self.is_leader

    async def resign(self) -> None:
        """Remove our lease, if we hold it, so that another executor leads at once."""
        revision, self._revision = self._revision, None
        if revision is None:
            return
        try:
            await asyncio.wait_for(self._bucket.remove(self._key, expect=revision), 5.0)
            log.info("autoscaler leadership given up", holder=self._holder)
        except Exception as exc:  # it expires on its own
            log.info("the leader lease was not removed", error=repr(exc))

    def _value(self) -> bytes:
        return json.dumps({"holder": self._holder, "since": self._since}).encode()
