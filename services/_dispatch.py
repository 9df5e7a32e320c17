"""Sending a call to the worker that holds its trajectory's slot, and waiting for its result.

What this module promises:

- A call's deadline is its run: ``timeout_s`` plus ``result_grace_s``, counted from when it
  starts on the worker (at once, or when the worker's ``started`` notice comes for a call that
  waited behind earlier calls of its trajectory), never from when it was sent.
- A call is never reported failed while it may still run: one the executor gives up on (past its
  deadline, or a batch the worker did not acknowledge) is cancelled on the worker first, and
  the worker's answer decides what the caller hears. While the worker cannot be reached but is
  still registered, the call waits.
- Calls sent to a worker incarnation whose registration is gone end at once with
  :class:`WorkerGone`: their workspace is lost with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from schemas.internal import (
    CancelOutcome,
    CancelReply,
    CancelRequest,
    ItemResult,
    Lease,
    RejectReason,
)
from schemas.subjects import Subjects

from ._batcher import Accepted, BatchNotDelivered, BatchUnconfirmed, OutgoingItem, WorkerLink
from ._failures import infra_failure
from ._registry import WorkerRegistry
from ._requests import nats_request

log = structlog.get_logger("toolbus.executor")

DEFAULT_RESULT_GRACE_S = 10.0  # beyond a call's own timeout, for spawn, transfer and clean-up
# A call with a uniq_id that a stopping executor gives up on runs this long for its retry to join
# before it is cancelled (a client that does not retry must not find its slot busy for long).
DEFAULT_ABANDONED_GRACE_S = 30.0
_CANCEL_REQUEST_TIMEOUT_S = 5.0
_CANCELLED_RESULT_WAIT_S = 5.0  # for the result of a call the worker said it cancelled
_UNREACHABLE_RETRY_S = 1.0  # between attempts to reach a registered worker that does not answer


class WorkerGone(Exception):
    """The worker incarnation the call was sent to is no longer registered."""


class SendAgain(Exception):
    """This executor's connection came back while the call ran: its result, published meanwhile,
    may be lost. A call with a uniq_id is sent again (the worker runs nothing twice: the new item
    joins the run, or gets its held result)."""


class CallRejected(Exception):
    """The worker did not take the call, which did not and will not run there."""

    def __init__(self, reason: RejectReason | None) -> None:
        super().__init__(str(reason))
        self.reason = reason  # None: the batch did not reach the worker


@dataclass(slots=True, eq=False)
class _Pending:
    worker_id: str
    incarnation: str
    run_s: float  # timeout_s + grace: how long its run may take before it is given up on
    resendable: bool  # it has a uniq_id: sent again, not waited for, when a result may be lost
    # What the call waits on: its result; None when its deadline passed first (then a fresh
    # future takes its place, for a result that still comes).
    result: asyncio.Future[ItemResult | None]
    started: bool = False
    waiting: bool = False  # its caller waits for the result (not yet giving up)
    deadline: asyncio.TimerHandle | None = None

    def run_started(self) -> None:
        """Its run starts now: while its caller waits, the deadline is ``run_s`` from now."""
        self.started = True
        if self.waiting and self.deadline is None:
            loop = asyncio.get_running_loop()
            self.deadline = loop.call_at(loop.time() + self.run_s, self._deadline_passed)

    def _deadline_passed(self) -> None:
        passed, self.result = self.result, asyncio.get_running_loop().create_future()
        if not passed.done():
            passed.set_result(None)


class Dispatcher:
    def __init__(
        self,
        nc: Client,
        registry: WorkerRegistry,
        *,
        subjects: Subjects,
        make_link: Callable[[str], WorkerLink],
        result_grace_s: float = DEFAULT_RESULT_GRACE_S,
        abandoned_grace_s: float = DEFAULT_ABANDONED_GRACE_S,
    ) -> None:
        self._nc = nc
        self._registry = registry
        self._subjects = subjects
        self._make_link = make_link
        self._grace_s = result_grace_s
        self._abandoned_grace_s = abandoned_grace_s
        self._links: dict[str, WorkerLink] = {}
        self._pending: dict[str, _Pending] = {}
        registry.on_gone(self._worker_gone)

    @property
    def links(self) -> dict[str, WorkerLink]:
        return self._links

    async def close(self) -> None:
        for link in self._links.values():
            await link.close()

    # -- a call -------------------------------------------------------------------------------
    async def run(self, lease: Lease, item: OutgoingItem, *, resend: bool = True) -> ItemResult:
        """The worker's result for the call; CallRejected when it did not take it; WorkerGone
        when its worker incarnation went away before the result came; SendAgain (``resend``
        and the call has a uniq_id) when this executor reconnected meanwhile."""
        loop = asyncio.get_running_loop()
        pending = _Pending(
            lease.worker_id,
            lease.incarnation,
            item.timeout_s + self._grace_s,
            resend and item.uniq_id is not None,
            loop.create_future(),
        )
        self._pending[item.item_id] = pending
        try:
            # Gone before this call was pending, so the registry's news did not reach it.
            if not self._registry.is_registered(
                lease.worker_id, lease.incarnation
            ) and await self._registry.confirm_gone(lease.worker_id, lease.incarnation):
                raise WorkerGone(lease.worker_id)
            try:
                accepted = await self._link(lease.worker_id).submit(item)
            except BatchNotDelivered:
                raise CallRejected(None) from None
            except BatchUnconfirmed:
                # It may be there: make sure it will not run before saying it did not.
                return await self._give_up(item, pending, unacknowledged=True)
            if isinstance(accepted, RejectReason):
                raise CallRejected(accepted)
            if accepted is Accepted.RUNNING:
                pending.started = True
            return await self._await_result(item, pending)
        except asyncio.CancelledError:
            # The caller stops waiting (the executor stops): the call must stop too, or a
            # retry would run it twice. One with a uniq_id is left a while first: a retry of
            # that id joins it meanwhile (or gets its result), and then it goes on for the
            # retry. The cancel goes on if this task is cancelled again.
            after_s = None if item.uniq_id is None else self._abandoned_grace_s
            stop = asyncio.ensure_future(
                self._cancel(lease.worker_id, item.item_id, after_s=after_s)
            )
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(stop), _CANCEL_REQUEST_TIMEOUT_S)
            raise
        finally:
            del self._pending[item.item_id]
            if pending.deadline is not None:
                pending.deadline.cancel()

    async def _await_result(self, item: OutgoingItem, pending: _Pending) -> ItemResult:
        # No deadline while it waits behind its trajectory's earlier calls; the worker's start
        # notice sets one (see on_result). The future itself is awaited (no shield, no timeout
        # scope): a result is one loop turn away from its caller, not two.
        pending.waiting = True
        if pending.started:
            pending.run_started()
        try:
            result = await pending.result
        finally:
            pending.waiting = False
        if result is not None:
            return result
        return await self._give_up(item, pending, unacknowledged=False)

    async def _give_up(
        self, item: OutgoingItem, pending: _Pending, *, unacknowledged: bool
    ) -> ItemResult:
        """Past its deadline, or its batch unacknowledged: cancel it on the worker, then say
        what happened. Waits as long as the worker is registered but cannot be reached."""
        while True:
            if pending.result.done() and (done := pending.result.result()) is not None:
                return done
            outcome = await self._cancel(pending.worker_id, item.item_id)
            if outcome is CancelOutcome.NOT_FOUND and unacknowledged:
                raise CallRejected(None)  # it never arrived, and now never runs
            if outcome is not None:
                return await self._after_cancel(item, pending, outcome)
            if await self._registry.confirm_gone(pending.worker_id, pending.incarnation):
                raise WorkerGone(pending.worker_id)
            # Registered but not answering: it may yet deliver.
            result = await _result_within(pending, _UNREACHABLE_RETRY_S)
            if result is not None:
                return result

    async def _after_cancel(
        self, item: OutgoingItem, pending: _Pending, outcome: CancelOutcome
    ) -> ItemResult:
        if pending.started:
            why = f"within {pending.run_s:g}s of its start (its timeout and {self._grace_s:g}s)"
        else:
            why = "in time: the worker did not acknowledge its batch"
        if outcome is not CancelOutcome.NOT_FOUND:
            # Cancelled: its (cancelled) result is on the way; finished: its result was sent.
            result = await _result_within(pending, _CANCELLED_RESULT_WAIT_S)
            cancelled = (
                result is not None and result.result and result.result.metadata.get("cancelled")
            )
            if result is not None and not cancelled:
                return result  # it finished after all
        log.warning("call given up on", worker_id=pending.worker_id, outcome=str(outcome))
        return ItemResult(
            item_id=item.item_id,
            result=infra_failure(
                f"No result from sandbox worker {pending.worker_id} {why}; "
                f"the call was {_SAID[outcome]}",
                uniq_id=item.uniq_id,
                worker_id=pending.worker_id,
                cancelled=outcome is CancelOutcome.CANCELLED,
            ),
        )

    async def _cancel(
        self, worker_id: str, item_id: str, *, after_s: float | None = None
    ) -> CancelOutcome | None:
        """The worker's word on the cancelled call, or None when it did not answer."""
        request = CancelRequest(item_ids=[item_id], after_s=after_s).model_dump_json().encode()
        try:
            msg = await nats_request(
                self._nc,
                self._subjects.worker_cancel(worker_id),
                request,
                timeout=_CANCEL_REQUEST_TIMEOUT_S,
            )
            return CancelReply.model_validate_json(msg.data).outcomes.get(item_id)
        except (NoRespondersError, NatsTimeoutError, ValueError):
            return None

    # -- what comes back ----------------------------------------------------------------------
    async def on_result(self, msg: Msg) -> None:
        """A message of results: JSON lines of ItemResult (see _result_sender.py), each read
        on its own."""
        for line in msg.data.split(b"\n"):
            try:
                item = ItemResult.model_validate_json(line)
            except ValueError:
                log.warning("ignoring a malformed result", size=len(line))
                continue
            self._take_result(item)

    def _take_result(self, item: ItemResult) -> None:
        pending = self._pending.get(item.item_id)
        if pending is None or pending.result.done():
            return
        if item.started and item.result is None and item.reply is None:
            pending.run_started()  # its run starts now: so does its deadline
            return
        pending.result.set_result(item)

    def reconnected(self) -> None:
        """This executor's connection is back: results of its calls published while it was away
        are lost. Calls that can be sent again are (SendAgain); the others wait as before."""
        for pending in self._pending.values():
            if pending.resendable and not pending.result.done():
                pending.result.set_exception(SendAgain())
                pending.result.exception()  # retrieved: a waiter may have gone already

    def _worker_gone(self, worker_id: str, incarnation: str) -> None:
        for pending in self._pending.values():
            ours = pending.worker_id == worker_id and pending.incarnation == incarnation
            if ours and not pending.result.done():
                pending.result.set_exception(WorkerGone(worker_id))
                pending.result.exception()  # retrieved: a waiter may have gone already

    # -- links --------------------------------------------------------------------------------
    def _link(self, worker_id: str) -> WorkerLink:
        link = self._links.get(worker_id)
        if link is None:
            self._drop_idle_links_of_gone_workers()
            link = self._links[worker_id] = self._make_link(worker_id)
        return link

    def _drop_idle_links_of_gone_workers(self) -> None:
        """Forget links to workers no longer registered (workers come and go over a long run),
        once nothing is queued or in flight on them. Runs when a new worker's link is made."""
        registered = {info.worker_id for info, _ in self._registry.alive()}
        for worker_id, link in list(self._links.items()):
            if link.idle and worker_id not in registered:
                del self._links[worker_id]


async def _result_within(pending: _Pending, timeout_s: float) -> ItemResult | None:
    """The call's result if it comes within ``timeout_s``, else None (the wait alone ends)."""
    try:
        return await asyncio.wait_for(asyncio.shield(pending.result), timeout_s)
    except TimeoutError:
        return None


_SAID = {
    CancelOutcome.CANCELLED: "cancelled on the worker",
    CancelOutcome.DETACHED: "left running on the worker for another request of its uniq_id",
    CancelOutcome.DEFERRED: "left running on the worker a while, for a retry of its uniq_id",
    CancelOutcome.FINISHED: "finished, but its result was lost",
    CancelOutcome.NOT_FOUND: "not found on the worker, and will not run",
}
