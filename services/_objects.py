"""Fast transfers to and from a JetStream Object Store (ADR-20), compatible with other clients.

nats-py's ``ObjectStore.get`` is slow for large objects (an open upstream issue): it reads the
chunks through an ordered push consumer and grows the result with ``bytes +=``, which is
quadratic, so it moves about 15-19 MiB/s at 10 MiB and under 6 MiB/s at 100 MiB on our
machines (about 50 MiB/s at 100 MiB with ``writeinto``). Artifacts and workspace archives are
that large, so these modules speak the Object Store protocol themselves. This one is their
public surface (import from here); the work is done in:

- ``_object_protocol``: the errors, the result type, ADR-20's subjects and digests;
- ``_object_info``: reading and checking an object's info (its meta message), following links;
- ``_object_fetch``: :func:`fetch_object`, with ``_object_pull`` pulling the chunks and
  writing them in a worker thread;
- ``_object_put``: :func:`put_object`, publishing the chunks with a window of acks.

The objects are ordinary Object Store objects: nats-py's and nats.js's ``get`` read what
:func:`put_object` stores, and :func:`fetch_object` reads what they store (tests/test_objects.py).
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.object_store import ObjectStore

from ._object_fetch import fetch_object
from ._object_protocol import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WINDOW_BYTES,
    ObjectCorrupt,
    ObjectNotFound,
    ObjectTimeout,
    ObjectTooLarge,
    StoredObject,
    _check_bucket,
    chunk_subject,
    decode_digest,
    encode_digest,
    meta_subject,
    stream_name,
)
from ._object_put import put_object

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WINDOW_BYTES",
    "ObjectCorrupt",
    "ObjectNotFound",
    "ObjectTimeout",
    "ObjectTooLarge",
    "StoredObject",
    "chunk_subject",
    "decode_digest",
    "encode_digest",
    "fetch_object",
    "meta_subject",
    "open_object_store",
    "put_object",
    "stream_name",
]


# -- buckets ----------------------------------------------------------------------------------
async def open_object_store(
    js: JetStreamContext, bucket: str, *, ttl_s: float | None = None, description: str = ""
) -> ObjectStore:
    """Bind to an Object Store bucket, creating it (file storage, objects kept ``ttl_s`` seconds,
    or forever) when missing. An existing bucket is used as it is, whatever its TTL; a bucket
    another process creates at the same moment is fine."""
    _check_bucket(bucket)
    if ttl_s is not None and ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive (or None for no expiry), got {ttl_s}")
    try:
        return await js.object_store(bucket)
    except BucketNotFoundError:
        pass
    config = ObjectStoreConfig(
        bucket=bucket, description=description or None, ttl=ttl_s, storage=StorageType.FILE
    )
    try:
        return await js.create_object_store(bucket, config)
    except BadRequestError:
        # Another process created it first (with another configuration: the same one succeeds).
        return await js.object_store(bucket)
