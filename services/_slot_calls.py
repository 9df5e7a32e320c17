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

An item is one asker of a run (``_call_runs.py``): a call with a ``uniq_id`` seen in this
assignment within the retry window joins the earlier run (waiting for it, or answered from its
held outcome at once) instead of running a second time. A cancel ends the asker; the run ends
with its last asker.
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
from opentelemetry.trace import SpanKind
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
from ._call_outcomes import (
    cancelled_result,
    describe_result,
    error_message,
    error_type,
    for_asker,
    refused_result,
    reused_result,
    succeeded,
)
from ._call_runs import (
    Asker,
    CallRun,
    Held,
    Refused,
    RunKey,
    RunsById,
    RunState,
    fingerprint,
    run_key,
    same_call,
)
from ._image_slots import ImageSlots
from ._result_sender import ResultSender, fit_result
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
        runs: RunsById | None = None,
        images: ImageSlots,
    ) -> None:
        self._nc = nc
        self._images = images
        self._table = table
        self._worker_id = worker_id
        self._tools = tools
        self._artifacts = artifacts
        self._runs = runs or RunsById()
        self._live: set[CallRun] = set()  # runs whose task has not ended
        self._asking: dict[str, CallRun] = {}  # item id -> the run it waits for
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._results = ResultSender(nc)
        self.accepting = False
        self.calls_completed = 0

    @property
    def running(self) -> list[asyncio.Task[None]]:
        return [run.task for run in self._live if run.task is not None]

    # -- intake -------------------------------------------------------------------------------
    def take_batch(
        self, data: bytes, subject: str, headers: dict[str, str] | None
    ) -> tuple[BatchAck, Callable[[], None]]:
        """Take in every item of the batch that may run; the ack says what happened to the rest.

        The items' runs exist (and can be cancelled) from here on, but they begin only when the
        returned ``open_gate`` is called, which the caller does once the ack is on its way: the
        executor then sends its next batch while this one runs, instead of waiting for the
        whole batch to finish before it hears that it arrived. Items answered from an earlier
        run's outcome are answered then too, after their ack."""
        first, _, rest = data.partition(b"\n")
        lines = rest.split(b"\n") if rest else []
        ack = BatchAck()
        loop = asyncio.get_running_loop()
        # An event, not a future: each run waits on a future of its own, so a cancel of one
        # (which cancels the future it awaits) leaves the others of the batch waiting.
        gate = asyncio.Event()
        answered: list[tuple[Asker, ItemResult]] = []

        def open_gate() -> None:
            # From the loop's queue, behind the connection's flusher that the ack's publish woke.
            loop.call_soon(gate.set)
            if answered:
                loop.call_soon(self._answer_all, answered)

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
                key = run_key(item)
                earlier = self._runs.find(key) if slot is not None and key is not None else None
            except Exception:  # a bug: this item alone is answered for
                log.exception("admitting a batch item failed", index=index)
                ack.unreadable.append(index)
                continue
            if slot is None:
                ack.rejected[item.item_id] = reason
                continue
            asker = Asker(item, header.reply_to, owed_start=False)
            match = self._match(item, earlier)
            if isinstance(match, ItemResult):  # answered at once, after the ack
                answered.append((asker, match))
                _remember(self._finished, item.item_id)
                continue
            slot.last_used = time.monotonic()
            slot.calls += 1
            if match is not None:  # a retry of a call still waiting or running: it joins
                asker.owed_start = match.state is RunState.WAITING
                match.askers[item.item_id] = asker
                self._asking[item.item_id] = match
            else:
                asker.owed_start = bool(slot.tasks)  # earlier calls of this slot go first
                self._start(slot, asker, key, headers, subject, gate)
            if asker.owed_start:
                ack.queued.append(item.item_id)
        return ack, open_gate

    def _admit(self, item: BatchItem) -> tuple[Slot | None, RejectReason]:
        if not self.accepting:
            return None, RejectReason.STOPPING
        seen = (self._cancelled, self._asking, self._finished)
        if any(item.item_id in ids for ids in seen):
            return None, RejectReason.CANCELLED  # given up on before it came, or sent twice

        slot = self._table.accepting(item.trajectory_id, item.epoch)
        return slot, RejectReason.NO_SLOT

    def _match(
        self, item: BatchItem, earlier: CallRun | Held | Refused | None
    ) -> ItemResult | CallRun | None:
        """What an item whose id was seen gets: its answer at once (a finished run's outcome, a
        refusal), the run it joins, or None: it runs."""
        if earlier is None:
            return None
        if isinstance(earlier, Refused):
            refused = refused_result(self._runs.window_s, item.uniq_id)
            return ItemResult(item_id=item.item_id, result=refused)
        if isinstance(earlier, CallRun):
            same = same_call(item, earlier.item)
        else:
            same = fingerprint(item) == earlier.fingerprint
        if not same:  # the id of another call: say so, run neither again
            return ItemResult(item_id=item.item_id, result=reused_result(item.uniq_id))
        if isinstance(earlier, Held):
            outcome = ItemResult.model_validate_json(earlier.payload)
            return for_asker(outcome, item.item_id, replayed=True)
        return earlier

    def _start(
        self,
        slot: Slot,
        asker: Asker,
        key: RunKey | None,
        headers: dict[str, str] | None,
        subject: str,
        gate: asyncio.Event,
    ) -> None:
        item = asker.item
        run = CallRun(slot, item, key, askers={item.item_id: asker})
        run.task = asyncio.create_task(self._run(run, headers, subject, gate))
        slot.tasks.add(run.task)
        self._live.add(run)
        self._asking[item.item_id] = run
        if run.key is not None:
            self._runs.started(run)
        run.task.add_done_callback(functools.partial(self._ended, run))

    def _ended(self, run: CallRun, task: asyncio.Task[None]) -> None:
        run.slot.tasks.discard(task)
        self._live.discard(run)
        if run.state is not RunState.DONE:
            # Cancelled before its first step: none of its code ran, nor published.
            self._finish(run, ItemResult(item_id=run.item.item_id, result=cancelled_result()))

    # -- cancel -------------------------------------------------------------------------------
    def cancel(self, item_ids: list[str], *, after_s: float | None = None) -> CancelReply:
        """Cancel these items (each an asker of its run); with ``after_s``, those that still
        wait then (a retry may join their runs meanwhile, which then go on for it)."""
        reply = CancelReply()
        loop = asyncio.get_running_loop()
        for item_id in item_ids:
            run = self._asking.get(item_id)
            if run is not None and after_s is not None:
                loop.call_later(after_s, self._cancel_if_asking, run, item_id)
                reply.outcomes[item_id] = CancelOutcome.DEFERRED
            elif run is not None:
                reply.outcomes[item_id] = self._cancel_asker(run, item_id)
            elif item_id in self._finished:
                reply.outcomes[item_id] = CancelOutcome.FINISHED
            else:
                _remember(self._cancelled, item_id)
                reply.outcomes[item_id] = CancelOutcome.NOT_FOUND
        return reply

    def _cancel_if_asking(self, run: CallRun, item_id: str) -> None:
        if self._asking.get(item_id) is run:  # else it was answered meanwhile
            self._cancel_asker(run, item_id)

    def _cancel_asker(self, run: CallRun, item_id: str) -> CancelOutcome:
        if len(run.askers) > 1:  # the run goes on for the others: this asker alone is answered
            asker = run.askers.pop(item_id)
            del self._asking[item_id]
            _remember(self._finished, item_id)
            detached = cancelled_result(asker.item.uniq_id, still_running=True)
            self._answer(asker, ItemResult(item_id=item_id, result=detached), run.slot)
            return CancelOutcome.DETACHED
        assert run.task is not None
        run.task.cancel()  # its cancelled outcome is published as it stops ...
        if run.state is RunState.WAITING:
            # ... or now, when none of it ran: a retry that comes before the task has ended
            # must run the call, not join a run that will never start.
            cancelled = cancelled_result(run.item.uniq_id)
            self._finish(run, ItemResult(item_id=item_id, result=cancelled))
        return CancelOutcome.CANCELLED

    # -- running ------------------------------------------------------------------------------
    async def _run(
        self,
        run: CallRun,
        batch_headers: dict[str, str] | None,
        subject: str,
        gate: asyncio.Event,
    ) -> None:
        """Run one call in its slot (after the calls before it) and publish its outcome to
        each of its askers.

        Its span continues the first asker's trace (the item carries its context) and links to
        the batch it came in; the tool's own span inside it is the execution time, what comes
        before it the queue wait.
        """
        slot, item = run.slot, run.item
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
                    run.state = RunState.RUNNING  # from here on, it ran
                    for asker in run.askers.values():
                        if asker.owed_start:  # the executor's deadline for its run starts now
                            started = ItemResult(item_id=asker.item.item_id, started=True)
                            self._results.send(asker.reply_to, started)
                    began = time.time()
                    if item.created_at is not None:
                        outcome.queue_wait_s = max(began - item.created_at, 0.0)
                        span.set_attribute("toolbus.queue_wait_s", outcome.queue_wait_s)
                    await self._run_tool(slot, item, outcome)
                    outcome.execution_s = time.time() - began
            except asyncio.CancelledError:
                outcome.result = cancelled_result()
                tracing.mark_error(span, "cancelled")
                self._finish(run, outcome)
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
                if not succeeded(outcome):
                    tracing.mark_error(span, error_type(outcome))
            # No await from here on: a cancel that comes now cannot lose a finished call's result.
            self._finish(run, outcome)

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
                # A default slot's tools at once; an image slot's made at its first call.
                tools = (
                    slot.tools if slot.image is None else await self._images.tools_or_failure(slot)
                )
                if isinstance(tools, ToolResult):
                    outcome.result = tools  # its image could not be had
                else:
                    outcome.result = await self._tools.run(
                        item.tool,
                        item.arguments,
                        tools,
                        timeout_s=item.timeout_s,
                        allow_network=item.allow_network,
                    )
                    describe_result(span, outcome.result)
            if not succeeded(outcome):
                tracing.mark_error(span, error_type(outcome), error_message(outcome))

    async def _run_artifact_operation(self, slot: Slot, item: BatchItem) -> dict[str, Any]:
        operation = item.tool.removeprefix(_ARTIFACTS)
        if slot.image is not None:  # its helper is a Python of the host's, not in the image
            return {
                "success": False,
                "error": "artifact operations are not yet available in image slots",
            }
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
    def _finish(self, run: CallRun, outcome: ItemResult) -> None:
        """WAITING or RUNNING → DONE: the outcome goes to every asker, in one step (a run
        already DONE, finished by its cancel, is left as it is)."""
        if run.state is RunState.DONE:
            return
        ran = run.state is RunState.RUNNING
        run.state = RunState.DONE
        if outcome.result is not None:
            outcome.result.uniq_id = run.item.uniq_id
            outcome.result.metadata.update(worker_id=self._worker_id, slot=run.slot.index)
        # Encoded once, for the run's own asker and for the retries to come.
        payload = fit_result(outcome, self._results.budget)
        askers, run.askers = run.askers, {}
        for item_id in askers:
            del self._asking[item_id]
            _remember(self._finished, item_id)
        if run.key is not None:
            self._runs.finished(run, payload, ran=ran)
        log.debug("call done", success=succeeded(outcome), slot=run.slot.index)
        self.calls_completed += 1
        run.slot.last_used = time.monotonic()
        for asker in askers.values():
            if asker.item is run.item:
                self._results.send_encoded(asker.reply_to, asker.item.item_id, payload)
            else:  # a retry that joined the run: its outcome, as a retry gets it if any ran
                self._answer(asker, outcome, run.slot, replayed=ran)

    def _answer_all(self, answered: list[tuple[Asker, ItemResult]]) -> None:
        for asker, outcome in answered:
            slot = self._table.accepting(asker.item.trajectory_id, asker.item.epoch)
            self._answer(asker, outcome, slot)

    def _answer(
        self, asker: Asker, outcome: ItemResult, slot: Slot | None, *, replayed: bool = False
    ) -> None:
        """Publish an outcome to one asker, as the answer to its own item; ``replayed``: the
        outcome of a run another item started, which says so."""
        if slot is not None:
            slot.last_used = time.monotonic()
        if outcome.item_id != asker.item.item_id or replayed:
            outcome = for_asker(outcome, asker.item.item_id, replayed=replayed)
        self._results.send(asker.reply_to, outcome)

    async def results_sent(self) -> None:
        """Until every result of a finished call has left (before the connection closes)."""
        await self._results.flush()


def _remember(ids: collections.OrderedDict[str, None], item_id: str) -> None:
    ids[item_id] = None
    while len(ids) > _REMEMBERED_IDS:
        ids.popitem(last=False)
