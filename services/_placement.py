"""Where a trajectory's calls go: its lease, a new slot for it, and what is true when in doubt.

Who decides what:

- **The worker** that holds a slot writes its lease (``_leases.py``): it assigns the slot and
  creates the lease, removes it on release, puts a tombstone in its place when it expires the
  slot or has to give its slots up. Its word that it does not hold an assignment (a call
  rejected ``no_slot``) makes a lease it left behind removable.
- **The server** decides when a worker is gone: its registration expires (``_registry.py``).
  Only then does an executor take the worker's leases as lost, and it reads the registration
  itself before it does.
- **This executor** only reads, and caches what it read. Whenever a worker does not have what
  the cache says, the stored lease is read again and decides.

"Workspace lost" is said once to the calls that come after a loss: the executor that removes a
tombstone (or the lease of a gone worker) with compare-and-set tells the call it serves (and
the trajectory's other calls waiting on that same look at the lease); the others find no lease
and give the trajectory a new slot. Every call that was in flight in the lost workspace hears
it as well: it ran there.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from observability import tracing
from schemas.errors import ErrorKind
from schemas.internal import (
    AcquireOutcome,
    AcquireReply,
    AcquireRequest,
    Lease,
    LostReason,
    RejectReason,
    WorkerReleaseReply,
    WorkerReleaseRequest,
)
from schemas.subjects import Subjects

from ._leases import LeaseCache, LeaseStore
from ._registry import WorkerRegistry
from ._requests import nats_request
from ._waiting import SlotQueue
from .exceptions import NoCapacity, NotFound

log = structlog.get_logger("toolbus.placement")

_ACQUIRE_REQUEST_TIMEOUT_S = 5.0
# Beyond the worker's own release wait: an assignment settling, the lease write, the reply.
_RELEASE_REQUEST_MARGIN_S = 15.0
_MAX_LOOKS = 8  # readings of a lease that keeps changing under us before giving up (503)
# A worker updates a lease right after it stops serving its slot: wait this long (in steps) for
# the update before removing a lease the worker no longer honours.
_REJECTED_LEASE_WAITS_S = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.0, 2.0, 2.0)


class WorkspaceLost(Exception):
    """The trajectory's workspace is gone (the lease's ``lost`` says why); this executor is
    the one to say so."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(str(lease.lost))
        self.lease = lease


