"""The KV buckets toolbus opens: one made without what toolbus needs is updated to have it.

Failed before: a workers bucket made without expiry markers (as an older toolbus made it, or a
test that opened it plainly) could not be updated: the marker TTL went to the server in
nanoseconds read as seconds ("subject delete marker TTL must be at least 1 second"), and every
executor and worker failed to start on it.
"""

from __future__ import annotations

import asyncio
import uuid

from nats.aio.client import Client

from schemas.internal import Lease
from schemas.subjects import LEASES_BUCKET
from services._kv import REMOVAL_MARKER_TTL_S, KvBucket, encode_key, open_bucket
from services._leases import REMOVED_LEASE_MARKER_TTL_S, LeaseStore


async def test_a_bucket_made_without_ttls_and_markers_is_updated_to_have_them(nc: Client) -> None:
    js = nc.jetstream()
    bucket = f"plain-{uuid.uuid4().hex[:8]}"
    await open_bucket(js, bucket, description="made plainly")  # no marker TTL
    await open_bucket(js, bucket, description="made plainly", marker_ttl_s=60)
    config = (await js.stream_info(f"KV_{bucket}")).config
    assert config.allow_msg_ttl is True
    assert config.subject_delete_marker_ttl == 60
    await js.delete_key_value(bucket)


async def test_a_removed_keys_marker_is_gone_after_the_buckets_marker_ttl(nc: Client) -> None:
    """A removal leaves a marker that expires by itself, after the TTL its bucket chose: the
    leases bucket, whose every key is removed at a trajectory's release and which nobody
    watches, keeps them for less time than the watched workers bucket."""
    js = nc.jetstream()
    bucket = f"test-markers-{uuid.uuid4().hex[:8]}"
    await open_bucket(js, bucket, description="markers")
    kv = KvBucket(js, bucket, removal_marker_ttl_s=1)
    revision = await kv.create("k", b"value")
    await kv.remove("k", expect=revision)
    marker = await kv.get("k")
    assert marker is not None and marker.value is None  # removed, and said so for now
    async with asyncio.timeout(10):
        while await kv.get("k") is not None:  # noqa: ASYNC110 - the server expires it
            await asyncio.sleep(0.2)
    assert (await js.stream_info(f"KV_{bucket}")).state.messages == 0
    assert REMOVED_LEASE_MARKER_TTL_S < REMOVAL_MARKER_TTL_S


async def test_a_released_lease_leaves_a_marker_of_the_leases_ttl(nc: Client) -> None:
    """The lease store is the one that removes keys with the short marker TTL."""
    js = nc.jetstream()
    await open_bucket(js, LEASES_BUCKET, description="toolbus trajectory leases")
    leases = LeaseStore.on(js)
    tid = f"traj-{uuid.uuid4().hex[:12]}"
    lease = Lease(worker_id="w", incarnation="i", slot=0, epoch=1, acquired_at=0.0)
    revision = await leases.create(tid, lease, ttl_s=None)
    assert await leases.remove(tid, expect=revision)
    marker = await js.get_last_msg(f"KV_{LEASES_BUCKET}", f"$KV.{LEASES_BUCKET}.{encode_key(tid)}")
    assert marker.headers is not None
    assert marker.headers["Nats-TTL"] == str(REMOVED_LEASE_MARKER_TTL_S)
