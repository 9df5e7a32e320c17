"""Trajectories waiting for a slot: one queue for every executor, served in arrival order.

When no worker has a free slot, the executor puts a ticket (``SlotWaiter``) in the waiting
stream, a JetStream work queue, and waits. Workers with a free slot pull tickets from it
through one shared consumer, so the first ticket in is the first served, whichever executor it
came through: the worker assigns the slot, writes the lease, and offers it to the ticket's
executor (``SlotOffer``). The executor accepts an offer only while its waiter still waits, and
decides that in one step (no ``await`` between the check and the hand-over): a waiter that gave
up (503 at ``acquire_timeout_s``), or an executor that is gone, makes the worker free the slot
again and serve the next ticket. A ticket expires with its wait (a per-message TTL), so the
stream holds exactly the trajectories waiting now.

A worker gives a free slot to a direct acquisition (a new trajectory's executor asking it,
without a ticket) only when it knows nobody waits: a newcomer must not overtake the head of the
queue. Its ``QueueView`` says what it knows; see ``_slot_offers.py`` for how it looks.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError, NotFoundError
from pydantic import ValidationError

from schemas.internal import Lease, SlotOffer, SlotOfferReply, SlotWaiter
from schemas.messages import WaitingStatus
from schemas.subjects import WAITING_STREAM, Subjects

from ._kv import ttl_header

log = structlog.get_logger("toolbus.waiting")

# A ticket outlives no wait: at most this long in the stream, whatever its own TTL says.
MAX_TICKET_AGE_S = 3600.0
_ACCEPTED = SlotOfferReply(accepted=True).model_dump_json().encode()
_DECLINED = SlotOfferReply(accepted=False).model_dump_json().encode()


async def open_waiting_stream(js: JetStreamContext, subjects: Subjects) -> None:
    """Bind to the waiting stream, creating it when missing (concurrent creators are fine); one
    made without per-message TTLs (by an operator, say, with 3 replicas) is given them."""
    config = StreamConfig(
        name=WAITING_STREAM,
        description="toolbus: trajectories waiting for a slot, first in first served",
        subjects=[subjects.waiting],
        retention=RetentionPolicy.WORK_QUEUE,
        # On disk, so that the stream (and the workers' consumer) outlive a server restart;
        # the tickets are small and expire with their waits.
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=MAX_TICKET_AGE_S,
        allow_msg_ttl=True,
    )
    try:
        info = await js.stream_info(WAITING_STREAM)
    except NotFoundError:
        await js.add_stream(config)  # the same config twice is not an error
        return
    if not info.config.allow_msg_ttl:  # made by an operator without it: tickets carry TTLs
        await js.update_stream(
            StreamConfig.from_response({**info.config.as_dict(), "allow_msg_ttl": True})
        )


class QueueLook(StrEnum):
    """What a worker's last look at the waiting queue found."""

    UNKNOWN = "unknown"  # no pull of its was open for a while: tickets may wait unseen
    EMPTY = "empty"  # no ticket waited, and its pull is open: a new one is delivered to it
    WAITING = "waiting"  # tickets waited beyond those it took


class DirectTurn(StrEnum):
    """What a direct acquisition (a newcomer, no ticket) may do with a worker's free slot."""

    TAKE = "take"  # nobody waits, and a free slot is nobody's ticket's
    QUEUE = "queue"  # waiters come first (or no slot is left): join the queue's tail
    ASK = "ask"  # a slot is free but the worker has not looked at the queue yet: wait for it


