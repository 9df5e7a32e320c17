"""The sandbox worker: N slots, one workspace each, running the calls executors send it.

The worker is the one authority on its slots (``_slots.py`` holds their states). It gives a
slot to a trajectory and writes the trajectory's lease, and takes the slot back on release,
after ``slot_idle_timeout_s`` without a call, or when it has to give up its slots
(``_slot_keeper.py``); it runs the calls of each assignment (``_slot_calls.py``) and cleans a
slot before anyone else gets it (``_slot_cleanup.py``). What it answers on NATS (batches,
acquire, release, cancel) is ``_worker_endpoints.py``. Its registration (``_registration.py``)
expires unless refreshed, and that is how executors learn it is gone.

Lifecycle (``async with SandboxWorker(...)``): enter prepares the workspaces, registers and
subscribes; exit stops taking calls and slots, marks its leases lost (so executors know at once),
waits for running calls up to ``drain_timeout_s``, cancels the rest, ends every sandbox, and
deregisters. Every step has a deadline, so SIGTERM always ends a worker.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from types import TracebackType

import structlog
from nats.aio.client import Client

from schemas.internal import LostReason, WorkerInfo
from schemas.subjects import LEASES_BUCKET, WORKERS_BUCKET

from ._artifacts import ArtifactRunner
from ._call_runs import RunsById
from ._cgroups import CgroupProbe, PidsCgroups
from ._diskguard import DiskGuard
from ._fd_limits import check_fd_limit
from ._image_slots import ImageSlots
from ._image_store import ImageStore
from ._kv import KvBucket, open_bucket
from ._leases import LeaseStore
from ._leftovers import AliveLock, clean_dead_workers
from ._reconnects import ReconnectClock
from ._registration import (
    WORKER_MARKER_TTL_S,
    Heartbeat,
    WorkerRegistration,
    registration_ttl_s,
)
from ._sandbox import SandboxFactory
from ._slot_calls import SlotCalls
from ._slot_cleanup import SlotCleaner
from ._slot_keeper import SlotKeeper
from ._slot_offers import SlotOffers
from ._slots import Slot, SlotState, SlotTable
from ._tasks import cancel_and_wait, finish_or_cancel
from ._tools import SlotTools, ToolLimits, ToolRunner
from ._warm_pool import WarmPool
from ._worker_config import WorkerConfig
from ._worker_drain import WorkerDrain
from ._worker_endpoints import WorkerEndpoints

__all__ = ["SandboxWorker", "WorkerConfig", "new_worker_id"]

log = structlog.get_logger("toolbus.worker")

_STEP_TIMEOUT_S = 5.0  # each KV write and hand-over step of a shutdown


def new_worker_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:8]}".replace("_", "-")


class SandboxWorker:
    def __init__(self, nc: Client, config: WorkerConfig) -> None:
        self._nc = nc
        self._config = config
        self._disk_guard = DiskGuard(config.workspace_root, min_free_mb=config.min_free_disk_mb)
        self._alive = AliveLock(config.workspace_root)
        self._leftovers: asyncio.Task[list[str]] | None = None  # of dead workers, cleaned
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
            users=config.slots + config.spare_slots,
        )
        self._artifacts = ArtifactRunner(
            nc.jetstream(),
            scratch=config.workspace_root / ".scratch",
            bucket=config.artifacts_bucket,
            ttl_s=config.artifacts_ttl_s,
            limits=config.artifact_limits,
        )
        self._table = SlotTable(
            on_change=self._announce_change,
            warm=lambda: self._warm.pick(),
            capacity=config.slots,  # and spare_slots more, kept free for the next trajectory
        )
        # A draining worker is about to stop: a slot it frees stays cold.
        self._warm = WarmPool(
            self._table, size=config.warm_slots, paused=lambda: self._keeper.draining
        )
        runs = RunsById(window_s=config.retry_window_s, max_bytes=config.retry_memory_bytes)
        self._image_store = ImageStore(
            config.workspace_root / "images",
            max_bytes=config.image_cache_mb * 1024 * 1024,
            auth_file=config.registry_auth_file,
            insecure_registries=config.insecure_registries,
        )
        images = ImageSlots(
            self._image_store, self._sandboxes, overlays=config.workspace_root / "overlays"
        )
        self._cleaner = SlotCleaner(
            self._table, assignment_ended=runs.forget_assignment, images=images
        )
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
            runs=runs,
            images=images,
        )
        js = nc.jetstream()
        self._registration = WorkerRegistration(
            KvBucket(js, WORKERS_BUCKET),
            config.worker_id,
            ttl_s=registration_ttl_s(config.heartbeat_s),
        )
        self._keeper = SlotKeeper(
            self._table,
            self._cleaner,
            LeaseStore.on(js),
            worker_id=config.worker_id,
            incarnation=lambda: self._registration.incarnation,
            slot_idle_timeout_s=config.slot_idle_timeout_s,
            release_wait_s=config.release_wait_s,
            spawn=self._spawn,
        )
        self._drain = WorkerDrain(
            self._keeper, self._table, worker_id=config.worker_id, changed=self._announce_change
        )
        self._offers = SlotOffers(
            nc,
            self._keeper,
            subjects=config.subjects,
            assignable=lambda: self._table.free,
        )
        self._endpoints = WorkerEndpoints(
            nc,
            subjects=config.subjects,
            worker_id=config.worker_id,
            calls=self._calls,
            keeper=self._keeper,
            drain=self._drain.request,
            spawn=self._spawn,
        )
        self._heartbeat = Heartbeat(
            self._registration,
            heartbeat_s=config.heartbeat_s,
            info=self.info,
            rejoin=self._rejoin,
            spawn=self._spawn,
        )
        self._tasks: set[asyncio.Task[None]] = set()  # request handlers and lease writes
        self._loops: list[asyncio.Task[None]] = []
        self._started_at = time.time()
        self._connection = ReconnectClock(nc)
        self._connection.on_reconnect(self._heartbeat.soon)
        self._stopping = False  # once set, nothing (a rejoin included) takes work again
        self._rejoining = False

    @property
    def _accepting(self) -> bool:
        """Whether the worker takes new slots and calls (one switch for both)."""
        return self._keeper.accepting

    @_accepting.setter
    def _accepting(self, value: bool) -> None:
        self._keeper.accepting = self._calls.accepting = value
        self._offers.wake()

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

    async def wait_warmed(self) -> None:
        """Until no warm start runs and none is due now."""
        await self._warm.wait_settled()

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> SandboxWorker:
        slots = self._config.slots + self._config.spare_slots
        # Raised to the hard limit; warns if still short.
        check_fd_limit(self._config.slots, self._config.spare_slots)
        root = self._config.workspace_root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o711)  # sandbox users pass through to their own slot; they cannot list it
        # First: nothing of a worker of the same id that runs here may be touched.
        self._alive.acquire()
        try:
            if self._cgroups is not None and (killed := self._cgroups.kill_leftovers()):
                log.warning(
                    "killed the sandboxes a killed process of this worker left", slots=killed
                )
            # Fails closed here when require_sandbox is set and bubblewrap cannot run.
            await self._sandboxes.probe(root / ".probe")
            # The images' files are the image slots' user's (known once the probe has run).
            await asyncio.to_thread(self._image_store.open, owner=self._sandboxes.image_owner)
            await self._start(root, slots)
        except BaseException as exc:
            # Whatever it got to (the zygote the probe started, the cgroups, wipes,
            # subscriptions): ended as a stop ends them, not left to the process's end. The
            # start's error is the one its caller hears.
            try:
                await self.__aexit__(type(exc), exc, exc.__traceback__)
            except Exception:
                log.exception("stopping a worker whose start failed failed too")
            raise
        return self

    async def _start(self, root: Path, slots: int) -> None:
        self._warn_about_setup()
        for index in range(slots):
            workspace = root / f"slot_{index}"
            workspace.mkdir(parents=True, exist_ok=True)
            workspace = workspace.resolve()  # once, not on every file call
            sandbox = self._sandboxes.make(index, workspace)
            offline = functools.partial(self._sandboxes.make_offline, index, workspace)
            tools = SlotTools.for_sandbox(sandbox, offline)
            # What a previous process of this worker id left is nobody's now: wiped first.
            self._table.add(Slot(index, workspace, tools, state=SlotState.WIPING))
        await asyncio.gather(*(self._cleaner.start_wipe(slot) for slot in self._table))
        # What workers that died here left (files, cgroups): in the background, a big tree
        # takes a while.
        self._leftovers = asyncio.create_task(
            asyncio.to_thread(clean_dead_workers, root, self._cgroups), name="dead-workers"
        )
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
        await self._endpoints.subscribe()
        # Registered before it takes work: a lease names an incarnation executors can see.
        await self._heartbeat.register()
        self._accepting = True
        await self._heartbeat.beat()  # the free slots, now that it takes them
        self._offers.start()  # free slots go to trajectories waiting for one
        self._warm.start()  # and the rest are warmed, up to warm_slots
        self._loops = [
            asyncio.create_task(self._heartbeat.run(), name=f"heartbeat-{wid}"),
            # A beat as soon as the connection is back: a registration the server expired
            # while it was down is written back before executors settle it as gone.
            asyncio.create_task(self._connection.run(), name=f"reconnects-{wid}"),
            asyncio.create_task(
                self._keeper.maintain(self._config.heartbeat_s), name=f"slot-maintenance-{wid}"
            ),
        ]
        log.info(
            "worker started",
            worker_id=wid,
            slots=self._table.capacity,
            spare_slots=len(self._table) - self._table.capacity,
            workspace_root=str(root),
            sandboxed=self._sandboxes.sandboxed,
            network_isolated=self._sandboxes.sandboxed and not self._config.allow_network,
            process_limit=self._sandboxes.process_limit,
            no_pids_cgroup_because=self._cgroup_probe.reason or None,
            runs_as=self._sandboxes.identity,
            registration_ttl_s=self._registration.ttl_s,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # 1. stop taking calls and slots; let acquisitions under way finish their lease write
        #    (waited for, never cancelled: a cancelled lease write leaves the lease in doubt).
        self._stopping = True
        self._accepting = False
        await _bounded(self._offers.stop(), _STEP_TIMEOUT_S)
        await _bounded(self._drain.close(), _STEP_TIMEOUT_S)
        # No new warm start; warm sandboxes end (bounded: SIGTERM always ends a worker).
        await _bounded(self._warm.close(_STEP_TIMEOUT_S), 2 * _STEP_TIMEOUT_S)
        await self._other_tasks(_STEP_TIMEOUT_S)
        # 2. tell executors at once: every workspace of this worker is about to be lost.
        await _bounded(self._keeper.mark_all_lost(LostReason.WORKER_STOPPED), _STEP_TIMEOUT_S)
        # 3. wait for running calls, 4. then cancel what is left (their processes are killed).
        await finish_or_cancel(
            self._calls.running,
            wait_s=self._config.drain_timeout_s,
            cancel_timeout_s=_STEP_TIMEOUT_S,
        )
        await _bounded(self._calls.results_sent(), _STEP_TIMEOUT_S)  # before the link goes
        # 5. end every sandbox and what still runs in it (the next start wipes the files).
        self._keeper.end_all()
        await self._cleaner.close(self._config.drain_timeout_s)
        # 6. stop beating, deregister, unsubscribe.
        await cancel_and_wait(self._loops, timeout_s=_STEP_TIMEOUT_S)
        self._heartbeat.cancel()
        if self._nc.is_connected:
            await _bounded(self._registration.deregister(), _STEP_TIMEOUT_S)
        await self._endpoints.unsubscribe()
        await self._other_tasks(_STEP_TIMEOUT_S)
        await cancel_and_wait(self._tasks, timeout_s=_STEP_TIMEOUT_S)
        if self._leftovers is not None:  # its thread finishes the directory it is at
            await cancel_and_wait([self._leftovers], timeout_s=_STEP_TIMEOUT_S)
        await self._disk_guard.close()
        await self._sandboxes.close()  # the launcher zygote, once every sandbox has ended
        if self._cgroups is not None:
            await self._cgroups.remove()
        self._alive.release()  # last: from here another worker may clean up what is left
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
            slots_total=self._table.capacity,
            slots_free=self._table.free if self._keeper.giving else 0,
            slots_out_of_service=self._table.count(SlotState.OUT_OF_SERVICE),
            slots_warm=self._warm.warm,
            started_at=self._started_at,
            updated_at=time.time(),
            heartbeat_s=self._config.heartbeat_s,
            incarnation=self._registration.incarnation,
            ttl_s=self._registration.ttl_s,
            slots_held=self._drain.slots_held,
            drain=self._drain.state,
        )

    def _announce_change(self) -> None:
        """Free slots (or the drain) changed: serve a waiting trajectory, warm the free ones,
        tell executors soon (while taking work)."""
        self._offers.wake()
        self._warm.wanted()
        self._drain.slots_changed()
        if self._accepting:
            self._heartbeat.soon()

    async def _rejoin(self) -> None:
        """The registration expired (or may have) while this worker could not beat: every
        executor takes its workspaces as lost. Give the slots up, then register anew."""
        if self._stopping or self._rejoining:
            return
        log.error("registration expired: giving up every slot and registering anew")
        self._rejoining = True
        self._accepting = False
        try:
            await self._other_tasks(_STEP_TIMEOUT_S)  # acquisitions under way finish first
            await _bounded(self._offers.settled(), _STEP_TIMEOUT_S)  # and slots being offered
            await self._keeper.give_up_all(LostReason.WORKER_EXPIRED)
            while not self._stopping:  # until registered: nothing else gives work back
                try:
                    await self._heartbeat.register()
                    break
                except Exception as exc:
                    log.warning(
                        "registering again failed", worker_id=self.worker_id, error=repr(exc)
                    )
                    await asyncio.sleep(self._config.heartbeat_s)
        except Exception as exc:
            log.warning("giving up the slots failed", worker_id=self.worker_id, error=repr(exc))
            return
        finally:
            self._rejoining = False
        if not self._stopping:
            self._accepting = True
            self._announce_change()

    async def _other_tasks(self, timeout_s: float) -> None:
        """Until the request handlers and lease writes running now (but the caller) are done,
        at most ``timeout_s``; they are not cancelled."""
        others = [task for task in self._tasks if task is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout_s)

    # -- tasks ------------------------------------------------------------------------------
    def _spawn(self, work: Awaitable[object]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("worker task failed")

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _bounded(work: Awaitable[object], timeout_s: float) -> None:
    """A shutdown step: given up after ``timeout_s``, logged, never raised."""
    try:
        await asyncio.wait_for(work, timeout_s)
    except Exception as exc:
        log.warning("a shutdown step did not finish", error=repr(exc) or type(exc).__name__)
