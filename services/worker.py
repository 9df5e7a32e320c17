"""The sandbox worker: N slots, one workspace each, running the calls executors send it.

The worker is the one authority on its slots: it assigns a slot to a trajectory and writes the
trajectory's lease (``_slots.py`` holds the states; ``_leases.py`` the lease), runs the calls of
that assignment (``_slot_calls.py``), and takes the slot back (``_slot_cleanup.py``): on
release, when the slot sat idle for ``slot_idle_timeout_s``, or when the worker itself has to
give up its slots. Its registration (``_registration.py``) expires unless refreshed, and that is
how executors learn it is gone.

Lifecycle (``async with SandboxWorker(...)``): enter prepares the workspaces, registers and
subscribes; exit stops taking calls and slots, marks its leases lost (so executors know at once),
waits for running calls up to ``drain_timeout_s``, cancels the rest, ends every sandbox, and
deregisters. Every step has a deadline, so SIGTERM always ends a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel

from schemas.internal import (
    AcquireOutcome,
    AcquireReply,
    AcquireRequest,
    CancelRequest,
    Lease,
    LostReason,
    WorkerInfo,
    WorkerReleaseReply,
    WorkerReleaseRequest,
)
from schemas.subjects import LEASES_BUCKET, WORKERS_BUCKET

from ._artifacts import ArtifactRunner
from ._cgroups import CgroupProbe, PidsCgroups
from ._diskguard import DiskGuard
from ._kv import KvBucket, open_bucket
from ._leases import TOMBSTONE_TTL_S, LeaseExists, LeaseStore
from ._registration import (
    WORKER_MARKER_TTL_S,
    RegistrationLost,
    WorkerRegistration,
    registration_ttl_s,
)
from ._sandbox import SandboxFactory
from ._slot_calls import SlotCalls
from ._slot_cleanup import SlotCleaner
from ._slots import Slot, SlotState, SlotTable
from ._tools import SlotTools, ToolLimits, ToolRunner
from ._worker_config import WorkerConfig

__all__ = ["SandboxWorker", "WorkerConfig", "new_worker_id"]

log = structlog.get_logger("toolbus.worker")

_ANNOUNCE_DELAY_S = 0.05  # a burst of slot changes becomes one registration write
_OUT_OF_SERVICE_RETRY_S = 60.0
_STEP_TIMEOUT_S = 5.0  # each KV write and hand-over step of a shutdown


def new_worker_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:8]}".replace("_", "-")


class SandboxWorker:
    def __init__(self, nc: Client, config: WorkerConfig) -> None:
        self._nc = nc
        self._config = config
        self._disk_guard = DiskGuard(config.workspace_root, min_free_mb=config.min_free_disk_mb)
        self._cgroup_probe = (
            PidsCgroups.create(config.worker_id)
            if config.pids_cgroup
            else CgroupProbe(None, "pids_cgroup is off")
        )
        self._cgroups = self._cgroup_probe.cgroups
        self._sandboxes = SandboxFactory(
            allow_network=config.allow_network,
            require_sandbox=config.require_sandbox,
            limits=config.limits,
            cgroups=self._cgroups,
            uid_base=config.sandbox_uid_base,
        )
        self._artifacts = ArtifactRunner(
            nc.jetstream(),
            scratch=config.workspace_root / ".scratch",
            bucket=config.artifacts_bucket,
            ttl_s=config.artifacts_ttl_s,
            limits=config.artifact_limits,
        )
        self._table = SlotTable(on_change=self._announce_change)
        self._cleaner = SlotCleaner(self._table)
        self._calls = SlotCalls(
            nc,
            self._table,
            worker_id=config.worker_id,
            tools=ToolRunner(
                limits=ToolLimits(
                    max_output_chars=config.max_output_chars,
                    max_file_chars=config.max_file_chars,
                ),
                disk_guard=self._disk_guard,
            ),
            artifacts=self._artifacts,
            on_call_start=self._refresh_lease_soon,
        )
        js = nc.jetstream()
        self._leases = LeaseStore(KvBucket(js, LEASES_BUCKET))
        self._registration = WorkerRegistration(
            KvBucket(js, WORKERS_BUCKET),
            config.worker_id,
            ttl_s=registration_ttl_s(config.heartbeat_s),
        )
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()  # request handlers and lease writes
        self._loops: list[asyncio.Task[None]] = []
        self._announce_soon: asyncio.TimerHandle | None = None
        self._started_at = time.time()
        self._accepting = False

    @property
    def worker_id(self) -> str:
        return self._config.worker_id

    @property
    def process_limit(self) -> str:
        """How ``max_processes`` is enforced on this worker's slots."""
        return self._sandboxes.process_limit

    @property
    def slots_free(self) -> int:
        return self._table.free

    @property
    def calls_completed(self) -> int:
        return self._calls.calls_completed

    def slot_states(self) -> dict[str, int]:
        return {state: self._table.count(state) for state in SlotState}

    def workspace_of(self, index: int) -> Path:
        """The host directory of slot ``index`` (for operators and tests)."""
        return next(slot.workspace for slot in self._table if slot.index == index)

    async def wait_settled(self) -> None:
        """Until every released slot is clean (or out of service)."""
        await self._cleaner.wait_settled()

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> SandboxWorker:
        root = self._config.workspace_root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o711)  # sandbox users pass through to their own slot; they cannot list it
        try:
            # Fails closed here when require_sandbox is set and bubblewrap cannot run.
            await self._sandboxes.probe(root / ".probe")
        except BaseException:
            if self._cgroups is not None:
                await self._cgroups.remove()
            raise
        self._warn_about_setup()
        for index in range(self._config.slots):
            workspace = root / f"slot_{index}"
            workspace.mkdir(parents=True, exist_ok=True)
            workspace = workspace.resolve()  # once, not on every file call
            sandbox = self._sandboxes.make(index, workspace)
            offline = functools.partial(self._sandboxes.make_offline, index, workspace)
            tools = SlotTools.for_sandbox(sandbox, offline)
            # What a previous process of this worker id left is nobody's now: wiped first.
            self._table.add(Slot(index, workspace, tools, state=SlotState.WIPING))
        await asyncio.gather(*(self._cleaner.start_wipe(slot) for slot in self._table))
        js = self._nc.jetstream()
        await open_bucket(
            js,
            WORKERS_BUCKET,
            description="toolbus sandbox workers",
            marker_ttl_s=WORKER_MARKER_TTL_S,
        )
        await open_bucket(js, LEASES_BUCKET, description="toolbus trajectory leases")
        await self._artifacts.start()
        wid = self.worker_id
        subjects = self._config.subjects
        for subject, handler in (
            (subjects.worker_batch(wid), self._on_batch),
            (subjects.worker_acquire(wid), self._handled(self._on_acquire)),
            (subjects.worker_release(wid), self._handled(self._on_release)),
            (subjects.worker_cancel(wid), self._on_cancel),
        ):
            self._subscriptions.append(await self._nc.subscribe(subject, cb=handler))
        await self._nc.flush()
        self._accepting = self._calls.accepting = True
        await self._registration.register(self.info)
        self._loops = [
            asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat-{wid}"),
            asyncio.create_task(self._maintenance_loop(), name=f"slot-maintenance-{wid}"),
        ]
        log.info(
            "worker started",
            worker_id=wid,
            slots=len(self._table),
            workspace_root=str(root),
            sandboxed=self._sandboxes.sandboxed,
            network_isolated=self._sandboxes.sandboxed and not self._config.allow_network,
            process_limit=self._sandboxes.process_limit,
            no_pids_cgroup_because=self._cgroup_probe.reason or None,
            runs_as=self._sandboxes.identity,
            registration_ttl_s=self._registration.ttl_s,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # 1. stop taking calls and slots; let acquisitions under way finish their lease write.
        self._accepting = self._calls.accepting = False
        await _bounded(self._other_tasks(), _STEP_TIMEOUT_S)
        # 2. tell executors at once: every workspace of this worker is about to be lost.
        held = [slot for slot in self._table if slot.state is SlotState.ASSIGNED]
        await _bounded(
            asyncio.gather(*(self._tombstone(slot, LostReason.WORKER_STOPPED) for slot in held)),
            _STEP_TIMEOUT_S,
        )
        # 3. wait for running calls, 4. then cancel what is left (their processes are killed).
        running = self._calls.running
        if running:
            _, pending = await asyncio.wait(running, timeout=self._config.drain_timeout_s)
            for task in pending:
                task.cancel()
            await _bounded(asyncio.gather(*pending, return_exceptions=True), _STEP_TIMEOUT_S)
        # 5. end every sandbox and what still runs in it (the next start wipes the files).
        for slot in self._table:
            if slot.state is SlotState.ASSIGNED:
                self._table.begin_release(slot)
                self._cleaner.start_release(slot, wipe=False)
        await self._cleaner.close(self._config.drain_timeout_s)
        # 6. stop beating, deregister, unsubscribe.
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._announce_soon:
            self._announce_soon.cancel()
        if self._nc.is_connected:
            await _bounded(self._registration.deregister(), _STEP_TIMEOUT_S)
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subscriptions.clear()
        await self._disk_guard.close()
        if self._cgroups is not None:
            await self._cgroups.remove()
        log.info("worker stopped", worker_id=self.worker_id)

    def _warn_about_setup(self) -> None:
        if not self._sandboxes.sandboxed:
            log.warning(
                "commands run WITHOUT a sandbox: results say sandboxed=false",
                reason=self._sandboxes.reason_unsandboxed,
                network_isolated=False,
            )
        if self._disk_guard.free_bytes() < self._config.min_free_disk_mb * 1024 * 1024:
            log.warning(
                "the workspaces' disk is already below min_free_disk_mb: commands will be stopped",
                free_mb=self._disk_guard.free_bytes() // (1024 * 1024),
                min_free_disk_mb=self._config.min_free_disk_mb,
            )
        if self._sandboxes.sandboxed and self._sandboxes.reason_not_separate_user:
            log.warning(
                "sandboxes run as root, not as separate users: make the workspace directory "
                "reachable by other users (e.g. under /var/lib/toolbus)",
                reason=self._sandboxes.reason_not_separate_user,
            )

    # -- registration -------------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            slots_total=len(self._table),
            slots_free=self._table.free if self._accepting else 0,
            slots_out_of_service=self._table.count(SlotState.OUT_OF_SERVICE),
            started_at=self._started_at,
            updated_at=time.time(),
            heartbeat_s=self._config.heartbeat_s,
            incarnation=self._registration.incarnation,
            ttl_s=self._registration.ttl_s,
        )

    def _announce_change(self) -> None:
        """Publish free slots soon, coalescing a burst of acquires/releases into one write."""
        if self._announce_soon is None and self._accepting:
            loop = asyncio.get_running_loop()
            self._announce_soon = loop.call_later(_ANNOUNCE_DELAY_S, self._fire_announce)

    def _fire_announce(self) -> None:
        self._announce_soon = None
        self._spawn(self._beat())

    async def _heartbeat_loop(self) -> None:
        # Nothing else happens here: a beat must never wait behind slow slot work.
        while True:
            await asyncio.sleep(self._config.heartbeat_s)
            await self._beat()

    async def _beat(self) -> None:
        try:
            await self._registration.refresh(self.info)
        except RegistrationLost:
            await self._rejoin()
        except Exception as exc:  # a missed beat is logged; the next one retries
            log.warning("heartbeat failed", worker_id=self.worker_id, error=str(exc))

    async def _rejoin(self) -> None:
        """The registration expired while this worker could not beat: every executor has taken
        its workspaces as lost. Give the slots up, then register as a new incarnation."""
        if not self._accepting:
            return
        log.error("registration expired: giving up every slot and registering anew")
        self._accepting = False
        try:
            await self._other_tasks()  # acquisitions under way finish first
            held = [slot for slot in self._table if slot.state is SlotState.ASSIGNED]
            # Every slot changes state here, before the first await.
            await asyncio.gather(*[self._take_back(s, LostReason.WORKER_EXPIRED) for s in held])
            await self._registration.register(self.info)
        finally:
            self._accepting = True
        self._announce_change()

    async def _other_tasks(self) -> None:
        """Until the request handlers and lease writes running now (but the caller) are done."""
        others = [task for task in self._tasks if task is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)

    # -- requests -----------------------------------------------------------------------------
    def _handled(
        self, handler: Callable[[Msg], Awaitable[BaseModel]]
    ) -> Callable[[Msg], Awaitable[None]]:
        """A request answered from a task of its own: nats-py runs one callback of a
        subscription at a time, and a slow release must not hold back the next one."""

        async def on_request(msg: Msg) -> None:
            async def answer() -> None:
                reply = await handler(msg)
                await msg.respond(reply.model_dump_json().encode())

            self._spawn(answer())

        return on_request

    def _spawn(self, work: Awaitable[object]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("worker task failed")

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_batch(self, msg: Msg) -> None:
        ack = self._calls.take_batch(msg.data, msg.subject, msg.headers)
        await msg.respond(ack.model_dump_json().encode())

    async def _on_cancel(self, msg: Msg) -> None:
        reply = self._calls.cancel(CancelRequest.model_validate_json(msg.data).item_ids)
        await msg.respond(reply.model_dump_json().encode())

    async def _on_acquire(self, msg: Msg) -> AcquireReply:
        return await self.acquire(AcquireRequest.model_validate_json(msg.data).trajectory_id)

    async def _on_release(self, msg: Msg) -> WorkerReleaseReply:
        request = WorkerReleaseRequest.model_validate_json(msg.data)
        return await self.release(
            request.trajectory_id, epoch=request.epoch, reset_workspace=request.reset_workspace
        )

    # -- slots --------------------------------------------------------------------------------
    async def acquire(self, trajectory_id: str) -> AcquireReply:
        """Give the trajectory a free, clean slot and write its lease (the one it has, if any)."""
        if not self._accepting:
            return AcquireReply(outcome=AcquireOutcome.STOPPING)
        held = self._table.holding(trajectory_id)
        if held is not None:
            if held.state is SlotState.ASSIGNED:
                return AcquireReply(
                    outcome=AcquireOutcome.LEASED,
                    lease=self._lease(held),
                    revision=held.lease_revision,
                )
            return AcquireReply(outcome=AcquireOutcome.CONFLICT)  # its lease is being written
        slot = self._table.assign(trajectory_id)
        if slot is None and (dirty := self._table.claim_dirty()) is not None:
            await asyncio.shield(self._cleaner.start_wipe(dirty))  # the deferred wipe, now
            slot = self._table.assign(trajectory_id) if self._accepting else None
        if slot is None:
            return AcquireReply(outcome=AcquireOutcome.FULL)
        lease = self._lease(slot)
        try:
            revision = await self._leases.create(trajectory_id, lease, ttl_s=self._lease_ttl_s)
        except LeaseExists:
            self._table.abandon(slot)
            return AcquireReply(outcome=AcquireOutcome.CONFLICT)
        except Exception as exc:
            self._table.abandon(slot)
            log.warning("writing a lease failed", trajectory_id=trajectory_id, error=repr(exc))
            return AcquireReply(outcome=AcquireOutcome.FAILED)
        self._table.confirm(slot, revision)
        log.info("slot acquired", trajectory_id=trajectory_id, slot=slot.index, epoch=slot.epoch)
        return AcquireReply(outcome=AcquireOutcome.LEASED, lease=lease, revision=revision)

    async def release(
        self, trajectory_id: str, *, epoch: int | None = None, reset_workspace: bool
    ) -> WorkerReleaseReply:
        """Take the trajectory's slot back: its lease first, then its calls, sandbox and files.

        Answers once the slot is clean, or after ``release_wait_s`` with ``settled: false``
        (the clean-up goes on; the slot is handed out only when it is done)."""
        slot = self._table.holding(trajectory_id)
        if slot is None or slot.state is not SlotState.ASSIGNED:
            return WorkerReleaseReply(released=False)
        if epoch is not None and slot.epoch != epoch:
            return WorkerReleaseReply(released=False)
        cleanup = await self._take_back(slot, None, wipe=reset_workspace)
        done, _ = await asyncio.wait({cleanup}, timeout=self._config.release_wait_s)
        log.info(
            "slot released", trajectory_id=trajectory_id, slot=slot.index, reset=reset_workspace
        )
        return WorkerReleaseReply(released=True, slot=slot.index, settled=bool(done))

    def _take_back(
        self, slot: Slot, lost: LostReason | None, *, wipe: bool = True
    ) -> Coroutine[Any, Any, asyncio.Task[None]]:
        """ASSIGNED → RELEASING now, in this call (so no call can slip in between the caller's
        check and the change); what it returns, awaited, removes the lease (or puts a tombstone
        in its place, ``lost``) and starts the clean-up (a lost workspace is always wiped)."""
        epoch, revision = slot.epoch, slot.lease_revision
        trajectory_id = self._table.begin_release(slot)
        return self._hand_back(slot, trajectory_id, epoch, revision, lost, wipe or bool(lost))

    async def _hand_back(
        self,
        slot: Slot,
        trajectory_id: str,
        epoch: int,
        revision: int,
        lost: LostReason | None,
        wipe: bool,
    ) -> asyncio.Task[None]:
        try:
            if lost is None:
                # First: a call racing the release is told to look again, and finds no lease.
                removal = self._leases.remove(trajectory_id, expect=revision)
                await asyncio.wait_for(removal, _STEP_TIMEOUT_S)
            else:
                await self._write_tombstone(trajectory_id, slot, epoch, revision, lost)
        except Exception as exc:
            # An executor that finds the lease is told NO_SLOT, and removes it itself.
            log.warning("the lease was not updated", trajectory_id=trajectory_id, error=repr(exc))
        return self._cleaner.start_release(slot, wipe=wipe)

    async def _tombstone(self, slot: Slot, lost: LostReason) -> None:
        """Mark an assigned slot's lease lost, leaving the slot as it is (for a shutdown)."""
        trajectory_id, epoch = slot.trajectory_id, slot.epoch
        if trajectory_id is None or slot.state is not SlotState.ASSIGNED:
            return  # released meanwhile
        try:
            revision = await self._write_tombstone(
                trajectory_id, slot, epoch, slot.lease_revision, lost
            )
        except Exception as exc:
            log.warning("the lease was not marked lost", slot=slot.index, error=repr(exc))
            return
        if slot.epoch == epoch:
            slot.lease_revision = revision

    async def _write_tombstone(
        self, trajectory_id: str, slot: Slot, epoch: int, revision: int, lost: LostReason
    ) -> int:
        tombstone = self._lease(slot, epoch=epoch).model_copy(update={"lost": lost})
        write = self._leases.replace(
            trajectory_id, tombstone, expect=revision, ttl_s=TOMBSTONE_TTL_S
        )
        return await asyncio.wait_for(write, _STEP_TIMEOUT_S)

    async def _maintenance_loop(self) -> None:
        """Expire idle slots and retry out-of-service ones, apart from the heartbeat."""
        timeout = self._config.slot_idle_timeout_s
        period = min(self._config.heartbeat_s, timeout / 4) if timeout > 0 else 1.0
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
                    self._spawn(self._take_back(slot, LostReason.EXPIRED))
            if now - last_retry >= _OUT_OF_SERVICE_RETRY_S:
                last_retry = now
                if (broken := self._table.claim_out_of_service()) is not None:
                    self._cleaner.start_release(broken, wipe=True)

    # -- leases -------------------------------------------------------------------------------
    def _lease(self, slot: Slot, *, epoch: int | None = None) -> Lease:
        return Lease(
            worker_id=self.worker_id,
            incarnation=self._registration.incarnation,
            slot=slot.index,
            epoch=slot.epoch if epoch is None else epoch,
            acquired_at=time.time(),
        )

    @property
    def _lease_ttl_s(self) -> float | None:
        """A lease outlives its slot's idle expiry (which replaces it with a tombstone), so the
        leases of a worker that died do not stay in KV for ever."""
        timeout = self._config.slot_idle_timeout_s
        return 2 * timeout if timeout > 0 else None

    def _refresh_lease_soon(self, slot: Slot) -> None:
        """When a call starts: renew the lease's TTL once half the idle timeout has passed."""
        timeout = self._config.slot_idle_timeout_s
        if timeout <= 0 or time.monotonic() - slot.lease_written_at < timeout / 2:
            return
        slot.lease_written_at = time.monotonic()  # once per half-timeout, however many calls
        self._spawn(self._refresh_lease(slot, slot.epoch))

    async def _refresh_lease(self, slot: Slot, epoch: int) -> None:
        trajectory_id = slot.trajectory_id
        if trajectory_id is None or slot.state is not SlotState.ASSIGNED or slot.epoch != epoch:
            return
        try:
            revision = await self._leases.replace(
                trajectory_id,
                self._lease(slot),
                expect=slot.lease_revision,
                ttl_s=self._lease_ttl_s,
            )
        except Exception as exc:  # released meanwhile, or KV unavailable: the next call retries
            log.info("a lease's TTL was not renewed", slot=slot.index, error=repr(exc))
            slot.lease_written_at = 0.0
            return
        if slot.state is SlotState.ASSIGNED and slot.epoch == epoch:
            slot.lease_revision = revision


async def _bounded(work: Awaitable[object], timeout_s: float) -> None:
    """A shutdown step: given up after ``timeout_s``, logged, never raised."""
    try:
        await asyncio.wait_for(work, timeout_s)
    except Exception as exc:
        log.warning("a shutdown step did not finish", error=repr(exc) or type(exc).__name__)
