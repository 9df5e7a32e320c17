"""A worker's authority over its slots: it gives them to trajectories and takes them back.

Giving: to a waiting trajectory's ticket (``_slot_offers.py``), or to a direct acquisition (a
new trajectory's executor asking this worker) only when the worker knows nobody waits
(``QueueView``; else the newcomer joins the queue's tail). A free, clean slot is assigned
(``_slots.py``), then the trajectory's lease is created in KV with compare-and-set. If the
trajectory has a lease already (another worker or executor won the race), the slot goes back
to FREE untouched; if the write failed some other way (it may have landed), the slot is cleaned
up like a released one. No slot is held without a lease.

Holding: while a slot is assigned its lease's TTL is renewed on a timer, so that a lease never
expires under a trajectory that is still working; a lease found changed or gone (an executor took
this worker for gone) means the slot is no longer the trajectory's, and it is taken back.

Taking back, for five reasons, always the same way: the slot leaves its trajectory at once (so no
further call reaches it), then its lease is removed (a release) or replaced by a tombstone that
says why the workspace is lost (idle expiry, shutdown, a lost registration), then its clean-up
runs (``_slot_cleanup.py``). A release answers once the slot is clean, or after
``release_wait_s``, whichever is first. A slot's lease writes run one at a time (its
``lease_lock``), each from the revision the last one left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from schemas.internal import (
    AcquireOutcome,
    AcquireReply,
    Lease,
    LostReason,
    WorkerReleaseReply,
)

from ._kv import RevisionMismatch
from ._leases import TOMBSTONE_TTL_S, LeaseExists, LeaseStore
from ._slot_cleanup import SlotCleaner
from ._slots import Slot, SlotState, SlotTable
from ._waiting import DirectTurn, QueueView

log = structlog.get_logger("toolbus.worker")

KV_STEP_TIMEOUT_S = 5.0  # one lease write
OUT_OF_SERVICE_RETRY_S = 60.0  # a slot whose clean-up failed is tried again this often
# A direct acquisition that finds a slot free before the worker has looked at the queue waits
# this long for the look (one JetStream round trip), then joins the queue.
QUEUE_LOOK_WAIT_S = 1.0


class SlotKeeper:
    def __init__(
        self,
        table: SlotTable,
        cleaner: SlotCleaner,
        leases: LeaseStore,
        *,
        worker_id: str,
        incarnation: Callable[[], str],
        slot_idle_timeout_s: float,
        release_wait_s: float,
        spawn: Callable[[Awaitable[object]], None],
    ) -> None:
        self._table = table
        self._cleaner = cleaner
        self._leases = leases
        self._worker_id = worker_id
        self._incarnation = incarnation
        self._idle_timeout_s = slot_idle_timeout_s
        self._release_wait_s = release_wait_s
        self._spawn = spawn
        self.accepting = False
        # Draining (an autoscaler's scale-down): no slot for a new trajectory, while calls and
        # lease renewals of the held ones go on (``accepting``).
        self.draining = False
        self.queue = QueueView()  # what the worker knows of the waiting queue

    @property
    def giving(self) -> bool:
        """Whether a new trajectory may get a slot here now."""
        return self.accepting and not self.draining

    # -- giving -------------------------------------------------------------------------------
    async def acquire(self, trajectory_id: str, image: str | None = None) -> AcquireReply:
        """A direct acquisition: give the trajectory a free, clean slot (made from ``image``,
        if given) and write its lease (the one it has, if any); FULL while trajectories wait
        for a slot (they come first)."""
        newcomer = self.giving and self._table.holding(trajectory_id) is None
        if newcomer and not await self._direct_turn():
            return AcquireReply(outcome=AcquireOutcome.FULL, slots_free=0)
        # No await since the turn was given: assign() takes the slot in this step.
        reply, _ = await self.assign(trajectory_id, image)
        return reply

    async def _direct_turn(self) -> bool:
        """Whether a newcomer may take a free slot now: nobody waits for one."""
        deadline = time.monotonic() + QUEUE_LOOK_WAIT_S
        while (turn := self.queue.direct_turn(self._table.free)) is DirectTurn.ASK:
            if not await self.queue.looked(deadline - time.monotonic()):
                return False  # no look in time (JetStream slow or away): the queue decides
        return turn is DirectTurn.TAKE

    async def assign(
        self, trajectory_id: str, image: str | None = None
    ) -> tuple[AcquireReply, bool]:
        """:meth:`acquire`, and whether the slot was assigned by this call (not held before)."""
        if not self.accepting:
            return AcquireReply(outcome=AcquireOutcome.STOPPING), False
        if (held := self._held_reply(trajectory_id)) is not None:
            return held, False
        slot = self._table.assign(trajectory_id, image) if self.giving else None
        while slot is None and self.giving and (dirty := self._table.claim_dirty()) is not None:
            await asyncio.shield(self._cleaner.start_wipe(dirty))  # the deferred wipe, now
            if (held := self._held_reply(trajectory_id)) is not None:
                return held, False  # another acquisition of it got a slot meanwhile
            # Another acquisition may have taken the slot wiped here: then wipe the next one.
            slot = self._table.assign(trajectory_id, image) if self.giving else None
        if slot is None:
            return AcquireReply(outcome=AcquireOutcome.FULL, slots_free=0), False
        return await self._lease(trajectory_id, slot), True

    async def _lease(self, trajectory_id: str, slot: Slot) -> AcquireReply:
        """Write the lease of a slot just assigned (ASSIGNING) to the trajectory."""
        lease = Lease(
            worker_id=self._worker_id,
            incarnation=self._incarnation(),
            slot=slot.index,
            epoch=slot.epoch,
            acquired_at=time.time(),
            image=slot.image,
        )
        async with slot.lease_lock:  # a release of it waits for this to settle
            try:
                revision = await self._leases.create(trajectory_id, lease, ttl_s=self.lease_ttl_s)
            except LeaseExists:
                self._table.abandon(slot)  # nothing of ours was written
                return AcquireReply(outcome=AcquireOutcome.CONFLICT)
            except BaseException as exc:
                # It may have been written, and a call may have come in: clean up, remove it.
                self._table.fail_assignment(slot)
                self._spawn(self._unassign(trajectory_id, slot, lease))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.warning("writing a lease failed", trajectory_id=trajectory_id, error=repr(exc))
                return AcquireReply(outcome=AcquireOutcome.FAILED)
            self._table.confirm(slot, lease, revision)
        log.info("slot acquired", trajectory_id=trajectory_id, slot=slot.index, epoch=slot.epoch)
        return AcquireReply(outcome=AcquireOutcome.LEASED, lease=lease, slots_free=self._table.free)

    def _held_reply(self, trajectory_id: str) -> AcquireReply | None:
        held = self._table.holding(trajectory_id)
        if held is None:
            return None
        if held.state is SlotState.ASSIGNED and held.lease is not None:
            return AcquireReply(outcome=AcquireOutcome.LEASED, lease=held.lease)
        return AcquireReply(outcome=AcquireOutcome.CONFLICT)  # its lease is being written

    async def _unassign(self, trajectory_id: str, slot: Slot, lease: Lease) -> None:
        try:
            stored = await asyncio.wait_for(self._leases.get(trajectory_id), KV_STEP_TIMEOUT_S)
            if stored is not None and stored[0].same_assignment(lease):
                await asyncio.wait_for(
                    self._leases.remove(trajectory_id, expect=stored[1]), KV_STEP_TIMEOUT_S
                )
        except Exception as exc:  # an executor that finds it is told NO_SLOT, and removes it
            log.warning(
                "a lease written in doubt stays", trajectory_id=trajectory_id, error=repr(exc)
            )
        finally:
            self._cleaner.start_release(slot, wipe=True)

    # -- taking back --------------------------------------------------------------------------
    async def release(
        self, trajectory_id: str, *, epoch: int | None, reset_workspace: bool
    ) -> WorkerReleaseReply:
        """Take the trajectory's slot back: its lease first, then its calls, sandbox and files.

        Answers once the slot is clean, or after ``release_wait_s`` with ``settled: false``
        (the clean-up goes on; the slot is handed out only when it is done)."""
        slot = self._table.holding(trajectory_id)
        if slot is not None and slot.state is SlotState.ASSIGNING:
            # Its lease is in KV (the executor read it) but the write's ack is on its way here.
            async with slot.lease_lock:
                pass
            slot = self._table.holding(trajectory_id)
        if slot is None or slot.state is not SlotState.ASSIGNED:
            return WorkerReleaseReply(released=False)
        if epoch is not None and slot.epoch != epoch:
            return WorkerReleaseReply(released=False)
        cleanup = await self.take_back(slot, None, wipe=reset_workspace)
        done, _ = await asyncio.wait({cleanup}, timeout=self._release_wait_s)
        log.info(
            "slot released", trajectory_id=trajectory_id, slot=slot.index, reset=reset_workspace
        )
        return WorkerReleaseReply(released=True, slot=slot.index, settled=bool(done))

    def release_unused(self, trajectory_id: str, epoch: int) -> bool:
        """Take back an assignment no call has reached yet (a slot offered to a waiter that
        was gone): False, and nothing changes, once one has, since the trajectory may be
        using it through another executor. A call that comes after is told NO_SLOT and its
        trajectory gets a new slot: nothing ran in this one."""
        slot = self._table.holding(trajectory_id)
        if slot is None or slot.state is not SlotState.ASSIGNED or slot.epoch != epoch:
            return False
        if slot.calls:
            return False
        # The check above and the state change in take_back() are one step (no await between).
        self._spawn(self.take_back(slot, None, wipe=True))
        return True

    def take_back(
        self, slot: Slot, lost: LostReason | None, *, wipe: bool = True, lease_ours: bool = True
    ) -> Coroutine[Any, Any, asyncio.Task[None]]:
        """ASSIGNED → RELEASING now, in this call (so no call can slip in between the caller's
        check and the change); what it returns, awaited, removes the lease (or puts a tombstone
        in its place, ``lost``; neither when not ``lease_ours``) and starts the clean-up (a lost
        workspace is always wiped)."""
        lease = slot.lease
        trajectory_id = self._table.begin_release(slot)
        update = lease if lease_ours else None
        return self._hand_back(slot, trajectory_id, update, lost, wipe or bool(lost))

    async def _hand_back(
        self,
        slot: Slot,
        trajectory_id: str,
        lease: Lease | None,
        lost: LostReason | None,
        wipe: bool,
    ) -> asyncio.Task[None]:
        try:
            if lease is not None:
                # First: a call racing the release is told to look again, and finds no lease
                # (or the tombstone that says why the workspace is gone).
                await self._write(slot, trajectory_id, lease, lost)
        except Exception as exc:
            # An executor that finds the lease is told NO_SLOT, and removes it itself.
            log.warning("the lease was not updated", trajectory_id=trajectory_id, error=repr(exc))
        finally:
            cleanup = self._cleaner.start_release(slot, wipe=wipe)
        return cleanup

    async def _write(
        self, slot: Slot, trajectory_id: str, lease: Lease, lost: LostReason | None
    ) -> Lease | None:
        """Remove the lease (``lost`` None) or tombstone it (returned), from the revision this
        worker wrote last; if that changed, again only while it is still this assignment."""
        async with slot.lease_lock:
            expect = slot.lease_revision
            for _ in range(2):
                try:
                    if lost is None:
                        removal = self._leases.remove(trajectory_id, expect=expect)
                        if await asyncio.wait_for(removal, KV_STEP_TIMEOUT_S):
                            return None
                    else:
                        tombstone = lease.model_copy(update={"lost": lost})
                        replace = self._leases.replace(
                            trajectory_id, tombstone, expect=expect, ttl_s=TOMBSTONE_TTL_S
                        )
                        slot.lease_revision = await asyncio.wait_for(replace, KV_STEP_TIMEOUT_S)
                        return tombstone
                except RevisionMismatch:
                    pass
                stored = await asyncio.wait_for(self._leases.get(trajectory_id), KV_STEP_TIMEOUT_S)
                if stored is None or not stored[0].same_assignment(lease):
                    return None  # not ours any more: nothing to update
                expect = stored[1]
        return None

    async def give_up_all(self, lost: LostReason) -> None:
        """Take every assigned slot back, its workspace lost (the registration expired)."""
        held = [slot for slot in self._table if slot.state is SlotState.ASSIGNED]
        # Every slot changes state here, before the first await.
        await asyncio.gather(*[self.take_back(slot, lost) for slot in held])

    async def mark_all_lost(self, lost: LostReason) -> None:
        """Tombstone every assigned slot's lease, the slots left as they are (a shutdown tells
        executors first, then lets running calls finish)."""
        held = [slot for slot in self._table if slot.state is SlotState.ASSIGNED]
        await asyncio.gather(*(self._tombstone(slot, lost) for slot in held))

    def end_all(self) -> None:
        """Start ending every assigned slot's sandbox (the files stay: the next start wipes)."""
        for slot in self._table:
            if slot.state is SlotState.ASSIGNED:
                self._table.begin_release(slot)
                self._cleaner.start_release(slot, wipe=False)

    async def _tombstone(self, slot: Slot, lost: LostReason) -> None:
        trajectory_id, lease, epoch = slot.trajectory_id, slot.lease, slot.epoch
        if trajectory_id is None or lease is None or slot.state is not SlotState.ASSIGNED:
            return  # released meanwhile
        try:
            tombstone = await self._write(slot, trajectory_id, lease, lost)
        except Exception as exc:
            log.warning("the lease was not marked lost", slot=slot.index, error=repr(exc))
            return
        if tombstone is not None and slot.state is SlotState.ASSIGNED and slot.epoch == epoch:
            slot.lease = tombstone  # a tombstone stays one: nothing renews it

    # -- holding ------------------------------------------------------------------------------
    async def maintain(self, period_s: float) -> None:
        """For ever: expire idle slots, renew held leases, retry out-of-service slots (apart
        from the heartbeat, which must never wait behind any of this)."""
        timeout = self._idle_timeout_s
        period = min(period_s, timeout / 4) if timeout > 0 else period_s
        last_retry = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for slot in self._table:
                if slot.state is not SlotState.ASSIGNED or slot.lease is None:
                    continue
                idle = now - slot.last_used
                if timeout > 0 and idle >= timeout and not slot.tasks:
                    log.info("slot expired", trajectory_id=slot.trajectory_id, idle_s=idle)
                    # The state changes in this call: the check and the change are one step.
                    self._spawn(self.take_back(slot, LostReason.EXPIRED))
                elif self._renewal_due(slot, now):
                    slot.lease_written_at = now  # one renewal at a time
                    self._spawn(self._renew(slot, slot.epoch))
            if now - last_retry >= OUT_OF_SERVICE_RETRY_S:
                last_retry = now
                if (broken := self._table.claim_out_of_service()) is not None:
                    self._cleaner.start_release(broken, wipe=True)

    @property
    def lease_ttl_s(self) -> float | None:
        """A lease outlives its slot's idle expiry (which replaces it with a tombstone), so the
        leases of a worker that died do not stay in KV for ever."""
        return 2 * self._idle_timeout_s if self._idle_timeout_s > 0 else None

    def _renewal_due(self, slot: Slot, now: float) -> bool:
        ttl = self.lease_ttl_s
        lease = slot.lease
        live = lease is not None and lease.lost is None  # a tombstone stays one
        return ttl is not None and live and self.accepting and now - slot.lease_written_at > ttl / 4

    async def _renew(self, slot: Slot, epoch: int) -> None:
        """The lease again, with a fresh TTL. Found changed or gone, it is no longer this slot's
        trajectory's truth: the slot is taken back."""
        async with slot.lease_lock:
            trajectory_id, lease = slot.trajectory_id, slot.lease
            if trajectory_id is None or lease is None or slot.epoch != epoch:
                return  # taken back meanwhile
            try:
                slot.lease_revision = await asyncio.wait_for(
                    self._leases.replace(
                        trajectory_id, lease, expect=slot.lease_revision, ttl_s=self.lease_ttl_s
                    ),
                    KV_STEP_TIMEOUT_S,
                )
                return
            except RevisionMismatch:
                stored = await asyncio.wait_for(self._leases.get(trajectory_id), KV_STEP_TIMEOUT_S)
            except Exception as exc:  # KV unavailable: the next round tries again
                log.info("a lease was not renewed", slot=slot.index, error=repr(exc))
                slot.lease_written_at = 0.0
                return
            if stored is not None and stored[0] == lease:
                slot.lease_revision = stored[1]  # our own write, whose ack was lost
                slot.lease_written_at = 0.0
                return
        if slot.state is SlotState.ASSIGNED and slot.epoch == epoch:
            log.warning("a held slot's lease is gone: taking the slot back", slot=slot.index)
            await self.take_back(slot, None, lease_ours=False)
