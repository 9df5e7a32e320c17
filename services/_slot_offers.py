"""A worker's free slots go to the trajectories waiting for one, first come first served.

While the worker has a free slot (FREE or DIRTY) and takes work, it keeps one pull request open
on the waiting stream's shared consumer (``_waiting.py``); every worker does, so a ticket put
in the stream reaches a worker with a free slot at once, in stream order. For each ticket the
worker assigns a slot and writes the lease as for any acquisition (``SlotKeeper``), then offers
the lease to the waiting executor:

- accepted: the ticket is done (acknowledged);
- declined, or nobody there (the waiter gave up, its executor is gone): the slot is released
  with a wipe, unless a call of the trajectory reached it meanwhile (it came back through
  another executor and found the lease), and the next ticket is served;
- no answer: the lease stays (the trajectory finds it with its next call, or it expires idle).

A ticket that finds no slot after all (a direct acquisition took it meanwhile) goes back to the
queue at once (``nak``), ahead of later tickets. A ticket whose worker died before answering it
is delivered again after the consumer's ack wait.
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
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from schemas.internal import AcquireOutcome, SlotOffer, SlotOfferReply, SlotWaiter
from schemas.subjects import WAITING_CONSUMER, WAITING_STREAM, Subjects

from ._slot_keeper import SlotKeeper
from ._waiting import open_waiting_stream

log = structlog.get_logger("toolbus.worker")

_FETCH_WAIT_S = 2.0  # one pull request's life; short, so a stopping worker leaves none behind
_OFFER_TIMEOUT_S = 2.0
_ACK_WAIT_S = 10.0  # a ticket taken by a worker that died is served again after this
_CLOCK_SKEW_S = 1.0  # a ticket past its deadline by more than this is skipped unoffered
_RETRY_AFTER_ERROR_S = 1.0


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
        self._serving: asyncio.Task[None] | None = None  # the ticket being served

    def wake(self) -> None:
        """Slots or the worker's accepting changed: look again whether to pull a ticket."""
        self._changed.set()

    def _can_serve(self) -> bool:
        return self._keeper.accepting and self._assignable() > 0

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="slot-offers")

    async def stop(self) -> None:
        """Pull no more tickets; the one being served is finished (answered or put back)."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        if self._serving is not None:
            await asyncio.gather(self._serving, return_exceptions=True)

    async def _run(self) -> None:
        """Until stopped: serve tickets while a slot is free."""
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
                while not self._can_serve():
                    self._changed.clear()
                    await self._changed.wait()
                try:
                    tickets = await pull.fetch(1, timeout=_FETCH_WAIT_S)
                except NatsTimeoutError:
                    continue  # nobody waits
                except Exception as exc:  # the server is away: try again shortly
                    log.info("pulling a waiting trajectory failed", error=repr(exc))
                    await asyncio.sleep(_RETRY_AFTER_ERROR_S)
                    continue
                for ticket in tickets:
                    # Shielded: a ticket taken is answered, or put back, even at shutdown.
                    self._serving = asyncio.create_task(self._serve(ticket))
                    await asyncio.shield(self._serving)
        finally:
            with contextlib.suppress(Exception):
                await pull.unsubscribe()

    async def _serve(self, ticket: Msg) -> None:
        try:
            waiter = SlotWaiter.model_validate_json(ticket.data)
        except ValidationError:
            log.warning("a malformed waiting ticket", received=ticket.data[:200])
            await _settle(ticket.term())
            return
        if waiter.deadline + _CLOCK_SKEW_S < time.time():
            await _settle(ticket.ack())  # nobody waits for it any more
            return
        reply, fresh = await self._keeper.assign(waiter.trajectory_id)
        if reply.outcome not in (AcquireOutcome.LEASED, AcquireOutcome.CONFLICT):
            await _settle(ticket.nak())  # no slot after all (or none now): the next worker's
            if reply.outcome is AcquireOutcome.FAILED:  # KV is away: do not spin on the ticket
                await asyncio.sleep(_RETRY_AFTER_ERROR_S)
            return
        lease = reply.lease if reply.outcome is AcquireOutcome.LEASED else None
        accepted = await self._offer(waiter, SlotOffer(ticket=waiter.ticket, lease=lease))
        await _settle(ticket.ack())
        if accepted is False and fresh and lease is not None:
            freed = self._keeper.release_unused(waiter.trajectory_id, lease.epoch)
            log.info(
                "a waiter gave up before its slot came",
                trajectory_id=waiter.trajectory_id,
                slot_freed=freed,  # else the trajectory is using it already
            )

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
                "a slot offer was not answered: the lease stays",
                trajectory_id=waiter.trajectory_id,
                error=repr(exc),
            )
            return None


async def _settle(step: Awaitable[None]) -> None:
    """An ack, nak or term; one lost is a ticket served again after the ack wait."""
    try:
        await step
    except Exception as exc:
        log.info("settling a waiting ticket failed", error=repr(exc))