class QueueView:
    """A worker's view of the waiting queue: what its last look found, and the tickets it has
    taken that have no slot yet (``claims``). Only ``SlotOffers`` changes it, each change one
    method call with no ``await``; direct acquisitions read it (``SlotKeeper.acquire``)."""

    def __init__(self) -> None:
        self.look = QueueLook.UNKNOWN
        self.claims = 0
        self._looked = asyncio.Event()

    def unknown(self) -> None:
        """The worker stops pulling (no slot to give): tickets may queue unseen from now."""
        self.look = QueueLook.UNKNOWN
        self._looked.clear()

    def saw(self, pending: int) -> None:
        """A look found ``pending`` tickets waiting beyond those taken."""
        self.look = QueueLook.WAITING if pending > 0 else QueueLook.EMPTY
        self._looked.set()

    def claim(self, pending: int) -> None:
        """A ticket was taken (its slot is assigned later), ``pending`` more waiting after it."""
        self.claims += 1
        self.saw(pending)

    def unclaim(self) -> None:
        """A ticket taken has its slot now, or none."""
        self.claims -= 1

    def direct_turn(self, free: int) -> DirectTurn:
        """Whether a newcomer may take one of ``free`` slots now (the caller assigns it in the
        same step, no ``await`` between)."""
        if free <= self.claims or self.look is QueueLook.WAITING:
            return DirectTurn.QUEUE
        return DirectTurn.TAKE if self.look is QueueLook.EMPTY else DirectTurn.ASK

    async def looked(self, timeout_s: float) -> bool:
        """Until the worker has looked at the queue (False: not within ``timeout_s``)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._looked.wait()
        except TimeoutError:
            return False
        return True


@dataclass(slots=True)
class _Waiter:
    trajectory_id: str
    since: float  # monotonic
    offered: asyncio.Future[Lease | None]


class SlotQueue:
    """This executor's waiters in the shared waiting queue, and the offers made to them."""

    def __init__(self, nc: Client, *, subjects: Subjects, executor_id: str) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._subjects = subjects
        self._offers_subject = subjects.executor_offers(executor_id)
        self._waiters: dict[str, _Waiter] = {}  # by ticket
        self._subscription: Subscription | None = None

    @property
    def waiting(self) -> int:
        """This executor's trajectories in the queue now."""
        return len(self._waiters)

    async def start(self) -> None:
        await open_waiting_stream(self._js, self._subjects)
        self._subscription = await self._nc.subscribe(self._offers_subject, cb=self._on_offer)

    async def stop(self) -> None:
        """No more offers are taken (those that come are declined: the worker frees the slot)."""
        for waiter in self._waiters.values():
            waiter.offered.cancel()
        self._waiters.clear()
        if self._subscription is not None:
            try:
                await self._subscription.unsubscribe()
            except Exception as exc:  # the connection is gone already
                log.debug("unsubscribe failed", error=str(exc))

    async def wait(
        self, trajectory_id: str, timeout_s: float, *, image: str | None = None
    ) -> Lease | None:
        """The lease a worker offered within ``timeout_s`` (None: the trajectory got one some
        other way; read it). TimeoutError (the builtin) when no slot freed in time; a NATS
        error (``nats.errors.TimeoutError`` included) when the ticket could not be queued."""
        ticket = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        waiter = _Waiter(trajectory_id, time.monotonic(), loop.create_future())
        self._waiters[ticket] = waiter  # before the ticket is out: an offer may come at once
        try:
            now = time.time()
            message = SlotWaiter(
                ticket=ticket,
                trajectory_id=trajectory_id,
                offer_to=self._offers_subject,
                deadline=now + timeout_s,
                enqueued_at=now,
                image=image,
            )
            async with asyncio.timeout(timeout_s):
                await self._enqueue(message.model_dump_json().encode(), timeout_s)
                return await waiter.offered
        except TimeoutError:
            offered = waiter.offered
            if offered.done() and not offered.cancelled():
                return offered.result()  # accepted in the very turn the wait ran out
            raise
        finally:
            # Whatever happened, nobody waits on this ticket any more: offers are declined.
            self._waiters.pop(ticket, None)

    async def _enqueue(self, ticket: bytes, timeout_s: float) -> None:
        """Put the ticket in the stream, making the stream again if the server lost it."""
        headers = ttl_header(math.ceil(timeout_s))
        try:
            await self._js.publish(self._subjects.waiting, ticket, headers=headers)
        except NoStreamResponseError:  # a server that came back without it
            await open_waiting_stream(self._js, self._subjects)
            await self._js.publish(self._subjects.waiting, ticket, headers=headers)

    async def _on_offer(self, msg: Msg) -> None:
        try:
            offer = SlotOffer.model_validate_json(msg.data)
        except ValidationError:
            log.warning("a malformed slot offer", received=msg.data[:200])
            await msg.respond(_DECLINED)
            return
        # The check and the hand-over are one step: a waiter that timed out is not handed a slot.
        waiter = self._waiters.pop(offer.ticket, None)
        accepted = waiter is not None and not waiter.offered.done()
        if waiter is not None and accepted:
            waiter.offered.set_result(offer.lease)
            log.info(
                "slot offered to a waiter",
                trajectory_id=waiter.trajectory_id,
                waited_s=round(time.monotonic() - waiter.since, 4),
            )
        try:
            await msg.respond(_ACCEPTED if accepted else _DECLINED)
        except Exception as exc:  # the worker keeps the lease: the trajectory finds it
            log.warning("answering a slot offer failed", error=repr(exc))

    async def status(self) -> WaitingStatus:
        """The queue's length (every executor's waiters) and the first waiter's wait so far."""
        try:
            state = (await self._js.stream_info(WAITING_STREAM)).state
            if state.messages == 0:
                return WaitingStatus()
            first = await self._js.get_msg(WAITING_STREAM, seq=state.first_seq)
            oldest = SlotWaiter.model_validate_json(first.data or b"")
        except (NatsError, ValidationError):  # taken or expired meanwhile, or JetStream away
            return WaitingStatus(trajectories=self.waiting)
        return WaitingStatus(
            trajectories=state.messages,
            longest_wait_s=round(max(time.time() - oldest.enqueued_at, 0.0), 3),
        )
