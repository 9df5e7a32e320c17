"""The KV buckets toolbus opens: one made without what toolbus needs is updated to have it.

Failed before: a workers bucket made without expiry markers (as an older toolbus made it, or a
test that opened it plainly) could not be updated: the marker TTL went to the server in
nanoseconds read as seconds ("subject delete marker TTL must be at least 1 second"), and every
executor and worker failed to start on it.
"""

from __future__ import annotations

import uuid

from nats.aio.client import Client

from services._kv import open_bucket


async def test_a_bucket_made_without_ttls_and_markers_is_updated_to_have_them(nc: Client) -> None:
    js = nc.jetstream()
    bucket = f"plain-{uuid.uuid4().hex[:8]}"
    await open_bucket(js, bucket, description="made plainly")  # no marker TTL
    await open_bucket(js, bucket, description="made plainly", marker_ttl_s=60)
    config = (await js.stream_info(f"KV_{bucket}")).config
    assert config.allow_msg_ttl is True
    assert config.subject_delete_marker_ttl == 60
    await js.delete_key_value(bucket)
