"""A worker's free slots go to the trajectories waiting for one, first come first served.

While the worker has a free slot (FREE or DIRTY) and takes work, it keeps one pull request open
on the waiting stream's shared consumer (``_waiting.py``); every worker does, so a ticket put
in the stream reaches a worker with a free slot at once, in stream order. Tickets are served
concurrently (up to ``MAX_OFFERS_AT_ONCE``, and never more than the free slots). For each
ticket the worker assigns a slot and writes the lease as for any acquisition (``SlotKeeper``),
then offers the lease to the waiting executor:

- accepted: the ticket is done (acknowledged);
- declined, or nobody there (the waiter gave up, its executor is gone): the slot is released
  with a wipe, unless a call of the trajectory reached it meanwhile (it came back through
  another executor and found the lease), and the next ticket is served;
- no answer (the executor may have taken it, its answer lost): the lease stays, and the slot is
  released as above after ``UNANSWERED_OFFER_GRACE_S`` if no call of the trajectory came.

**Newcomers queue behind waiters.** A new trajectory's executor asks a worker for a slot
directly (no queue round trip while slots are free). The worker gives one only when it knows
nobody waits, from its ``QueueView``, which only this module changes:

- a ticket taken is a claim on a free slot from that moment (before its serving task runs), so
  a direct acquisition never takes the slot a fetched ticket is about to get;
- while the worker has no slot to give it keeps no pull open, and tickets may queue unseen: the
  view is UNKNOWN. When a slot frees, the first look is a pull that answers at once (no_wait):
  up to as many tickets as it has slots to give (releases come in bursts: one look serves a
  burst, not one round trip per waiter), each saying how many wait behind it
  (``num_pending``), or "none". A direct acquisition that
  finds a free slot meanwhile waits for that answer (one JetStream round trip, on the newcomer's
  path, never the hand-off's) and then takes the slot (EMPTY) or joins the queue's tail;
- EMPTY holds while a pull of this worker is open: a ticket put in the stream then is delivered
  to it (or to another worker with a free slot). So a stale "nobody waits" lets a newcomer in
  only when the queue was empty at the time, give or take one message in flight; a stale
  "somebody waits" (WAITING, the ticket taken by another worker or expired) costs a newcomer one
  queue round trip, and the next look (no_wait again) corrects it: no slot is held back for a
  waiter that is gone.

Why here and not in the executor (a look at the queue before every direct acquisition): that
is a JetStream round trip on every new trajectory's path, and still racy, while the worker is
the one that gives the slot and learns the queue's state from its pulls anyway.

A ticket that finds no slot after all (a pull delivered it while none was free) goes back to the
head of the queue at once with a nak JetStream confirms, and the view says somebody waits. A
ticket whose worker died before answering it is delivered again after the consumer's ack wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DEFAULT_PREFIX, AckPolicy, ConsumerConfig, DeliverPolicy, Header, StatusCode
from nats.js.errors import APIError
from pydantic import ValidationError

from schemas.internal import AcquireOutcome, AcquireReply, SlotOffer, SlotOfferReply, SlotWaiter
from schemas.subjects import WAITING_CONSUMER, WAITING_STREAM, Subjects

from ._slot_keeper import SlotKeeper
from ._tasks import cancel_and_wait
from ._waiting import QueueLook, open_waiting_stream

log = structlog.get_logger("toolbus.worker")

_FETCH_WAIT_S = 2.0  # one pull request's life; short, so a stopping worker leaves none behind
_PROBE_TIMEOUT_S = 5.0  # a no_wait pull's answer (JetStream answers at once)
_NEXT_TICKET = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{WAITING_STREAM}.{WAITING_CONSUMER}"
_OFFER_TIMEOUT_S = 2.0
_ACK_WAIT_S = 10.0  # a ticket taken by a worker that died is served again after this
# A ticket past its deadline by more than this is skipped unoffered (the server expires
# tickets anyway; this only spares an offer, so it allows for clocks that disagree).
_CLOCK_SKEW_S = 30.0
# An offer that got no answer leaves the lease for this long: a call of the trajectory may come.
UNANSWERED_OFFER_GRACE_S = 60.0
_RETRY_AFTER_ERROR_S = 1.0
# Tickets served at once: offers to a slow executor must not hold up the others' slots.
MAX_OFFERS_AT_ONCE = 32


class SlotOffers:
    """Pulls waiting trajectories' tickets while a slot is free, and offers them slots."""

    def __init__(
        self,
        nc: Client,
        keeper: SlotKeeper,
        *,
        subjects: Subjects,
        assignable: Callable[[], int],
    ) -> None:
        self._nc = nc
        self._keeper = keeper
        self._subjects = subjects
        self._assignable = assignable
        self._changed = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()  # tickets being served, each on its own
        self._view = keeper.queue  # this worker's look at the queue; changed here only
        self._grace_timers: set[asyncio.TimerHandle] = set()  # unanswered offers' slots

    def wake(self) -> None:
        """Slots or the worker's accepting changed: look again whether to pull a ticket."""
        self._changed.set()

    def _can_serve(self) -> bool:
        return (
            self._keeper.giving
            and self._assignable() > self._view.claims
            and len(self._serving) < MAX_OFFERS_AT_ONCE
        )

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="slot-offers")

    async def stop(self) -> None:
        """Pull no more tickets; those being served are finished (answered or put back)."""
        if self._loop is not None:
            await cancel_and_wait([self._loop])
        for timer in self._grace_timers:  # the slots are ended with the worker anyway
            timer.cancel()
        await self.settled()

    async def settled(self) -> None:
        """Until the tickets being served now are done (a rejoin waits for their slots)."""
        await asyncio.gather(*self._serving, return_exceptions=True)

    async def _run(self) -> None:
        """Until stopped: serve tickets while a slot is free (and bind again after a failure)."""
        while True:
            try:
                await self._pull()
            except Exception as exc:  # JetStream away, or restarted: this must never end
                self._view.unknown()
                log.info("serving waiting trajectories failed; again shortly", error=repr(exc))
                await asyncio.sleep(_RETRY_AFTER_ERROR_S)

    async def _pull(self) -> None:
        js = self._nc.jetstream()
        await open_waiting_stream(js, self._subjects)
        pull = await js.pull_subscribe(
            self._subjects.waiting,
            durable=WAITING_CONSUMER,
            stream=WAITING_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=_ACK_WAIT_S,
                max_deliver=-1,
            ),
        )
        try:
            while True:
                if not self._can_serve():
                    self._view.unknown()  # no pull of ours stays open: tickets queue unseen
                    while not self._can_serve():
                        self._changed.clear()
                        await self._changed.wait()
                # Any error (the server away, or back without the stream or consumer): _run
                # binds again, making them anew if they are missing.
                if self._view.look is QueueLook.EMPTY:
                    tickets = await _long_pull(pull)
                    for ticket in tickets:
                        self._take(ticket)
                else:  # first a look that answers at once: a newcomer may be waiting for it
                    # As many tickets as slots to give: releases come in bursts, and each look
                    # is a round trip the later waiters of a burst would wait behind. (Room
                    # may shrink meanwhile: a ticket that finds no slot goes back, as below.)
                    room = self._assignable() - self._view.claims
                    room = min(room, MAX_OFFERS_AT_ONCE - len(self._serving))
                    tickets = await self._probe(max(room, 1))
                if not tickets:
                    self._view.saw(0)
        finally:
            with contextlib.suppress(Exception):
                await pull.unsubscribe()

    def _take(self, ticket: Msg) -> None:
        """A ticket in hand: claimed, and served by a task of its own, never cancelled, so it
        is answered or put back even at shutdown; offers to slow executors do not hold up
        others."""
        self._view.claim(_pending_after(ticket))
        task = asyncio.create_task(self._serve(ticket))
        self._serving.add(task)
        task.add_done_callback(self._served)

    async def _probe(self, batch: int) -> list[Msg]:
        """Up to ``batch`` tickets waiting now, else none: a pull that does not wait (no_wait),
        each ticket taken (``_take``) as it comes, so that none is left unserved if this is
        cancelled half-way. JetStream sends the tickets it has, then a status only when they
        were fewer than asked. Each pull's answers come to an inbox of its own, so that a late
        one of an earlier pull is never taken for this one's."""
        answers = await self._nc.subscribe(self._nc.new_inbox())
        try:
            request = b'{"batch":%d,"no_wait":true}' % batch
            await self._nc.publish(_NEXT_TICKET, request, reply=answers.subject)
            tickets: list[Msg] = []
            while len(tickets) < batch:
                try:
                    answer = await answers.next_msg(timeout=_PROBE_TIMEOUT_S)
                except NatsTimeoutError:
                    if tickets:  # served, not stranded until their ack wait
                        break
                    raise
                status = answer.headers.get(Header.STATUS) if answer.headers else None
                if not status:
                    tickets.append(answer)
                    self._take(answer)
                elif status in (StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT) or tickets:
                    break  # no more now
                else:
                    raise APIError.from_msg(answer)
            return tickets
        finally:
            with contextlib.suppress(Exception):
                await answers.unsubscribe()

    def _served(self, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("serving a waiting trajectory failed", error=repr(exc))
        self.wake()

    async def _serve(self, ticket: Msg) -> None:
        try:
            taken = await self._take_slot(ticket)
        finally:
            self._view.unclaim()  # it has its slot now, or none
            self.wake()
        if taken is None:
            return
        waiter, reply, fresh = taken
        lease = reply.lease if reply.outcome is AcquireOutcome.LEASED else None
        accepted = await self._offer(waiter, SlotOffer(ticket=waiter.ticket, lease=lease))
        if fresh and lease is not None and accepted is False:
            self._free_unused(waiter.trajectory_id, lease.epoch)  # before the ack: then it is
        elif fresh and lease is not None and accepted is None:
            # Taken, maybe, with the answer lost: if no call comes within the grace, it was not.
            handle = asyncio.get_running_loop().call_later(
                UNANSWERED_OFFER_GRACE_S, self._free_unused, waiter.trajectory_id, lease.epoch
            )
            self._grace_timers.add(handle)
        await _settle(ticket.ack())

    def _free_unused(self, trajectory_id: str, epoch: int) -> None:
        now = asyncio.get_running_loop().time()  # the timers that fired are dropped
        self._grace_timers = {timer for timer in self._grace_timers if timer.when() > now}
        freed = self._keeper.release_unused(trajectory_id, epoch)
        log.info(
            "a waiter gave up before its slot came",
            trajectory_id=trajectory_id,
            slot_freed=freed,  # else the trajectory is using it already
        )

    async def _take_slot(self, ticket: Msg) -> tuple[SlotWaiter, AcquireReply, bool] | None:
        """The ticket's waiter and the slot assigned to it; None when the ticket is settled
        without one (malformed, past its deadline, or put back: no slot now)."""
        try:
            waiter = SlotWaiter.model_validate_json(ticket.data)
        except ValidationError:
            log.warning("a malformed waiting ticket", received=ticket.data[:200])
            await _settle(ticket.term())
            return None
        if not self._subjects.is_executor_offers(waiter.offer_to):
            log.warning("a waiting ticket with a bad offers subject", received=waiter.offer_to)
            await _settle(ticket.term())
            return None
        if waiter.deadline + _CLOCK_SKEW_S < time.time():
            await _settle(ticket.ack())  # nobody waits for it any more
            return None
        reply, fresh = await self._keeper.assign(waiter.trajectory_id, waiter.image)
        if reply.outcome not in (AcquireOutcome.LEASED, AcquireOutcome.CONFLICT):
            await self._put_back(ticket)  # no slot after all (or none now): the next worker's
            if reply.outcome is AcquireOutcome.FAILED:  # KV is away: do not spin on the ticket
                await asyncio.sleep(_RETRY_AFTER_ERROR_S)
            return None
        return waiter, reply, fresh

    async def _put_back(self, ticket: Msg) -> None:
        """The ticket back at the head of the queue, and known to wait: a nak that JetStream
        confirms (a plain one is applied a little later, and a look meanwhile finds the queue
        empty, or later tickets first)."""
        try:
            await self._nc.request(ticket.reply, b"-NAK", timeout=_OFFER_TIMEOUT_S)
        except Exception as exc:  # served again after the ack wait
            log.info("putting a waiting ticket back failed", error=repr(exc))
        self._view.saw(1)  # it waits, whatever this worker's last look found

    async def _offer(self, waiter: SlotWaiter, offer: SlotOffer) -> bool | None:
        """Whether the waiting executor took the slot; None when it did not answer."""
        try:
            answer = await self._nc.request(
                waiter.offer_to, offer.model_dump_json().encode(), timeout=_OFFER_TIMEOUT_S
            )
            return SlotOfferReply.model_validate_json(answer.data).accepted
        except NoRespondersError:
            return False  # its executor is gone
        except (NatsTimeoutError, ValidationError) as exc:
            log.warning(
                "a slot offer was not answered: the lease stays a while",
                trajectory_id=waiter.trajectory_id,
                error=repr(exc),
            )
            return None
        except Exception as exc:  # it never left (a bad subject, the connection closing)
            log.warning("a slot offer failed", trajectory_id=waiter.trajectory_id, error=repr(exc))
            return False


async def _long_pull(pull: JetStreamContext.PullSubscription) -> list[Msg]:
    """The next ticket, waiting for one to come for ``_FETCH_WAIT_S``."""
    try:
        return await pull.fetch(1, timeout=_FETCH_WAIT_S)
    except NatsTimeoutError:
        return []  # nobody came


def _pending_after(ticket: Msg) -> int:
    """Tickets waiting behind this one when it was delivered (one, when that is unknown)."""
    try:
        return ticket.metadata.num_pending
    except Exception:  # not a JetStream delivery: assume a waiter, the next look tells
        return 1


async def _settle(step: Awaitable[None]) -> None:
    """An ack, nak or term; one lost is a ticket served again after the ack wait."""
    try:
        await step
    except Exception as exc:
        log.info("settling a waiting ticket failed", error=repr(exc))
