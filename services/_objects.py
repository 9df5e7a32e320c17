"""Fast transfers to and from a JetStream Object Store (ADR-20), compatible with other clients.

nats-py's ``ObjectStore.get`` is slow for large objects (an open upstream issue): it reads the
chunks through an ordered push consumer and grows the result with ``bytes +=``, which is
quadratic, so it moves about 15-19 MiB/s at 10 MiB and under 6 MiB/s at 100 MiB on our
machines (about 50 MiB/s at 100 MiB with ``writeinto``). Artifacts and workspace archives are
that large, so this module speaks the Object Store protocol itself:

- :func:`fetch_object` reads the object's info (its meta message), then pulls the chunks from
  ``$O.<bucket>.C.<nuid>`` with an ephemeral pull consumer (no acks, in-memory state) and
  pipelined pull requests that keep a bounded window of bytes in flight, hashing and writing
  the chunks in a worker thread while the next ones arrive (about 450 MiB/s to a file at
  100 MiB, benchmarks/bench_artifacts.py). It checks the chunk count, the size and the SHA-256
  (against the info's digest, and the caller's when given); a ``Path`` destination is written
  to a temporary file next to it and renamed at the end, so a failed fetch leaves no partial
  file. A fetch whose consumer disappears resumes after the last chunk it received.
- :func:`put_object` publishes the chunks with a bounded window of outstanding acks instead of
  waiting for each ack in turn as nats-py's ``put`` does (about 2.5x faster at 100 MiB), reading
  and hashing the source in a worker thread, then publishes the meta message with
  ``Nats-Rollup: sub`` and purges the chunks of the version it replaced.

The objects are ordinary Object Store objects: nats-py's and nats.js's ``get`` read what
:func:`put_object` stores, and :func:`fetch_object` reads what they store (tests/test_objects.py).
Object names in subjects and digests are base64url *with* padding, as nats.go, nats.js and
nats-py write them; digests are read with or without padding. Keep object names ASCII when
nats.js must read them: it base64-encodes names as Latin-1 (``btoa``), the others as UTF-8.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    ObjectStoreConfig,
    StorageType,
)
from nats.js.errors import APIError, BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore
from nats.nuid import NUID

from .exceptions import ToolbusError

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_TIMEOUT_S",
    "ObjectCorrupt",
    "ObjectNotFound",
    "ObjectTimeout",
    "ObjectTooLarge",
    "StoredObject",
    "fetch_object",
    "open_object_store",
    "put_object",
]

log = structlog.get_logger("toolbus.objects")

DEFAULT_CHUNK_SIZE = 128 * 1024  # ADR-20's default; every client reads any chunk size
DEFAULT_TIMEOUT_S = 300.0  # for a whole transfer
DEFAULT_WINDOW_BYTES = 16 * 1024 * 1024  # chunk bytes in flight (pulled, or published unacked)
_BLOCK_BYTES = 4 * 1024 * 1024  # source reads / destination writes per worker-thread call
_PULL_EXPIRES_S = 2.0  # a pull request ends after this; a stall is looked into then
# A live consumer answers every pull request by its expiry (chunks, or a status saying it
# ended); one that is being deleted may drop requests without a word. Silence this long is
# looked into, so that such a fetch resumes instead of waiting for its whole timeout.
_PULL_SILENCE_S = _PULL_EXPIRES_S + 1.0
_CONSUMER_INACTIVE_S = 30.0  # the server removes a consumer we could not delete after this
_CLEANUP_TIMEOUT_S = 5.0
_MAX_RESUMES = 5

_BUCKET_RE = re.compile(r"[A-Za-z0-9_-]+")
_SHA256_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
_DIGEST_PREFIX = "SHA-256="
_ROLLUP_HEADER = "Nats-Rollup"
_ROLLUP_SUBJECT = "sub"
_ERR_STREAM_NOT_FOUND = 10059  # JetStream API error code

_nuid = NUID()


class ObjectNotFound(ToolbusError):
    """The object (or its bucket) does not exist, was deleted, or went away while fetched."""


class ObjectCorrupt(ToolbusError):
    """The object's chunks do not match its info (size, chunk count or digest), or the caller's
    expected SHA-256; or its info cannot be read."""


class ObjectTimeout(ToolbusError, TimeoutError):
    """A transfer did not finish within its ``timeout_s``."""


class ObjectTooLarge(ToolbusError):
    """The object is larger than the fetch's ``max_bytes`` (by its info, or by the bytes that
    arrived: an info may understate them). Not a subclass of :class:`ObjectCorrupt`: the object
    may be fine, only too large for this caller."""

    def __init__(self, message: str, *, size: int, max_bytes: int) -> None:
        super().__init__(message)
        self.size = size  # the info's size, or the bytes received when they went past
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    name: str
    size: int
    sha256: str  # lowercase hex
    chunks: int


# -- names, digests ---------------------------------------------------------------------------
def stream_name(bucket: str) -> str:
    return f"OBJ_{bucket}"


def meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def chunk_subject(bucket: str, nuid: str) -> str:
    return f"$O.{bucket}.C.{nuid}"


def encode_digest(sha256: bytes) -> str:
    """ADR-20's digest field: ``SHA-256=`` and the base64url of the hash, padded."""
    return _DIGEST_PREFIX + base64.urlsafe_b64encode(sha256).decode()


