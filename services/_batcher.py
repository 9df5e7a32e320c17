"""Adaptive micro-batching of calls to one sandbox worker.

When nothing is in flight to the worker, a call is sent at once (on the next loop turn, so calls
that arrive together still share a message). While a batch is in flight, new calls wait and are
sent together when it is acknowledged, or when the oldest has waited ``window_s``, or when the
batch is full (``max_items`` calls or ``max_bytes``). Several batches may be in flight at once:
the acknowledgement comes as soon as the worker has queued the calls, not when they finish.

A batch is JSON lines: a ``BatchHeader``, then one ``BatchItem`` per line, so the worker reads
each item on its own. Each call learns from the acknowledgement whether it runs now, waits
behind earlier calls of its trajectory, or was refused and why; when the batch was not taken,
whether the worker certainly did not get it (no responders) or may have (no answer in time).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pydantic_core
from nats.aio.client import Client
from nats.errors import NoRespondersError
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, Link, Span, SpanContext, SpanKind

from observability import tracing
from schemas.internal import BatchAck, BatchHeader, BatchItem, RejectReason

from ._requests import nats_request

DEFAULT_ACK_TIMEOUT_S = 10.0
_NO_CONTEXT = INVALID_SPAN_CONTEXT  # tracing off: no span to link to


class BatchNotDelivered(Exception):
    """Nobody took the batch (no responders, or the link closed first): no call of it runs."""


class BatchUnconfirmed(Exception):
    """The worker did not acknowledge in time: it may have the calls, or not."""


class Accepted(Enum):
    RUNNING = "running"  # its run starts now
    QUEUED = "queued"  # it waits behind earlier calls of its trajectory: a notice will say


Acceptance = Accepted | RejectReason


@dataclass(slots=True, frozen=True)
class OutgoingItem:
    """A call on its way to a worker: its ``BatchItem`` JSON, written once, and the fields the
    executor reads of it. No model on this path: building and validating a BatchItem, then
    dumping it, cost more than the rest of the call's batching (the worker validates it)."""

    item_id: str
    timeout_s: float
    uniq_id: str | None
    payload: bytes  # a BatchItem's JSON

    @classmethod
    def encode(
        cls,
        *,
        item_id: str,
        trajectory_id: str,
        epoch: int,
        tool: str,
        arguments: dict[str, Any],
        timeout_s: float,
        uniq_id: str | None,
        allow_network: bool,
        trace_context: dict[str, str] | None,
        created_at: float,
    ) -> OutgoingItem:
        fields = {
            "item_id": item_id,
            "trajectory_id": trajectory_id,
            "epoch": epoch,
            "tool": tool,
            "arguments": arguments,
            "timeout_s": timeout_s,
            "uniq_id": uniq_id,
            "allow_network": allow_network,
            "trace_context": trace_context,
            "created_at": created_at,
        }
        # As BatchItem.model_dump_json writes it: infinities and NaN (which requests may hold
        # in their arguments) as null, never as JavaScript's bare Infinity and NaN.
        return cls(item_id, timeout_s, uniq_id, pydantic_core.to_json(fields, inf_nan_mode="null"))

    @classmethod
    def of(cls, item: BatchItem) -> OutgoingItem:
        return cls(item.item_id, item.timeout_s, item.uniq_id, item.model_dump_json().encode())


@dataclass(slots=True)
class _Pending:
    payload: bytes
    item_id: str
    accepted: asyncio.Future[Acceptance]
    queued_at: float
    span_context: SpanContext  # the executor span of the call, linked from the batch span


