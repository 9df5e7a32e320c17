"""The calls executors send a worker: taken in from a batch, run in their slot, answered.

A batch is JSON lines (``BatchHeader``, then one ``BatchItem`` per line), and each item is read
on its own: one the worker cannot read is answered alone (``BatchAck.unreadable``) and the rest
of the batch runs. An item runs only in the assignment (trajectory and epoch) its lease named;
calls of one slot run in arrival order (an asyncio lock is FIFO), and an item that has to wait
behind earlier calls is acknowledged as ``queued`` and announced with a ``started`` notice when
its run begins, so the executor's deadline counts the run, not the wait.

Every result is published, whatever its size: one larger than a NATS message is cut down (its
output shortened, with flags saying so), and a failure to publish is answered with a short infra
failure and logged. An executor that gives up on a call cancels it here first (:meth:`cancel`);
ids cancelled before their batch arrived are remembered, so such a call never runs.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable
from typing import Any

import structlog
from nats.aio.client import Client
from opentelemetry.trace import Span, SpanKind
from pydantic import ValidationError

from observability import tracing
from schemas.internal import (
    BatchAck,
    BatchHeader,
    BatchItem,
    CancelOutcome,
    CancelReply,
    ItemResult,
    RejectReason,
)
from schemas.messages import ErrorKindOfResult, ToolResult

from ._artifacts import ArtifactRunner
from ._result_sender import ResultSender
from ._slots import Slot, SlotTable
from ._tools import ToolRunner

log = structlog.get_logger("toolbus.worker")

_ARTIFACTS = "artifacts."  # batch items of artifact operations, e.g. "artifacts.read"
_REMEMBERED_IDS = 20_000  # finished and cancelled-before-arrival item ids, for cancel answers


class SlotCalls:
    def __init__(
        self,
        nc: Client,
        table: SlotTable,
        *,
        worker_id: str,
        tools: ToolRunner,
        artifacts: ArtifactRunner,
    ) -> None:
        self._nc = nc
        self._table = table
        self._worker_id = worker_id
        self._tools = tools
        self._artifacts = artifacts
        self._running: dict[str, asyncio.Task[None]] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Calls taken in whose outcome is not published yet: what a call cancelled before its
        # first step (its coroutine never ran) is answered from when its task ends.
        self._unanswered: dict[str, tuple[BatchItem, str]] = {}
        self._results = ResultSender(nc)
        self.accepting = False
        self.calls_completed = 0

    @property
    def running(self) -> list[asyncio.Task[None]]:
        return list(self._running.values())

    # -- intake -------------------------------------------------------------------------------
    def take_batch(
        self, data: bytes, subject: str, headers: dict[str, str] | None
    ) -> tuple[BatchAck, Callable[[], None]]:
        """Take in every item of the batch that may run; the ack says what happened to the rest.

        The items' tasks exist (and can be cancelled) from here on, but their runs begin only
        when the returned ``open_gate`` is called, which the caller does once the ack is on its
        way: the executor then sends its next batch while this one runs, instead of waiting for
        the whole batch to finish before it hears that it arrived."""
        first, _, rest = data.partition(b"\n")
        lines = rest.split(b"\n") if rest else []
        ack = BatchAck()
        loop = asyncio.get_running_loop()
        # An event, not a future: each call waits on a future of its own, so a cancel of one
        # (which cancels the future it awaits) leaves the others of the batch waiting.
        gate = asyncio.Event()

        def open_gate() -> None:
            # From the loop's queue, behind the connection's flusher that the ack's publish woke.
            loop.call_soon(gate.set)

        try:
            header = BatchHeader.model_validate_json(first)
        except (ValidationError, ValueError, RecursionError):
            log.error("unreadable batch header", size=len(data))
            ack.unreadable = list(range(len(lines)))
            return ack, open_gate
        for index, line in enumerate(lines):
            try:
                item = BatchItem.model_validate_json(line)
            except (ValidationError, ValueError, RecursionError) as exc:
                # The executor checks what it sends, so this is a bug on one side: say so.
                log.error("unreadable batch item", index=index, size=len(line), error=type(exc))
                ack.unreadable.append(index)
                continue
            try:
                slot, reason = self._admit(item)
            except Exception:  # a bug: this item alone is answered for
                log.exception("admitting a batch item failed", index=index)
                ack.unreadable.append(index)
                continue
            if slot is None:
                ack.rejected[item.item_id] = reason
                continue
            queued = bool(slot.tasks)  # earlier calls of this slot go first
            if queued:
                ack.queued.append(item.item_id)
            slot.last_used = time.monotonic()
            slot.calls += 1
            task = asyncio.create_task(
                self._run(slot, item, header.reply_to, headers, subject, queued, gate)
            )
            slot.tasks.add(task)
            self._running[item.item_id] = task
            self._unanswered[item.item_id] = (item, header.reply_to)
            task.add_done_callback(functools.partial(self._done, slot, item.item_id))
        return ack, open_gate

    def _admit(self, item: BatchItem) -> tuple[Slot | None, RejectReason]:
        if not self.accepting:
            return None, RejectReason.STOPPING
        seen = (self._cancelled, self._running, self._finished)
        if any(item.item_id in ids for ids in seen):
            return None, RejectReason.CANCELLED  # given up on before it came, or sent twice

        slot = self._table.accepting(item.trajectory_id, item.epoch)
        return slot, RejectReason.NO_SLOT

    def _done(self, slot: Slot, item_id: str, task: asyncio.Task[None]) -> None:
        slot.tasks.discard(task)
        self._running.pop(item_id, None)
        _remember(self._finished, item_id)
        if (unanswered := self._unanswered.pop(item_id, None)) is not None:
            # Cancelled before its first step: none of its code ran, nor published.
            item, reply_to = unanswered
            self._publish_outcome(
                item, ItemResult(item_id=item_id, result=_cancelled()), reply_to, slot
            )

    # -- cancel -------------------------------------------------------------------------------
    def cancel(self, item_ids: list[str]) -> CancelReply:
        reply = CancelReply()
        for item_id in item_ids:
            task = self._running.get(item_id)
            if task is not None:
                task.cancel()  # its cancelled result is published as it stops
                reply.outcomes[item_id] = CancelOutcome.CANCELLED
            elif item_id in self._finished:
                reply.outcomes[item_id] = CancelOutcome.FINISHED
            else:
                _remember(self._cancelled, item_id)
                reply.outcomes[item_id] = CancelOutcome.NOT_FOUND
        return reply

    # -- running ------------------------------------------------------------------------------
    async def _run(
        self,
        slot: Slot,
        item: BatchItem,
        reply_to: str,
        batch_headers: dict[str, str] | None,
        subject: str,
        queued: bool,
        gate: asyncio.Event,
    ) -> None:
        """Run one call in its slot (after the calls before it) and publish its result.

        Its span continues the executor's trace (the item carries its context) and links to the
        batch it came in; the tool's own span inside it is the execution time, what comes
        before it the queue wait.
        """
        outcome = ItemResult(item_id=item.item_id)
        # This call's own task (see take_batch): bound until it ends, nothing to undo.
        structlog.contextvars.bind_contextvars(
            trajectory_id=item.trajectory_id, tool=item.tool, uniq_id=item.uniq_id
        )
        with tracing.span(
            f"process {subject}",
            kind=SpanKind.CONSUMER,
            parent=item.trace_context or {},
            links=lambda: tracing.link_to(batch_headers),
            attributes=lambda: tracing.nats_attributes(
                subject,
                "process",
                **{"toolbus.trajectory_id": item.trajectory_id, "toolbus.slot": slot.index},
            ),
        ) as span:
            try:
                await gate.wait()  # its batch's ack is on its way
                async with slot.lock:
                    if queued:  # the executor's deadline for its run starts now
                        self._results.send(reply_to, ItemResult(item_id=item.item_id, started=True))
                    started = time.time()
                    if item.created_at is not None:
                        outcome.queue_wait_s = max(started - item.created_at, 0.0)
                        span.set_attribute("toolbus.queue_wait_s", outcome.queue_wait_s)
                    await self._run_tool(slot, item, outcome)
                    outcome.execution_s = time.time() - started
            except asyncio.CancelledError:
                outcome.result = _cancelled()
                tracing.mark_error(span, "cancelled")
                self._publish_outcome(item, outcome, reply_to, slot)
                raise
            except Exception as exc:
                log.exception("tool crashed")
                outcome.result = ToolResult(
                    success=False,
                    error="Internal error in the sandbox worker",
                    metadata={"error_kind": str(ErrorKindOfResult.INFRA)},
                )
                tracing.mark_error(span, type(exc).__qualname__)
            else:
                if not _succeeded(outcome):
                    tracing.mark_error(span, _error_type(outcome))
            # No await from here on: a cancel that comes now cannot lose a finished call's result.
            self._publish_outcome(item, outcome, reply_to, slot)

    async def _run_tool(self, slot: Slot, item: BatchItem, outcome: ItemResult) -> None:
        with tracing.span(
            f"execute_tool {item.tool}",
            attributes=lambda: {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": item.tool,
            },
        ) as span:
            if item.tool.startswith(_ARTIFACTS):
                outcome.reply = await self._run_artifact_operation(slot, item)
            else:
                outcome.result = await self._tools.run(
                    item.tool,
                    item.arguments,
                    slot.tools,
                    timeout_s=item.timeout_s,
                    allow_network=item.allow_network,
                )
                _describe_result(span, outcome.result)
            if not _succeeded(outcome):
                tracing.mark_error(span, _error_type(outcome), _error_message(outcome))

    async def _run_artifact_operation(self, slot: Slot, item: BatchItem) -> dict[str, Any]:
        operation = item.tool.removeprefix(_ARTIFACTS)
        # Its transfers and its helper share the call's time; past it, a failure reply.
        reply = await self._artifacts.run(
            operation,
            item.arguments,
            slot.tools.sandbox,
            item.trajectory_id,
            timeout_s=item.timeout_s,
        )
        log.debug("artifact operation done", success=reply.get("success"), slot=slot.index)
        return reply

    # -- answering ----------------------------------------------------------------------------
    def _publish_outcome(
        self, item: BatchItem, outcome: ItemResult, reply_to: str, slot: Slot
    ) -> None:
        self._unanswered.pop(item.item_id, None)
        slot.last_used = time.monotonic()
        if outcome.result is not None:
            outcome.result.uniq_id = item.uniq_id
            outcome.result.metadata.update(worker_id=self._worker_id, slot=slot.index)
        log.debug("call done", success=_succeeded(outcome), slot=slot.index)
        self.calls_completed += 1
        self._results.send(reply_to, outcome)

    async def results_sent(self) -> None:
        """Until every result of a finished call has left (before the connection closes)."""
        await self._results.flush()


def _cancelled() -> ToolResult:
    return ToolResult(
        success=False,
        error="Call cancelled: the trajectory was released, the call was given up on, or the "
        "worker stopped",
        metadata={"error_kind": str(ErrorKindOfResult.INFRA), "cancelled": True},
    )


def _remember(ids: collections.OrderedDict[str, None], item_id: str) -> None:
    ids[item_id] = None
    while len(ids) > _REMEMBERED_IDS:
        ids.popitem(last=False)


def _succeeded(outcome: ItemResult) -> bool:
    if outcome.result is not None:
        return outcome.result.success
    return bool((outcome.reply or {}).get("success"))


def _error_type(outcome: ItemResult) -> str:
    """``error.type`` of a failed call: the result's error kind (exit, timeout, ...)."""
    if outcome.result is not None:
        return str(outcome.result.metadata.get("error_kind") or "tool")
    return "artifact"


def _error_message(outcome: ItemResult) -> str | None:
    if outcome.result is not None:
        return outcome.result.error
    error = (outcome.reply or {}).get("error")
    return str(error) if error is not None else None


def _describe_result(span: Span, result: ToolResult) -> None:
    if not span.is_recording():
        return
    metadata = result.metadata
    attributes = {
        "toolbus.status": metadata.get("status"),
        "process.exit.code": metadata.get("exit_code"),
        "toolbus.sandboxed": metadata.get("sandboxed"),
        "toolbus.truncated": metadata.get("truncated"),
        "toolbus.output_bytes": (metadata.get("stdout_bytes") or 0)
        + (metadata.get("stderr_bytes") or 0),
        "toolbus.success": result.success,
    }
    span.set_attributes({key: value for key, value in attributes.items() if value is not None})