def decode_digest(digest: str) -> bytes | None:
    """The 32 hash bytes of a ``SHA-256=<base64url>`` digest (padded or not; the standard
    base64 alphabet is accepted too), or None when it is not one."""
    if digest[: len(_DIGEST_PREFIX)].upper() != _DIGEST_PREFIX:
        return None
    value = digest[len(_DIGEST_PREFIX) :].rstrip("=").replace("+", "-").replace("/", "_")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == hashlib.sha256().digest_size else None


def _check_bucket(bucket: str) -> None:
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(f"invalid Object Store bucket name {bucket!r}: use A-Z, a-z, 0-9, - and _")


def _check_name(name: str) -> None:
    if not name:
        raise ValueError("an object name cannot be empty")


def _where(bucket: str, name: str) -> str:
    return f"object {name!r} in bucket {bucket!r}"


def _connection(js: JetStreamContext) -> Client:
    # nats-py keeps the connection private; its own ObjectStore uses it the same way.
    return js._nc


def _api_prefix(js: JetStreamContext) -> str:
    prefix: str = js._prefix
    return prefix


@contextlib.asynccontextmanager
async def _deadline(timeout_s: float, what: Callable[[], str]) -> AsyncIterator[None]:
    """``asyncio.timeout`` raising :class:`ObjectTimeout` with ``what()`` in its message."""
    scope = asyncio.timeout(timeout_s)
    try:
        async with scope:
            yield
    except TimeoutError:
        if scope.expired():
            raise ObjectTimeout(f"{what()} did not finish within {timeout_s:g} s") from None
        raise


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


# -- object info ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Info:
    nuid: str
    size: int
    chunks: int
    digest: bytes
    chunk_size: int  # the largest chunk the writer says it used (a hint)
    link: tuple[str, str] | None  # (bucket, name) of a linked object


