"""Moving one object version's chunks from JetStream into a file, for :func:`fetch_object`.

:class:`_ChunkPuller` pulls the chunks from ``$O.<bucket>.C.<nuid>`` with an ephemeral pull
consumer (no acks, in-memory state) and pipelined pull requests that keep a bounded window of
bytes in flight, checking the chunk count and size as they arrive; :class:`_Writer` hashes and
writes them in a worker thread while the next ones arrive. A fetch whose consumer disappears
resumes after the last chunk it received, and pull requests that go unanswered are looked into
instead of waited out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from typing import IO

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from ._object_info import _Info, _read_meta
from ._object_protocol import (
    _BLOCK_BYTES,
    _CLEANUP_TIMEOUT_S,
    ObjectCorrupt,
    ObjectNotFound,
    ObjectTooLarge,
    _api_prefix,
    _connection,
    _nuid,
    _subscribe_queue,
    _where,
    chunk_subject,
    stream_name,
)

log = structlog.get_logger("toolbus.objects")

_PULL_EXPIRES_S = 2.0  # a pull request ends after this; a stall is looked into then
# A live consumer answers every pull request by its expiry (chunks, or a status saying it
# ended); one that is being deleted may drop requests without a word. Silence this long is
# looked into, so that such a fetch resumes instead of waiting for its whole timeout.
_PULL_SILENCE_S = _PULL_EXPIRES_S + 1.0
_CONSUMER_INACTIVE_S = 30.0  # the server removes a consumer we could not delete after this
_MAX_RESUMES = 5


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
