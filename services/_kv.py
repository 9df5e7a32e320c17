"""Opening the JetStream KV buckets toolbus keeps its shared state in."""

from __future__ import annotations

import base64

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue


async def open_bucket(js: JetStreamContext, bucket: str, *, description: str) -> KeyValue:
    """Bind to a bucket, creating it when missing (concurrent creators are fine)."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, description=description, history=1)
        )
    except BadRequestError:
        # Another process created it first with the same name.
        return await js.key_value(bucket)


def encode_key(raw: str) -> str:
    """A KV-safe key for any string (trajectory ids are chosen by clients)."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=") or "_"


def decode_key(key: str) -> str:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()