class Placement:
    def __init__(
        self,
        nc: Client,
        registry: WorkerRegistry,
        store: LeaseStore,
        *,
        subjects: Subjects,
        queue: SlotQueue,
        acquire_timeout_s: float,
        release_wait_s: float,
    ) -> None:
        self._nc = nc
        self._registry = registry
        self._queue = queue
        self._store = store
        self._cache = LeaseCache()
        self._subjects = subjects
        self._acquire_timeout_s = acquire_timeout_s
        self._release_timeout_s = release_wait_s + _RELEASE_REQUEST_MARGIN_S
        self._acquiring: dict[str, asyncio.Task[Lease]] = {}

    def cached(self, trajectory_id: str) -> Lease | None:
        return self._cache.get(trajectory_id)

    async def close(self) -> None:
        """Stop acquisitions under way (their callers are gone with the executor)."""
        for task in list(self._acquiring.values()):
            task.cancel()
        await asyncio.gather(*self._acquiring.values(), return_exceptions=True)

    # -- finding a call's slot ----------------------------------------------------------------
    async def lease(
        self,
        trajectory_id: str,
        *,
        acquire: bool,
        rejected: tuple[Lease, RejectReason] | None = None,
        image: str | None = None,
    ) -> Lease:
        """The trajectory's live lease; a new slot (made from ``image``, if given) when it has
        none and ``acquire``, else NotFound. ``rejected``: the worker said it does not take
        calls on this lease (``no_slot`` or ``stopping``). WorkspaceLost when the workspace is
        gone."""
        if rejected is None:
            cached = self._cache.get(trajectory_id)
            if cached is not None and self._registry.is_registered(
                cached.worker_id, cached.incarnation
            ):
                return cached
        if rejected is not None or not acquire:
            return await self._resolve(trajectory_id, acquire, rejected, image)
        acquiring = self._acquiring.get(trajectory_id)
        if acquiring is None:
            # A task of its own: concurrent calls of one trajectory share it, and a caller
            # that gives up does not cancel the others' acquisition.
            acquiring = asyncio.create_task(self._resolve(trajectory_id, True, None, image))
            self._acquiring[trajectory_id] = acquiring
            acquiring.add_done_callback(lambda task: self._resolved(trajectory_id, task))
        return await asyncio.shield(acquiring)

    def _resolved(self, trajectory_id: str, task: asyncio.Task[Lease]) -> None:
        if self._acquiring.get(trajectory_id) is task:
            del self._acquiring[trajectory_id]
        if not task.cancelled():
            task.exception()  # retrieved here; the callers awaiting it re-raise it

    async def _resolve(
        self,
        trajectory_id: str,
        acquire: bool,
        rejected: tuple[Lease, RejectReason] | None,
        image: str | None = None,
    ) -> Lease:
        """Read the stored lease until it says where the trajectory's live slot is."""
        waits = iter(_REJECTED_LEASE_WAITS_S)
        for _ in range(_MAX_LOOKS + len(_REJECTED_LEASE_WAITS_S)):
            stored = await self._store.get(trajectory_id)
            if stored is None:
                self._cache.forget(trajectory_id)
                if not acquire:
                    raise NotFound(f"No active slot for trajectory {trajectory_id!r}")
                lease = await self._acquire(trajectory_id, image)
                if lease is not None:
                    return lease
                continue  # a lease appeared meanwhile (another executor's): read it
            lease, revision = stored
            if lease.lost is not None:
                await self._take_lost(trajectory_id, lease, revision)
                continue
            registered = self._registry.is_registered(lease.worker_id, lease.incarnation)
            if not registered and await self._registry.confirm_gone(
                lease.worker_id, lease.incarnation
            ):
                gone = lease.model_copy(update={"lost": LostReason.WORKER_GONE})
                await self._take_lost(trajectory_id, gone, revision)
                continue
            if rejected is not None and lease.same_assignment(rejected[0]):
                # The worker does not take calls on this lease. It updates the lease right
                # after it stops serving the slot: wait for that, then remove the lease.
                wait = next(waits, None)
                if wait is not None:
                    await asyncio.sleep(wait)
                    continue
                if await self._store.remove(trajectory_id, expect=revision):
                    log.warning(
                        "removed a lease its worker does not hold", worker_id=lease.worker_id
                    )
                    if rejected[1] is RejectReason.STOPPING:
                        stopped = lease.model_copy(update={"lost": LostReason.WORKER_STOPPED})
                        raise WorkspaceLost(stopped)
                rejected = None
                continue
            self._cache.put(trajectory_id, lease)
            return lease
        raise NoCapacity(
            f"could not place the call: the slot of trajectory {trajectory_id!r} kept moving; "
            "retry",
            kind=ErrorKind.WORKER_UNAVAILABLE,
        )

    async def _take_lost(self, trajectory_id: str, lease: Lease, revision: int) -> None:
        """Remove a lost workspace's lease; the executor that does tells the trajectory."""
        self._cache.forget(trajectory_id)
        if await self._store.remove(trajectory_id, expect=revision):
            log.info("workspace lost", worker_id=lease.worker_id, reason=str(lease.lost))
            raise WorkspaceLost(lease)

    async def forget_lost(self, trajectory_id: str, lease: Lease) -> None:
        """A call in flight found its worker gone: remove the lease (once) so that the
        trajectory's next call gets a new slot instead of hearing of the loss again."""
        self._cache.forget(trajectory_id, lease)
        stored = await self._store.get(trajectory_id)
        if stored is not None and stored[0].same_assignment(lease):
            await self._store.remove(trajectory_id, expect=stored[1])

    # -- acquiring ----------------------------------------------------------------------------
    async def _acquire(self, trajectory_id: str, image: str | None) -> Lease | None:
        with tracing.span("acquire slot") as span:
            lease = await self._acquire_in_span(trajectory_id, image)
            if lease is not None:
                span.set_attributes(
                    {"toolbus.worker_id": lease.worker_id, "toolbus.slot": lease.slot}
                )
            return lease

    async def _acquire_in_span(self, trajectory_id: str, image: str | None) -> Lease | None:
        """A new lease from a worker with a free slot; None when the trajectory got a lease
        meanwhile some other way (read it); NoCapacity when no slot freed in time."""
        deadline = time.monotonic() + self._acquire_timeout_s
        request = AcquireRequest(trajectory_id=trajectory_id, image=image)
        request_data = request.model_dump_json().encode()
        while True:
            version = self._registry.capacity_version
            for worker_id in self._registry.candidates():
                # Count the slot as taken before asking, so that concurrent new trajectories
                # spread over the workers instead of all asking the one that looked emptiest.
                self._registry.note_acquired(worker_id)
                reply = await self._ask_acquire(worker_id, request_data)
                if reply is None or reply.outcome is AcquireOutcome.CONFLICT:
                    return None  # the worker may have leased a slot after all: read the lease
                if reply.slots_free is not None:  # fresher than its last heartbeat
                    self._registry.note_free(worker_id, reply.slots_free)
                if reply.outcome is AcquireOutcome.LEASED and reply.lease is not None:
                    log.info("slot leased", worker_id=worker_id, slot=reply.lease.slot)
                    self._cache.put(trajectory_id, reply.lease)
                    return reply.lease
                if reply.outcome is not AcquireOutcome.FAILED:
                    self._registry.note_full(worker_id)
            if self._registry.capacity_version != version:
                continue  # a slot freed while we asked: look at the hints again
            # No free slot anywhere: wait in the queue, served in arrival order.
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                offered = await self._queue.wait(trajectory_id, remaining, image=image)
            except NatsError as exc:  # before TimeoutError: a publish timeout is both
                raise NoCapacity(
                    f"cannot queue for a slot ({type(exc).__name__}); retry",
                    kind=ErrorKind.WORKER_UNAVAILABLE,
                ) from None
            except TimeoutError:
                pass
            else:
                if offered is not None:
                    log.info("slot leased", worker_id=offered.worker_id, slot=offered.slot)
                    self._cache.put(trajectory_id, offered)
                return offered
            alive = self._registry.alive()
            raise NoCapacity(
                f"no free slot within {self._acquire_timeout_s:g}s "
                f"({len(alive)} workers, {sum(w.slots_total for w, _ in alive)} slots, "
                "all in use); release finished trajectories or add workers"
            )

    async def _ask_acquire(self, worker_id: str, request: bytes) -> AcquireReply | None:
        """The worker's answer; None when it gave none in time (it may have leased a slot)."""
        try:
            msg = await nats_request(
                self._nc,
                self._subjects.worker_acquire(worker_id),
                request,
                timeout=_ACQUIRE_REQUEST_TIMEOUT_S,
            )
        except NoRespondersError:
            return AcquireReply(outcome=AcquireOutcome.STOPPING)  # not listening: nothing leased
        except NatsTimeoutError:
            return None
        return AcquireReply.model_validate_json(msg.data)

    # -- releasing ----------------------------------------------------------------------------
    async def release(self, trajectory_id: str, *, reset_workspace: bool) -> Lease:
        """Give the trajectory's slot back; the lease it had. NotFound when it has none."""
        stored = await self._store.get(trajectory_id)
        self._cache.forget(trajectory_id)
        if stored is None:
            raise NotFound(f"No active slot for trajectory {trajectory_id!r}")
        lease, revision = stored
        if lease.lost is not None:
            await self._store.remove(trajectory_id, expect=revision)  # nothing left to free
            return lease
        request = WorkerReleaseRequest(
            trajectory_id=trajectory_id, epoch=lease.epoch, reset_workspace=reset_workspace
        )
        try:
            msg = await nats_request(
                self._nc,
                self._subjects.worker_release(lease.worker_id),
                request.model_dump_json().encode(),
                timeout=self._release_timeout_s,
            )
        except (NoRespondersError, NatsTimeoutError):
            if not await self._registry.confirm_gone(lease.worker_id, lease.incarnation):
                raise NoCapacity(
                    f"the worker {lease.worker_id} holding the slot did not answer the release; "
                    "retry",
                    kind=ErrorKind.WORKER_UNAVAILABLE,
                ) from None
            await self._store.remove(trajectory_id, expect=revision)  # gone with its worker
            return lease
        reply = WorkerReleaseReply.model_validate_json(msg.data)
        if reply.error is not None:
            raise NoCapacity(
                f"the worker {lease.worker_id} could not release the slot ({reply.error}); retry",
                kind=ErrorKind.WORKER_UNAVAILABLE,
            )
        if reply.released:
            self._registry.note_released(lease.worker_id)
            if not reply.settled:
                log.info("released; the slot is still being cleaned", worker_id=lease.worker_id)
        else:
            # The worker does not hold that assignment (released meanwhile): its word.
            await self._store.remove(trajectory_id, expect=revision)
        return lease