class WorkerLink:
    def __init__(
        self,
        nc: Client,
        *,
        subject: str,
        reply_to: str,
        window_s: float,
        max_items: int,
        max_bytes: int,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        on_batch: Callable[..., None] | None = None,
    ) -> None:
        self._nc = nc
        self._on_batch = on_batch  # called with size=<calls> for every batch the worker took
        self._subject = subject
        self._prefix = BatchHeader(reply_to=reply_to).model_dump_json().encode() + b"\n"
        self._window_s = window_s
        self._max_items = max_items
        self._max_bytes = max_bytes - len(self._prefix)
        self._ack_timeout_s = ack_timeout_s
        self._pending: deque[_Pending] = deque()
        self._pending_bytes = 0
        self._in_flight = 0
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches_sent = 0
        self.items_sent = 0

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch in flight: the link can be dropped without loss."""
        return not self._pending and self._in_flight == 0

    def submit(self, item: OutgoingItem) -> asyncio.Future[Acceptance]:
        """Queue a call; the future says whether the worker accepted it, or why not; or raises
        BatchNotDelivered or BatchUnconfirmed."""
        loop = asyncio.get_running_loop()
        pending = _Pending(
            item.payload,
            item.item_id,
            loop.create_future(),
            time.monotonic(),
            trace.get_current_span().get_span_context() if tracing.enabled() else _NO_CONTEXT,
        )
        self._pending.append(pending)
        self._pending_bytes += len(pending.payload) + 1
        if self._in_flight == 0 or self._is_full():
            self._schedule(0.0)
        else:
            self._schedule(self._window_s)
        return pending.accepted

    def _is_full(self) -> bool:
        return len(self._pending) >= self._max_items or self._pending_bytes >= self._max_bytes

    def _schedule(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        if delay <= 0:
            if isinstance(self._flush_handle, asyncio.TimerHandle):
                self._flush_handle.cancel()
                self._flush_handle = None
            if self._flush_handle is None:
                self._flush_handle = loop.call_soon(self._flush)
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        while self._pending:
            batch: list[_Pending] = []
            size = 0
            while self._pending and len(batch) < self._max_items:
                nxt = self._pending[0]
                if nxt.accepted.cancelled():  # its caller gave up before it went: it never goes
                    self._pending.popleft()
                    self._pending_bytes -= len(nxt.payload) + 1
                    continue
                if batch and size + len(nxt.payload) + 1 > self._max_bytes:
                    break
                batch.append(self._pending.popleft())
                size += len(nxt.payload) + 1
            if not batch:
                break
            self._pending_bytes -= size
            self._in_flight += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if not self._is_full():
                break  # the rest (if any) coalesces while this batch is in flight
        if self._pending:
            oldest = self._pending[0].queued_at
            self._schedule(max(self._window_s - (time.monotonic() - oldest), 0.0))

    async def _send(self, batch: list[_Pending]) -> None:
        body = self._prefix + b"\n".join(p.payload for p in batch)
        # A batch serves many traces: its span starts a trace of its own and links to each call.
        with tracing.span(
            f"send {self._subject}",
            kind=SpanKind.PRODUCER,
            new_trace=True,
            links=lambda: [Link(p.span_context) for p in batch if p.span_context.is_valid],
            attributes=lambda: tracing.nats_attributes(
                self._subject,
                "send",
                **{
                    tracing.MESSAGING_BATCH_COUNT: len(batch),
                    tracing.MESSAGING_BODY_SIZE: len(body),
                },
            ),
        ) as span:
            await self._send_in_span(batch, body, span)

    async def _send_in_span(self, batch: list[_Pending], body: bytes, span: Span) -> None:
        try:
            reply = await nats_request(
                self._nc,
                self._subject,
                body,
                timeout=self._ack_timeout_s,
                headers=tracing.current_trace_headers() if tracing.enabled() else None,
            )
            ack = BatchAck.model_validate_json(reply.data)
        except NoRespondersError as exc:
            tracing.mark_error(span, type(exc).__name__)
            self._fail(batch, BatchNotDelivered("no worker listens"))
        except asyncio.CancelledError:  # the link closes with the batch in flight
            self._fail(batch, BatchUnconfirmed("the executor stopped waiting"))
            raise
        except Exception as exc:  # a timeout, or an unreadable ack: the worker may have it
            tracing.mark_error(span, type(exc).__qualname__)
            self._fail(batch, BatchUnconfirmed(type(exc).__name__))
        else:
            self.batches_sent += 1
            self.items_sent += len(batch)
            if self._on_batch is not None:
                self._on_batch(size=len(batch))
            unreadable = {batch[index].item_id for index in ack.unreadable if index < len(batch)}
            queued = set(ack.queued)
            for pending in batch:
                if pending.accepted.done():
                    continue
                if pending.item_id in unreadable:
                    pending.accepted.set_result(RejectReason.UNREADABLE)
                elif (reason := ack.rejected.get(pending.item_id)) is not None:
                    pending.accepted.set_result(reason)
                elif pending.item_id in queued:
                    pending.accepted.set_result(Accepted.QUEUED)
                else:
                    pending.accepted.set_result(Accepted.RUNNING)
        finally:
            self._in_flight -= 1
            if self._pending and self._in_flight == 0:
                self._schedule(0.0)

    @staticmethod
    def _fail(batch: list[_Pending], error: Exception) -> None:
        for pending in batch:
            if not pending.accepted.done():
                pending.accepted.set_exception(error)

    async def close(self) -> None:
        if self._flush_handle:
            self._flush_handle.cancel()
        self._fail(list(self._pending), BatchNotDelivered("executor stopping"))
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
