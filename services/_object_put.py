"""Storing an Object Store object: :func:`put_object`.

It publishes the chunks with a bounded window of outstanding acks instead of waiting for each
ack in turn as nats-py's ``put`` does (about 2.5x faster at 100 MiB), reading and hashing the
source in a worker thread, then publishes the meta message with ``Nats-Rollup: sub`` and purges
the chunks of the version it replaced. A failed put purges the chunks it stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from ._object_info import _read_meta
from ._object_protocol import (
    _BLOCK_BYTES,
    _CLEANUP_TIMEOUT_S,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WINDOW_BYTES,
    ObjectCorrupt,
    ObjectNotFound,
    StoredObject,
    _check_bucket,
    _check_name,
    _connection,
    _deadline,
    _nuid,
    _open,
    _subscribe_queue,
    _where,
    chunk_subject,
    encode_digest,
    meta_subject,
    stream_name,
)

if TYPE_CHECKING:
    from hashlib import _Hash

log = structlog.get_logger("toolbus.objects")

_ROLLUP_HEADER = "Nats-Rollup"
_ROLLUP_SUBJECT = "sub"


def _read_block(source: IO[bytes], hasher: _Hash, size: int) -> bytes:
    """Up to ``size`` bytes (fewer only at the end), hashed; runs in a worker thread."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = source.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    block = parts[0] if len(parts) == 1 else b"".join(parts)
    hasher.update(block)
    return block


class _Publisher:
    """Publishes chunks to JetStream with at most ``window_bytes`` unacknowledged."""

    def __init__(self, nc: Client, stream: str, window_bytes: int, where: str) -> None:
        self._nc = nc
        self._stream = stream
        self._window = window_bytes
        self._where = where
        self._inbox = nc.new_inbox()
        self._unacked: collections.deque[int] = collections.deque()
        self._unacked_bytes = 0
        self._sub: Subscription | None = None
        self._acks: asyncio.Queue[Msg] = asyncio.Queue()

    async def __aenter__(self) -> _Publisher:
        self._sub, self._acks = await _subscribe_queue(self._nc, self._inbox)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def publish(self, subject: str, payload: bytes) -> None:
        while self._unacked and self._unacked_bytes + len(payload) > self._window:
            await self._take_ack()
        await self._nc.publish(subject, payload, reply=self._inbox)
        self._unacked.append(len(payload))
        self._unacked_bytes += len(payload)

    async def wait_acks(self) -> None:
        while self._unacked:
            await self._take_ack()

    async def settle(self) -> None:
        """After a failure: wait a little for the acks still due, whatever they say."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                while self._unacked:
                    await self._acks.get()
                    self._unacked_bytes -= self._unacked.popleft()

    async def _take_ack(self) -> None:
        msg = await self._acks.get()
        self._unacked_bytes -= self._unacked.popleft()
        headers = msg.headers or {}
        if headers.get("Status") == "503":
            raise ObjectNotFound(f"{self._where}: no Object Store bucket takes its chunks")
        try:
            ack = json.loads(msg.data)
        except ValueError:
            raise APIError(description=f"unreadable publish ack {msg.data[:200]!r}") from None
        if "error" in ack:
            raise APIError.from_error(ack["error"])
        if ack.get("stream") != self._stream:
            raise APIError(description=f"chunk stored in stream {ack.get('stream')!r}")


async def put_object(
    js: JetStreamContext,
    bucket: str,
    name: str,
    source: Path | IO[bytes],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    description: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
) -> StoredObject:
    """Store a file, or a stream from its current position to its end, as object ``name``
    (replacing any object of that name) in an existing bucket; returns what was stored.

    Raises :class:`ObjectNotFound` when the bucket does not exist, :class:`ObjectTimeout`, and
    nats-py's ``APIError`` when JetStream refuses a chunk (e.g. the bucket is full); the chunks
    of a failed put are purged.
    """
    _check_bucket(bucket)
    _check_name(name)
    if chunk_size <= 0 or window_bytes <= 0:
        raise ValueError("chunk_size and window_bytes must be positive")
    where = _where(bucket, name)
    async with _deadline(timeout_s, lambda: f"storing {where}"):
        if isinstance(source, Path):
            with _open(source, "rb") as file:
                return await _put(js, bucket, name, file, chunk_size, description, window_bytes)
        return await _put(js, bucket, name, source, chunk_size, description, window_bytes)


async def _put(
    js: JetStreamContext,
    bucket: str,
    name: str,
    source: IO[bytes],
    chunk_size: int,
    description: str | None,
    window_bytes: int,
) -> StoredObject:
    nc = _connection(js)
    where = _where(bucket, name)
    stream = stream_name(bucket)
    chunk_size = min(chunk_size, nc.max_payload)
    block_size = max(_BLOCK_BYTES // chunk_size, 1) * chunk_size
    try:
        previous = await _read_meta(js, bucket, name)  # this also checks that the bucket exists
    except ObjectCorrupt:
        previous = None  # unreadable info: replaced below all the same
    nuid = _nuid.next().decode()
    subject = chunk_subject(bucket, nuid)
    hasher = hashlib.sha256()
    size = chunks = 0
    loop = asyncio.get_running_loop()
    reading: asyncio.Future[bytes] | None = None

    def read_next() -> asyncio.Future[bytes]:
        return loop.run_in_executor(None, _read_block, source, hasher, block_size)

    try:
        async with _Publisher(nc, stream, window_bytes, where) as publisher:
            try:
                upcoming = reading = read_next()
                while True:
                    block = await asyncio.shield(upcoming)  # see the clean-up below
                    reading = None
                    if len(block) == block_size:
                        # Read the next block while this one goes out.
                        upcoming = reading = read_next()
                    view = memoryview(block)
                    for start in range(0, len(block), chunk_size):
                        await publisher.publish(subject, bytes(view[start : start + chunk_size]))
                        chunks += 1
                    size += len(block)
                    if len(block) < block_size:
                        break
                await publisher.wait_acks()
            except BaseException:
                await publisher.settle()  # so that the purge below finds every stored chunk
                raise
        digest = hasher.digest()
        meta: dict[str, Any] = {
            "name": name,
            "description": description or "",
            "options": {"max_chunk_size": chunk_size},
            "bucket": bucket,
            "nuid": nuid,
            "size": size,
            "chunks": chunks,
            "digest": encode_digest(digest),
            "mtime": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        await js.publish(
            meta_subject(bucket, name),
            json.dumps(meta).encode(),
            headers={_ROLLUP_HEADER: _ROLLUP_SUBJECT},
        )
    except BaseException:
        if reading is not None:  # the source is closed after this returns
            with contextlib.suppress(Exception):
                await asyncio.shield(reading)
        await _purge_quietly(js, stream, subject)
        raise
    if previous is not None and not previous.get("deleted") and previous.get("nuid"):
        await _purge_quietly(js, stream, chunk_subject(bucket, str(previous["nuid"])))
    return StoredObject(bucket=bucket, name=name, size=size, sha256=digest.hex(), chunks=chunks)


async def _purge_quietly(js: JetStreamContext, stream: str, subject: str) -> None:
    try:
        await asyncio.wait_for(js.purge_stream(stream, subject=subject), _CLEANUP_TIMEOUT_S)
    except (APIError, NatsTimeoutError, TimeoutError, OSError) as exc:
        log.warning("purging object chunks failed", subject=subject, error=repr(exc))