async def _read_meta(js: JetStreamContext, bucket: str, name: str) -> dict[str, Any] | None:
    """The object's info as stored, or None when no meta message exists for the name."""
    try:
        msg = await js.get_last_msg(stream_name(bucket), meta_subject(bucket, name))
    except NotFoundError as exc:
        if exc.err_code == _ERR_STREAM_NOT_FOUND:
            raise ObjectNotFound(f"no Object Store bucket {bucket!r}") from None
        return None
    try:
        meta = json.loads(msg.data or b"")
    except ValueError as exc:
        raise ObjectCorrupt(f"{_where(bucket, name)}: its info is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ObjectCorrupt(f"{_where(bucket, name)}: its info is not a JSON object")
    return meta


def _parse_info(bucket: str, name: str, meta: dict[str, Any]) -> _Info:
    where = _where(bucket, name)
    options = meta.get("options") or {}
    link = options.get("link") if isinstance(options, dict) else None
    if isinstance(link, dict) and link.get("bucket"):
        if not link.get("name"):
            raise ObjectNotFound(f"{where} is a link to bucket {link['bucket']!r}, not an object")
        return _Info("", 0, 0, b"", 0, (str(link["bucket"]), str(link["name"])))
    nuid, size, chunks = meta.get("nuid"), meta.get("size") or 0, meta.get("chunks") or 0
    if not isinstance(nuid, str) or not _BUCKET_RE.fullmatch(nuid):
        raise ObjectCorrupt(f"{where}: its info has no valid nuid ({nuid!r})")
    if not isinstance(size, int) or not isinstance(chunks, int) or size < 0 or chunks < 0:
        raise ObjectCorrupt(f"{where}: its info has an invalid size or chunk count")
    if (size == 0) != (chunks == 0):
        raise ObjectCorrupt(f"{where}: its info says {size} bytes in {chunks} chunks")
    digest_text = meta.get("digest")
    digest = decode_digest(digest_text) if isinstance(digest_text, str) else None
    if digest is None:
        raise ObjectCorrupt(f"{where}: its info has no valid SHA-256 digest ({digest_text!r})")
    hint = options.get("max_chunk_size") if isinstance(options, dict) else None
    chunk_size = hint if isinstance(hint, int) and hint > 0 else -(-size // max(chunks, 1))
    return _Info(nuid, size, chunks, digest, chunk_size, None)


async def _object_info(js: JetStreamContext, bucket: str, name: str) -> tuple[str, str, _Info]:
    """The (bucket, name, info) of the object, following links to single objects."""
    origin = (bucket, name)
    for _ in range(8):
        meta = await _read_meta(js, bucket, name)
        if meta is None or meta.get("deleted"):
            if (bucket, name) == origin:
                raise ObjectNotFound(f"no {_where(bucket, name)}")
            raise ObjectNotFound(f"{_where(*origin)} links to the missing {_where(bucket, name)}")
        info = _parse_info(bucket, name, meta)
        if info.link is None:
            return bucket, name, info
        bucket, name = info.link
        _check_bucket(bucket)
    raise ObjectNotFound(f"{_where(*origin)}: too many links in a row")


async def _next_message(messages: asyncio.Queue[Msg], silence_s: float) -> Msg | None:
    """The next message, or None when none arrives within ``silence_s``."""
    with contextlib.suppress(asyncio.QueueEmpty):
        return messages.get_nowait()  # the usual case in a transfer: no timer needed
    scope = asyncio.timeout(silence_s)
    try:
        async with scope:
            return await messages.get()
    except TimeoutError:
        if scope.expired():
            return None
        raise


async def _subscribe_queue(nc: Client, subject: str) -> tuple[Subscription, asyncio.Queue[Msg]]:
    """A subscription that hands its messages to a queue. Cheaper per message than nats-py's
    ``next_msg`` (a task and a uuid4 per call); the callers bound what is in flight."""
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await nc.subscribe(subject, cb=queue.put)
    return sub, queue


# -- fetch ------------------------------------------------------------------------------------
class _Writer:
    """Hashes and writes chunks in a worker thread, one block at a time, in order, while the
    event loop receives the next ones."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._busy: asyncio.Future[None] | None = None

    def _write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._hash.update(chunk)
            self._file.write(chunk)

    async def add(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= _BLOCK_BYTES:
            await self._submit()

    async def _submit(self) -> None:
        if self._busy is not None:
            # Shielded: a cancellation must not orphan the write (abandon() waits for it).
            await asyncio.shield(self._busy)
            self._busy = None
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        if chunks:
            self._busy = asyncio.get_running_loop().run_in_executor(None, self._write, chunks)

    async def finish(self) -> bytes:
        """Write what is left; the SHA-256 of everything written."""
        await self._submit()
        await self._submit()
        return self._hash.digest()

    async def abandon(self) -> None:
        """Wait for the write in progress (the file is closed after it)."""
        if self._busy is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._busy)


class _Lost(Exception):
    """The pull consumer went away or messages were dropped: resume after the last chunk."""


class _ChunkPuller:
    """Pulls one object version's chunks with an ephemeral pull consumer (AckPolicy none)."""

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        name: str,
        info: _Info,
        writer: _Writer,
        window_bytes: int,
        max_bytes: int | None,
    ) -> None:
        self._js = js
        self._nc = _connection(js)
        self._bucket = bucket
        self._name = name
        self._info = info
        self._writer = writer
        self._max_bytes = max_bytes
        self._stream = stream_name(bucket)
        self._subject = chunk_subject(bucket, info.nuid)
        self._batch = max(1, min(window_bytes // 2 // max(info.chunk_size, 1), info.chunks))
        self.received = 0
        self.size = 0
        self._last_stream_seq = 0
        self._base = 0  # chunks received before the current consumer was created

    async def run(self) -> None:
        resumes = 0
        while True:
            try:
                await self._pull_once()
                return
            except _Lost as lost:
                resumes += 1
                if resumes > _MAX_RESUMES:
                    raise ObjectCorrupt(
                        f"{_where(self._bucket, self._name)}: the transfer broke off "
                        f"{resumes} times ({lost}); {self.received} of {self._info.chunks} "
                        "chunks received"
                    ) from None
                log.warning(
                    "object fetch resumes",
                    bucket=self._bucket,
                    name=self._name,
                    reason=str(lost),
                    received=self.received,
                )

    async def _pull_once(self) -> None:
        consumer = f"toolbus-fetch-{_nuid.next().decode()}"
        inbox = self._nc.new_inbox()
        sub, messages = await _subscribe_queue(self._nc, inbox)
        self._base = self.received
        created = False
        try:
            config = ConsumerConfig(
                name=consumer,
                ack_policy=AckPolicy.NONE,
                filter_subject=self._subject,
                inactive_threshold=_CONSUMER_INACTIVE_S,
                mem_storage=True,
                num_replicas=1,
            )
            if self._last_stream_seq:
                config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = self._last_stream_seq + 1
            else:
                config.deliver_policy = DeliverPolicy.ALL
            created_info = await self._js.add_consumer(self._stream, config)
            created = True
            await self._check_stored(created_info.num_pending or 0)
            await self._receive(messages, consumer, inbox)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if created:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._js.delete_consumer(self._stream, consumer), _CLEANUP_TIMEOUT_S
                    )

    async def _check_stored(self, available: int) -> None:
        """Raise when the current consumer has delivered and can still deliver (``available``)
        fewer chunks than were wanted from it: the version went away (or never was whole)."""
        if self._base + available >= self._info.chunks:
            return
        where = _where(self._bucket, self._name)
        meta = await _read_meta(self._js, self._bucket, self._name)
        if meta is None or meta.get("deleted") or meta.get("nuid") != self._info.nuid:
            raise ObjectNotFound(
                f"{where} was deleted, replaced or expired while it was being fetched "
                f"({self.received} of {self._info.chunks} chunks received)"
            )
        raise ObjectCorrupt(
            f"{where}: chunk count mismatch: its info says {self._info.chunks} chunks, the "
            f"bucket holds {self._base + available}"
        )

    async def _request(self, consumer: str, inbox: str, batch: int) -> None:
        body = {"batch": batch, "expires": int(_PULL_EXPIRES_S * 1e9)}
        subject = f"{_api_prefix(self._js)}.CONSUMER.MSG.NEXT.{self._stream}.{consumer}"
        await self._nc.publish(subject, json.dumps(body).encode(), reply=inbox)

    async def _receive(self, messages: asyncio.Queue[Msg], consumer: str, inbox: str) -> None:
        chunks = self._info.chunks
        requested = self.received  # messages asked for, counted like ``received``
        consumer_seq = 0
        while self.received < chunks:
            # Keep one to two batches in flight: ask for more when at most one is left.
            while requested - self.received <= self._batch and requested < chunks:
                batch = min(self._batch, chunks - requested)
                await self._request(consumer, inbox, batch)
                requested += batch
            msg = await _next_message(messages, _PULL_SILENCE_S)
            if msg is None:
                requested = await self._on_silence(consumer)
                continue
            if not msg.reply.startswith("$JS.ACK."):
                requested = await self._on_status(msg, consumer, requested)
                continue
            metadata = msg.metadata
            consumer_seq += 1
            if metadata.sequence.consumer != consumer_seq:
                raise _Lost(
                    f"chunk message {metadata.sequence.consumer} arrived where "
                    f"{consumer_seq} was expected"
                )
            self._last_stream_seq = metadata.sequence.stream
            self.received += 1
            self.size += len(msg.data)
            if self._max_bytes is not None and self.size > self._max_bytes:
                raise ObjectTooLarge(
                    f"{_where(self._bucket, self._name)}: over the limit of "
                    f"{self._max_bytes} bytes ({self.size} bytes in the first "
                    f"{self.received} chunks; its info says {self._info.size})",
                    size=self.size,
                    max_bytes=self._max_bytes,
                )
            if self.size > self._info.size:
                raise ObjectCorrupt(
                    f"{_where(self._bucket, self._name)}: size mismatch: its info says "
                    f"{self._info.size} bytes, the chunks hold more ({self.size} bytes in the "
                    f"first {self.received})"
                )
            if self.received == chunks and metadata.num_pending:
                raise ObjectCorrupt(
                    f"{_where(self._bucket, self._name)}: chunk count mismatch: its info says "
                    f"{chunks} chunks, the bucket holds {chunks + metadata.num_pending}"
                )
            await self._writer.add(msg.data)

    async def _on_status(self, msg: Msg, consumer: str, requested: int) -> int:
        """Handle a pull status message (expired request, ...); returns ``requested``."""
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100":  # heartbeat
            return requested
        pending = headers.get("Nats-Pending-Messages")
        ended = int(pending) if pending and pending.isdigit() else requested - self.received
        requested = max(requested - ended, self.received)
        # A request ended with chunks still wanted: is the consumer there, with the chunks?
        await self._check_consumer(consumer, "")
        return requested

    async def _on_silence(self, consumer: str) -> int:
        """Nothing arrived for longer than a pull request lasts; returns ``requested``."""
        await self._check_consumer(consumer, "its pull requests went unanswered; ")
        # The consumer is there with the chunks, but what was asked of it was lost on the
        # way: ask again (a request still pending only delivers chunks that are wanted anyway).
        log.warning(
            "object fetch pulls again",
            bucket=self._bucket,
            name=self._name,
            silent_s=_PULL_SILENCE_S,
            received=self.received,
        )
        return self.received

    async def _check_consumer(self, consumer: str, context: str) -> None:
        """Raise :class:`_Lost` when the consumer is gone, and what :meth:`_check_stored`
        raises when it cannot deliver every chunk still wanted."""
        try:
            info = await self._js.consumer_info(self._stream, consumer)
        except NotFoundError as exc:
            raise _Lost(f"{context}the pull consumer is gone ({exc.description})") from None
        delivered = info.delivered.consumer_seq if info.delivered else 0
        await self._check_stored(delivered + (info.num_pending or 0))


async def fetch_object(
    js: JetStreamContext,
    bucket: str,
    name: str,
    destination: Path | IO[bytes],
    *,
    expected_sha256: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    max_bytes: int | None = None,
) -> StoredObject:
    """Stream an object to ``destination`` and check it; returns what was fetched.

    A ``Path`` is written to a temporary file in the same directory and renamed over it at the
    end, so a failed fetch leaves no file behind; a stream is written from its current position
    (on failure it may hold part of the object). Links to single objects are followed.

    Raises :class:`ObjectNotFound` (no such bucket or object, deleted, or deleted or replaced
    during the fetch), :class:`ObjectCorrupt` (size, chunk count or SHA-256 mismatch, against
    the object's info or ``expected_sha256``, in hex), :class:`ObjectTooLarge` (the info says
    more than ``max_bytes``, or more than that arrives: nothing past it is written) and
    :class:`ObjectTimeout`.
    """
    _check_bucket(bucket)
    _check_name(name)
    expected = _expected_digest(expected_sha256)
    if window_bytes <= 0:
        raise ValueError(f"window_bytes must be positive, got {window_bytes}")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be non-negative (or None), got {max_bytes}")
    async with _deadline(timeout_s, lambda: f"fetching {_where(bucket, name)}"):
        where_bucket, where_name, info = await _object_info(js, bucket, name)
        if max_bytes is not None and info.size > max_bytes:
            raise ObjectTooLarge(
                f"{_where(where_bucket, where_name)} is {info.size} bytes, over the limit "
                f"of {max_bytes} bytes",
                size=info.size,
                max_bytes=max_bytes,
            )
        fetch = _Fetch(js, where_bucket, where_name, info, expected, window_bytes, max_bytes)
        if isinstance(destination, Path):
            return await _fetch_to_path(fetch, destination)
        return await _fetch_to(fetch, destination)


def _expected_digest(expected_sha256: str | None) -> bytes | None:
    if expected_sha256 is None:
        return None
    if not _SHA256_HEX_RE.fullmatch(expected_sha256):
        raise ValueError(f"expected_sha256 must be 64 hex digits, got {expected_sha256!r}")
    return bytes.fromhex(expected_sha256)


@dataclass(frozen=True)
class _Fetch:
    """What one fetch gets, and how."""

    js: JetStreamContext
    bucket: str
    name: str
    info: _Info
    expected: bytes | None
    window_bytes: int
    max_bytes: int | None


async def _fetch_to_path(fetch: _Fetch, destination: Path) -> StoredObject:
    temporary = destination.with_name(f".{destination.name}.{_nuid.next().decode()}.part")
    # Opening, closing and renaming are quick, and kept on the loop so that a cancellation
    # cannot come between creating the file and the clean-up below.
    file = _open(temporary, "xb")
    try:
        try:
            stored = await _fetch_to(fetch, file)
        finally:
            file.close()
        os.replace(temporary, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return stored


def _open(path: Path, mode: str) -> IO[bytes]:
    file: IO[bytes] = path.open(mode)
    return file


async def _fetch_to(fetch: _Fetch, file: IO[bytes]) -> StoredObject:
    bucket, name, info, expected = fetch.bucket, fetch.name, fetch.info, fetch.expected
    where = _where(bucket, name)
    writer = _Writer(file)
    received = size = 0
    try:
        if info.chunks:
            puller = _ChunkPuller(
                fetch.js, bucket, name, info, writer, fetch.window_bytes, fetch.max_bytes
            )
            await puller.run()
            received, size = puller.received, puller.size
        digest = await writer.finish()
    except BaseException:
        await writer.abandon()
        raise
    if received != info.chunks:  # pragma: no cover - the puller stops at the count
        raise ObjectCorrupt(
            f"{where}: chunk count mismatch: its info says {info.chunks}, received {received}"
        )
    if size != info.size:
        raise ObjectCorrupt(
            f"{where}: size mismatch: its info says {info.size} bytes, the chunks hold {size}"
        )
    if digest != info.digest:
        raise ObjectCorrupt(
            f"{where}: SHA-256 mismatch: its info says {info.digest.hex()}, the chunks hash to "
            f"{digest.hex()}"
        )
    if expected is not None and digest != expected:
        raise ObjectCorrupt(
            f"{where}: SHA-256 mismatch: expected_sha256 is {expected.hex()}, the object's "
            f"sha256 is {digest.hex()}"
        )
    return StoredObject(bucket=bucket, name=name, size=size, sha256=digest.hex(), chunks=received)


# -- put --------------------------------------------------------------------------------------
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
