"""The JetStream KV buckets toolbus keeps its shared state in, and compare-and-set writes on them.

Writes go through :class:`KvBucket` rather than nats-py's ``KeyValue`` because toolbus needs
what that API does not give together: a per-message TTL on every kind of write (a worker's
registration expires unless refreshed; a lease expires after its slot would), compare-and-set on
removal, and reads that see the server's own expiry markers (``Nats-Marker-Reason``) as
deletions, so that a key can be created again after the server expired it.

Removals leave a purge marker with a TTL of its own, so that keys of trajectories long gone do
not pile up in the stream.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import APIError, BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

_KV_OPERATION = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"  # nats-server 2.11+: markers the server places itself
_ROLLUP = "Nats-Rollup"
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_TTL = "Nats-TTL"
_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream API error codes
# How long the marker of a removed key stays: long enough for a watch that resumes after a
# reconnect to see the removal (the workers bucket's registrations are watched).
REMOVAL_MARKER_TTL_S = 300


async def open_bucket(
    js: JetStreamContext, bucket: str, *, description: str, marker_ttl_s: int | None = None
) -> KeyValue:
    """Bind to a bucket, creating it when missing (concurrent creators are fine), with per-message
    TTLs allowed and, with ``marker_ttl_s``, a marker for watchers when a key expires. A bucket
    an older toolbus made without them is updated to have them."""
    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        config = KeyValueConfig(
            bucket=bucket, description=description, history=1, limit_marker_ttl=marker_ttl_s
        )
        try:
            kv = await js.create_key_value(config)
        except BadRequestError:
            kv = await js.key_value(bucket)  # another process created it first
    stream = f"KV_{bucket}"
    current = (await js.stream_info(stream)).config
    # Changed on the config as read (in seconds), not on its wire form (in nanoseconds).
    wanted = current
    if not wanted.allow_msg_ttl:
        wanted = dataclasses.replace(wanted, allow_msg_ttl=True)
    if marker_ttl_s and not wanted.subject_delete_marker_ttl:
        wanted = dataclasses.replace(wanted, subject_delete_marker_ttl=float(marker_ttl_s))
    if wanted is not current:
        await js.update_stream(wanted)
    return kv


def encode_key(raw: str) -> str:
    """A KV-safe key for any string (trajectory ids are chosen by clients)."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=") or "_"


def decode_key(key: str) -> str:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()


def ttl_header(ttl_s: float | None) -> dict[str, str]:
    """The per-message TTL header; the server counts whole seconds, at least one."""
    return {} if ttl_s is None else {_TTL: str(max(math.ceil(ttl_s), 1))}


class RevisionMismatch(Exception):
    """A compare-and-set write found another revision than the one it expected."""


@dataclass(frozen=True, slots=True)
class KvEntry:
    value: bytes | None  # None: the key was removed (a marker is its last message)
    revision: int
    expired: bool = False  # its last message is the server's marker: its value's TTL ran out
    stored_at: float | None = None  # Unix time the server stored its last message


class KvBucket:
    """Reads and compare-and-set writes of one KV bucket's keys (keys must be KV-safe)."""

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        *,
        removal_marker_ttl_s: int = REMOVAL_MARKER_TTL_S,
    ) -> None:
        self._js = js
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._removal_marker_ttl_s = removal_marker_ttl_s

    async def get(self, key: str) -> KvEntry | None:
        """The key's last message, or None when it has none."""
        try:
            msg = await self._js.get_last_msg(self._stream, self._prefix + key)
        except NotFoundError:
            return None
        headers = msg.headers or {}
        expired = _MARKER_REASON in headers
        removed = headers.get(_KV_OPERATION) in ("DEL", "PURGE") or expired
        stored_at = msg.time.timestamp() if msg.time is not None else None
        value = None if removed or not msg.data else msg.data
        return KvEntry(value, msg.seq or 0, expired, stored_at)

    async def write(
        self, key: str, value: bytes, *, expect: int | None, ttl_s: float | None = None
    ) -> int:
        """Store ``value``; with ``expect``, only if the key's last revision is that one (0: it
        has none). Returns the new revision; RevisionMismatch otherwise."""
        headers = ttl_header(ttl_s)
        if expect is not None:
            headers[_EXPECTED_LAST] = str(expect)
        try:
            ack = await self._js.publish(self._prefix + key, value, headers=headers or None)
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise RevisionMismatch(key) from None
            raise
        return ack.seq

    async def create(self, key: str, value: bytes, *, ttl_s: float | None = None) -> int:
        """Store ``value`` unless the key holds one; RevisionMismatch when it does."""
        expect = 0
        for _ in range(3):
            try:
                return await self.write(key, value, expect=expect, ttl_s=ttl_s)
            except RevisionMismatch:
                entry = await self.get(key)
                if entry is not None and entry.value is not None:
                    raise
                expect = entry.revision if entry is not None else 0  # removed: create over it
        raise RevisionMismatch(key)

    async def remove(self, key: str, *, expect: int | None) -> None:
        """Remove the key (a purge marker that expires itself); with ``expect``, only if its
        last revision is that one, else RevisionMismatch."""
        headers = {
            _KV_OPERATION: "PURGE",
            _ROLLUP: "sub",
            **ttl_header(self._removal_marker_ttl_s),
        }
        if expect is not None:
            headers[_EXPECTED_LAST] = str(expect)
        try:
            await self._js.publish(self._prefix + key, b"", headers=headers)
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise RevisionMismatch(key) from None
            raise
