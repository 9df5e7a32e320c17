"""A worker gives its slots up only when its registration may really have expired.

Before this (shared/issue 10, item 1: 2,000 live trajectories), one heartbeat write whose ack
came later than the registration's TTL minus a second made the worker give up every slot and
register anew, although the write had landed and the registration was alive: under a burst of
sandbox starts every trajectory then heard "workspace lost".
"""

from __future__ import annotations

import time

from nats.aio.client import Client

from schemas.internal import WorkerInfo
from schemas.subjects import WORKERS_BUCKET
from services._kv import KvBucket, open_bucket
from services._registration import Heartbeat, WorkerRegistration


class _AckLostBucket(KvBucket):
    """The real bucket; a write is stored, and then its ack is lost (a timeout) when asked."""

    lose_acks = False

    async def write(
        self, key: str, value: bytes, *, expect: int | None, ttl_s: float | None = None
    ) -> int:
        revision = await super().write(key, value, expect=expect, ttl_s=ttl_s)
        if self.lose_acks:
            raise TimeoutError("nats: timeout")
        return revision


async def test_a_beat_whose_ack_is_lost_keeps_a_registration_that_is_alive(nc: Client) -> None:
    js = nc.jetstream()
    await open_bucket(js, WORKERS_BUCKET, description="toolbus sandbox workers")
    bucket = _AckLostBucket(js, WORKERS_BUCKET)
    registration = WorkerRegistration(bucket, f"hb-{time.monotonic_ns()}", ttl_s=5)
    rejoined: list[bool] = []

    async def rejoin() -> None:
        rejoined.append(True)

    def info() -> WorkerInfo:
        now = time.time()
        return WorkerInfo(
            worker_id="hb",
            host="h",
            pid=1,
            slots_total=1,
            slots_free=1,
            started_at=now,
            updated_at=now,
            heartbeat_s=1,
            incarnation=registration.incarnation,
            ttl_s=5,
        )

    heartbeat = Heartbeat(
        registration, heartbeat_s=1, info=info, rejoin=rejoin, spawn=lambda _: None
    )
    await heartbeat.register()
    bucket.lose_acks = True
    await heartbeat.beat()  # stored, its ack lost
    assert rejoined == []  # the stored registration is ours and fresh: nothing to give up
    bucket.lose_acks = False
    await heartbeat.beat()  # and the next beat writes over the adopted revision
    assert rejoined == []
    await registration.deregister()
