"""A worker's authority over its slots: it gives them to trajectories and takes them back.

Giving: a free, clean slot is assigned (``_slots.py``), then the trajectory's lease is created
in KV with compare-and-set. If the trajectory has a lease already (another worker or executor
won the race), the slot goes back to FREE untouched; no slot is ever held without a lease.

Taking back, for four reasons, always the same way: the slot leaves its trajectory at once (so
no further call reaches it), then its lease is removed (a release) or replaced by a tombstone
that says why the workspace is lost (idle expiry, shutdown, a lost registration), then its
clean-up runs (``_slot_cleanup.py``). A release answers once the slot is clean, or after
``release_wait_s``, whichever is first; nothing it waits for can hang.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from ._leases import TOMBSTONE_TTL_S, LeaseExists, LeaseStore
from ._slot_cleanup import SlotCleaner
from ._slots import Slot, SlotState, SlotTable

log = structlog.get_logger("toolbus.worker")

KV_STEP_TIMEOUT_S = 5.0  # one lease write
OUT_OF_SERVICE_RETRY_S = 60.0  # a slot whose clean-up failed is tried again this often


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

    # -- giving -------------------------------------------------------------------------------
    async def acquire(self, trajectory_id: str) -> AcquireReply:
        """Give the trajectory a free, clean slot and write its lease (the one it has, if any)."""
        if not self.accepting:
            return AcquireReply(outcome=AcquireOutcome.STOPPING)
        held = self._table.holding(trajectory_id)
        if held is not None:
            if held.state is SlotState.ASSIGNED and held.lease is not None:
                leased = AcquireOutcome.LEASED
                return AcquireReply(outcome=leased, lease=held.lease, revision=held.lease_revision)
            return AcquireReply(outcome=AcquireOutcome.CONFLICT)  # its lease is being written
        slot = self._table.assign(trajectory_id)
        if slot is None and (dirty := self._table.claim_dirty()) is not None:
            await asyncio.shield(self._cleaner.start_wipe(dirty))  # the deferred wipe, now
            slot = self._table.assign(trajectory_id) if self.accepting else None
        if slot is None:
            return AcquireReply(outcome=AcquireOutcome.FULL)
        lease = Lease(
            worker_id=self._worker_id,
            incarnation=self._incarnation(),
            slot=slot.index,
            epoch=slot.epoch,
            acquired_at=time.time(),
        )
        try:
            revision = await self._leases.create(trajectory_id, lease, ttl_s=self.lease_ttl_s)
        except LeaseExists:
            self._table.abandon(slot)
            return AcquireReply(outcome=AcquireOutcome.CONFLICT)
        except Exception as exc:
            self._table.abandon(slot)
            log.warning("writing a lease failed", trajectory_id=trajectory_id, error=repr(exc))
            return AcquireReply(outcome=AcquireOutcome.FAILED)
        self._table.confirm(slot, lease, revision)
        log.info("slot acquired", trajectory_id=trajectory_id, slot=slot.index, epoch=slot.epoch)
        return AcquireReply(outcome=AcquireOutcome.LEASED, lease=lease, revision=revision)

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
            slot = await self._assigned(trajectory_id)
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

    async def _assigned(self, trajectory_id: str) -> Slot | None:
        """The trajectory's slot once its assignment has settled (confirmed or abandoned)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KV_STEP_TIMEOUT_S + 1):
                while (slot := self._table.holding(trajectory_id)) is not None:
                    if slot.state is not SlotState.ASSIGNING:
                        return slot
                    await asyncio.sleep(0.005)  # one KV round trip, at most a few
        return None

    def take_back(
        self, slot: Slot, lost: LostReason | None, *, wipe: bool = True
    ) -> Coroutine[Any, Any, asyncio.Task[None]]:
        """ASSIGNED → RELEASING now, in this call (so no call can slip in between the caller's
        check and the change); what it returns, awaited, removes the lease (or puts a tombstone
        in its place, ``lost``) and starts the clean-up (a lost workspace is always wiped)."""
        lease, revision = slot.lease, slot.lease_revision
        trajectory_id = self._table.begin_release(slot)
        return self._hand_back(slot, trajectory_id, lease, revision, lost, wipe or bool(lost))

    async def _hand_back(
        self,
        slot: Slot,
        trajectory_id: str,
        lease: Lease | None,
        revision: int,
        lost: LostReason | None,
        wipe: bool,
    ) -> asyncio.Task[None]:
        try:
            if lost is None or lease is None:
                # First: a call racing the release is told to look again, and finds no lease.
                removal = self._leases.remove(trajectory_id, expect=revision)
                await asyncio.wait_for(removal, KV_STEP_TIMEOUT_S)
            else:
                await self._write_tombstone(trajectory_id, lease, revision, lost)
        except Exception as exc:
            # An executor that finds the lease is told NO_SLOT, and removes it itself.
            log.warning("the lease was not updated", trajectory_id=trajectory_id, error=repr(exc))
        return self._cleaner.start_release(slot, wipe=wipe)

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
            revision = await self._write_tombstone(trajectory_id, lease, slot.lease_revision, lost)
        except Exception as exc:
            log.warning("the lease was not marked lost", slot=slot.index, error=repr(exc))
            return
        if slot.epoch == epoch:
            slot.lease_revision = revision

    async def _write_tombstone(
        self, trajectory_id: str, lease: Lease, revision: int, lost: LostReason
    ) -> int:
        tombstone = lease.model_copy(update={"lost": lost})
        write = self._leases.replace(
            trajectory_id, tombstone, expect=revision, ttl_s=TOMBSTONE_TTL_S
        )
        return await asyncio.wait_for(write, KV_STEP_TIMEOUT_S)

    async def maintain(self, period_s: float) -> None:
        """For ever: expire idle slots, retry out-of-service ones (apart from the heartbeat)."""
        timeout = self._idle_timeout_s
        period = min(period_s, timeout / 4) if timeout > 0 else period_s
        last_retry = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for slot in self._table:
                idle = now - slot.last_used
                expired = timeout > 0 and idle >= timeout
                if expired and slot.state is SlotState.ASSIGNED and not slot.tasks:
                    log.info("slot expired", trajectory_id=slot.trajectory_id, idle_s=idle)
                    # The state changes in this call: the check and the change are one step.
                    self._spawn(self.take_back(slot, LostReason.EXPIRED))
            if now - last_retry >= OUT_OF_SERVICE_RETRY_S:
                last_retry = now
                if (broken := self._table.claim_out_of_service()) is not None:
                    self._cleaner.start_release(broken, wipe=True)

    # -- lease TTLs ---------------------------------------------------------------------------
    @property
    def lease_ttl_s(self) -> float | None:
        """A lease outlives its slot's idle expiry (which replaces it with a tombstone), so the
        leases of a worker that died do not stay in KV for ever."""
        return 2 * self._idle_timeout_s if self._idle_timeout_s > 0 else None

    def on_call_start(self, slot: Slot) -> None:
        """Renew the lease's TTL once half the idle timeout has passed since it was written."""
        timeout = self._idle_timeout_s
        if timeout <= 0 or time.monotonic() - slot.lease_written_at < timeout / 2:
            return
        slot.lease_written_at = time.monotonic()  # once per half-timeout, however many calls
        self._spawn(self._refresh_lease(slot, slot.epoch))

    async def _refresh_lease(self, slot: Slot, epoch: int) -> None:
        trajectory_id, lease = slot.trajectory_id, slot.lease
        if trajectory_id is None or lease is None or slot.state is not SlotState.ASSIGNED:
            return
        try:
            revision = await self._leases.replace(
                trajectory_id, lease, expect=slot.lease_revision, ttl_s=self.lease_ttl_s
            )
        except Exception as exc:  # released meanwhile, or KV unavailable: the next call retries
            log.info("a lease's TTL was not renewed", slot=slot.index, error=repr(exc))
            slot.lease_written_at = 0.0
            return
        if slot.state is SlotState.ASSIGNED and slot.epoch == epoch:
            slot.lease_revision = revision
