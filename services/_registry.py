"""The executor's view of the sandbox workers, fed by a watch on the workers KV bucket.

A worker is there while its registration is: the worker writes it with a TTL and refreshes it
every heartbeat, and the server removes it (leaving a marker the watch sees) when the worker
stops refreshing. So whether a worker is gone is decided by the server for every executor at
once, not by one executor's clock or one request that timed out. A worker that registers again
does so as a new incarnation; the old incarnation is gone, with the workspaces leased in it.

The view is a cache: before an executor acts on "gone" (a workspace is lost) it reads the
registration itself (:meth:`confirm_gone`). Free-slot counts are hints: the worker's answer to
an acquire request is what decides.

A registration that expired is not yet a worker gone: the server also expires every
registration whose TTL ran out while it was down, as it comes back, before the live workers
could beat. The expiry is settled by one compare-and-set on the expired key, which the worker
races with its own: the worker writes its registration back over the server's marker (same
incarnation, its slots kept) when it finds it expired, and an executor removes the marker
(a purge: the worker is gone) — whichever comes first decides for everyone, and the other one
sees it. An executor first waits one TTL when the expiry may not be the worker's doing: when
it (re)connected less than a TTL ago (a server restart expires every registration at once), or
when the marker came late (a stream that lost its leader with a cluster node expires what it
could not expire meanwhile, as soon as it has a leader again, and no worker could beat in
between). Then it asks the worker itself (over core NATS, which a cluster node's loss or a
slow JetStream does not stop): one that answers is alive and is given another TTL to write its
registration back, or to register anew. A worker that was killed answers nobody (its
subscriptions went with its connection), so it is known as gone within its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from nats.js.kv import KeyValue
from pydantic import ValidationError

from schemas.internal import DrainState, WorkerInfo

from ._kv import KvBucket, KvEntry, RevisionMismatch
from ._reconnects import ReconnectClock
from ._registration import MIN_REGISTRATION_TTL_S
from ._tasks import cancel_and_wait

log = structlog.get_logger("toolbus.registry")

GoneCallback = Callable[[str, str], None]  # (worker id, incarnation)
Ping = Callable[[str], Awaitable[bool]]  # does the worker of this id answer now?
_REWATCH_DELAY_S = 1.0
_SETTLE_RETRY_S = 1.0  # a settle that could not reach the server tries again after this
_LATE_EXPIRY_S = 2.0  # a marker this much later than the TTL said: the server could not expire


@dataclass(slots=True)
class _Entry:
    info: WorkerInfo
    seen_at: float  # monotonic, for the status only
    free_hint: int
    stored_at: float | None = None  # Unix time the server stored the registration, if known
    revision: int = 0  # its revision in the bucket, if known: a read older than it is stale


class WorkerRegistry:
    def __init__(
        self,
        bucket: KvBucket,
        *,
        connection: ReconnectClock | None = None,
        ping: Ping | None = None,
    ) -> None:
        self._bucket = bucket
        self._connection = connection  # None: never wait before settling an expiry
        self._ping = ping  # None: an expiry is settled without asking the worker
        self._workers: dict[str, _Entry] = {}
        self._settling: dict[str, asyncio.Task[bool]] = {}  # by worker id: an expiry settled
        # Each report of free slots is a new version: an acquisition that saw version v before
        # it asked the workers queues only if nothing was reported since.
        self._capacity_version = 0
        self._watch_task: asyncio.Task[None] | None = None
        self._watched: KeyValue | None = None
        self._ready = asyncio.Event()
        self._on_gone: list[GoneCallback] = []

    def on_gone(self, callback: GoneCallback) -> None:
        """Call ``callback(worker_id, incarnation)`` when that incarnation is gone."""
        self._on_gone.append(callback)

    async def start(self, watched: KeyValue) -> None:
        """Watch the bucket (``watched`` is the same bucket, bound); returns once the
        registrations already there are known."""
        self._watched = watched
        self._watch_task = asyncio.create_task(self._watch(watched), name="worker-registry-watch")
        await self._ready.wait()

    def rewatch(self) -> None:
        """Watch anew (after a reconnect: a server that restarted lost the watch's consumer,
        and nats-py would notice only after its heartbeats are missed, seconds later)."""
        if self._watched is not None and self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = asyncio.create_task(
                self._watch(self._watched), name="worker-registry-watch"
            )

    async def stop(self) -> None:
        tasks = [self._watch_task] if self._watch_task else []
        await cancel_and_wait([*tasks, *self._settling.values()])

    async def _watch(self, watched: KeyValue) -> None:
        """For ever: a watch that ends or fails (a reconnect, a JetStream hiccup) is started
        again, and what it finds then replaces the view (workers gone meanwhile are gone)."""
        while True:
            try:
                await self._watch_once(watched)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("the workers watch failed; watching again", error=repr(exc))
            finally:
                self._ready.set()  # a first watch that failed must not hold the start up
            await asyncio.sleep(_REWATCH_DELAY_S)

    async def _watch_once(self, watched: KeyValue) -> None:
        watcher = await watched.watchall()
        seen: set[str] | None = set()  # the keys of the initial values, until their end
        try:
            async for entry in watcher:
                if entry is None:  # end of the initial values
                    for gone in set(self._workers) - (seen or set()):
                        self._remove(gone)
                    seen = None
                    self._ready.set()
                    continue
                if seen is not None:
                    seen.add(entry.key)
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    # nats-py shows the server's expiry marker as a purge too: read which.
                    await self._removal_seen(entry.key)
                    continue
                stored_at = _unix_time(entry.created)
                try:
                    info = WorkerInfo.model_validate_json(entry.value)
                except ValidationError:
                    log.warning("ignoring malformed worker registration", key=entry.key)
                    continue
                self._update(info, stored_at, entry.revision or 0)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _update(self, info: WorkerInfo, stored_at: float | None = None, revision: int = 0) -> None:
        previous = self._workers.get(info.worker_id)
        self._workers[info.worker_id] = _Entry(
            info, time.monotonic(), info.slots_free, stored_at or None, revision
        )
        if previous is not None and previous.info.incarnation != info.incarnation:
            self._gone(info.worker_id, previous.info.incarnation)
        if info.slots_free > 0:
            self._capacity_freed()

    def _remove(self, worker_id: str) -> None:
        entry = self._workers.pop(worker_id, None)
        if entry is not None:
            self._gone(worker_id, entry.info.incarnation)

    def _gone(self, worker_id: str, incarnation: str) -> None:
        log.info("worker gone", worker_id=worker_id, incarnation=incarnation)
        for callback in self._on_gone:
            callback(worker_id, incarnation)

    # -- an expired registration ---------------------------------------------------------------
    async def _removal_seen(self, worker_id: str) -> None:
        """A registration went: removed on purpose (the worker stopped, or an expiry was
        settled), or expired, which is only settled here."""
        if worker_id not in self._workers:
            return
        stored = await self._stored(worker_id)
        if stored is not None and stored.expired:
            self._expired(worker_id, stored.revision, stored.stored_at)
        else:  # removed on purpose, or registered again meanwhile
            self._apply(worker_id, stored)

    def _expired(self, worker_id: str, revision: int, marked_at: float | None) -> None:
        """The server expired the registration: settled in a task (the worker stays in the view,
        so its calls wait, until it is)."""
        if worker_id in self._workers and worker_id not in self._settling:
            self._settle_soon(worker_id, revision, marked_at)

    def _settle_soon(
        self, worker_id: str, revision: int, marked_at: float | None
    ) -> asyncio.Task[bool]:
        settle = self._settle(worker_id, revision, marked_at)
        task = asyncio.create_task(settle, name="settle-expiry")
        self._settling[worker_id] = task
        task.add_done_callback(lambda _: self._settling.pop(worker_id, None))
        return task

    async def _settle(self, worker_id: str, revision: int, marked_at: float | None) -> bool:
        """Remove the expired registration (the worker is gone) unless the worker wrote it back
        first. True when the worker is gone."""
        entry = self._workers.get(worker_id)
        ttl_s = max(float(entry.info.ttl_s) if entry is not None else 0.0, MIN_REGISTRATION_TTL_S)
        stored_at = entry.stored_at if entry is not None else None
        if stored_at and marked_at and marked_at - stored_at > ttl_s + _LATE_EXPIRY_S:
            # Expired late: the stream could not, and the worker could not beat, meanwhile.
            late_s = round(marked_at - stored_at - ttl_s, 3)
            log.info("a registration expired late", worker_id=worker_id, late_s=late_s)
            await asyncio.sleep(ttl_s)
        while True:
            if self._connection is not None and self._connection.within(ttl_s):
                # Just (re)connected: a server restart expires every registration at once. The
                # live workers write theirs back as soon as their own connection is back.
                wait_s = ttl_s - self._connection.since_connect_s()
                await asyncio.sleep(max(wait_s, _SETTLE_RETRY_S))  # (or still disconnected)
                continue
            if self._ping is not None and await self._ping(worker_id):
                # Alive (cut off from JetStream, not from us): it writes the registration back
                # at its next beats, or registers anew. Asked again after a TTL, if it has not.
                await asyncio.sleep(ttl_s)
            else:
                try:
                    await self._bucket.remove(worker_id, expect=revision)
                except RevisionMismatch:
                    pass  # written back, replaced, removed, or expired again: read below
                except Exception as exc:  # not reachable now: the expiry is not settled yet
                    log.warning("settling an expired registration failed", error=repr(exc))
                    await asyncio.sleep(_SETTLE_RETRY_S)
                    continue
                else:
                    log.info("worker registration expired", worker_id=worker_id)
                    self._remove(worker_id)
                    return True
            stored = await self._stored(worker_id)
            if stored is None or not stored.expired:  # written back, replaced, or removed
                return self._apply(worker_id, stored)
            revision = stored.revision or revision  # expired (again): settled as before

    async def _stored(self, worker_id: str) -> KvEntry | None:
        try:
            return await self._bucket.get(worker_id)
        except Exception as exc:  # unreadable now: as if still expired
            log.warning("reading a registration failed", error=repr(exc))
            return KvEntry(None, 0, expired=True)

    def _apply(self, worker_id: str, stored: KvEntry | None) -> bool:
        """Take what a read of the registration found into the view (a registration: written
        back, or another incarnation, and the one before is gone; none: removed). A read older
        than what the watch has seen meanwhile changes nothing. True when the worker is gone."""
        current = self._workers.get(worker_id)
        if stored is not None and current is not None and current.revision > stored.revision:
            return False  # the watch moved on while this was read
        info = _info(stored)
        if info is None:
            self._remove(worker_id)
            return True
        assert stored is not None
        if current is None or current.info != info:  # (the same: its free-slot hint is kept)
            self._update(info, stored.stored_at, stored.revision)
        return False

    # -- reading ------------------------------------------------------------------------------
    def is_registered(self, worker_id: str, incarnation: str) -> bool:
        entry = self._workers.get(worker_id)
        return entry is not None and entry.info.incarnation == incarnation

    async def confirm_gone(self, worker_id: str, incarnation: str) -> bool:
        """Read the registration itself: True when that incarnation is not registered. An
        expired one is settled first (which may wait for the worker to write it back)."""
        stored = await self._bucket.get(worker_id)
        if stored is not None and stored.expired:
            settling = self._settling.get(worker_id) or self._settle_soon(
                worker_id, stored.revision, stored.stored_at
            )
            if not await asyncio.shield(settling):
                entry = self._workers.get(worker_id)
                return entry is None or entry.info.incarnation != incarnation
            return True
        self._apply(worker_id, stored)
        entry = self._workers.get(worker_id)
        return entry is None or entry.info.incarnation != incarnation

    def alive(self) -> list[tuple[WorkerInfo, float]]:
        """Registered workers (free slots as this executor last knew them), seconds since heard."""
        now = time.monotonic()
        return [
            (entry.info.model_copy(update={"slots_free": entry.free_hint}), now - entry.seen_at)
            for entry in self._workers.values()
        ]

    def candidates(self) -> list[str]:
        """Workers that may have a free slot, most free first (a draining one has none)."""
        ranked = sorted(self._workers.values(), key=lambda entry: entry.free_hint, reverse=True)
        return [
            entry.info.worker_id
            for entry in ranked
            if entry.free_hint > 0 and entry.info.drain is DrainState.SERVING
        ]

    # -- hints --------------------------------------------------------------------------------
    def note_acquired(self, worker_id: str) -> None:
        if entry := self._workers.get(worker_id):
            entry.free_hint = max(entry.free_hint - 1, 0)

    def note_free(self, worker_id: str, free: int) -> None:
        """The worker said how many slots it has free (in an acquire reply)."""
        if entry := self._workers.get(worker_id):
            entry.free_hint = free

    def note_full(self, worker_id: str) -> None:
        if entry := self._workers.get(worker_id):
            entry.free_hint = 0

    def note_released(self, worker_id: str) -> None:
        if entry := self._workers.get(worker_id):
            entry.free_hint += 1
            self._capacity_freed()

    def _capacity_freed(self) -> None:
        self._capacity_version += 1

    @property
    def capacity_version(self) -> int:
        return self._capacity_version


def _info(stored: KvEntry | None) -> WorkerInfo | None:
    if stored is None or stored.value is None:
        return None
    try:
        return WorkerInfo.model_validate_json(stored.value)
    except ValidationError:
        return None


def _unix_time(created: object) -> float | None:
    """A watch entry's ``created`` (nats-py gives the server's timestamp as a datetime)."""
    return created.timestamp() if isinstance(created, datetime.datetime) else None
