"""The executor's live view of sandbox workers, fed by a watch on the workers KV bucket.

A worker counts as alive while its last registration arrived within three heartbeats (measured
on this executor's clock, so hosts need not agree on the time). Free-slot counts are hints: the
worker's own answer to an acquire request is what decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog
from nats.js.kv import KeyValue
from pydantic import ValidationError

from schemas.internal import WorkerInfo

log = structlog.get_logger("toolbus.registry")

_MISSED_HEARTBEATS = 3


@dataclass(slots=True)
class _Entry:
    info: WorkerInfo
    seen_at: float  # monotonic
    free_hint: int


class WorkerRegistry:
    def __init__(self, bucket: KeyValue) -> None:
        self._bucket = bucket
        self._workers: dict[str, _Entry] = {}
        self._capacity = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._watch_task = asyncio.create_task(self._watch(), name="worker-registry-watch")
        await self._ready.wait()

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)

    async def _watch(self) -> None:
        watcher = await self._bucket.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # end of the initial values
                    self._ready.set()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self._workers.pop(entry.key, None)
                    continue
                try:
                    info = WorkerInfo.model_validate_json(entry.value)
                except ValidationError:
                    log.warning("ignoring malformed worker registration", key=entry.key)
                    continue
                self._workers[entry.key] = _Entry(info, time.monotonic(), info.slots_free)
                if info.slots_free > 0:
                    self._capacity.set()
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _is_alive(self, entry: _Entry, now: float) -> bool:
        return now - entry.seen_at <= entry.info.heartbeat_s * _MISSED_HEARTBEATS

    def is_alive(self, worker_id: str) -> bool:
        entry = self._workers.get(worker_id)
        return entry is not None and self._is_alive(entry, time.monotonic())

    def alive(self) -> list[tuple[WorkerInfo, float]]:
        """Live workers (free slots as this executor last knew them) and seconds since heard."""
        now = time.monotonic()
        return [
            (entry.info.model_copy(update={"slots_free": entry.free_hint}), now - entry.seen_at)
            for entry in self._workers.values()
            if self._is_alive(entry, now)
        ]

    def candidates(self) -> list[str]:
        """Live workers that may have a free slot, most free first."""
        now = time.monotonic()
        ranked = sorted(
            (entry for entry in self._workers.values() if self._is_alive(entry, now)),
            key=lambda entry: entry.free_hint,
            reverse=True,
        )
        return [entry.info.worker_id for entry in ranked if entry.free_hint > 0]

    def note_acquired(self, worker_id: str) -> None:
        if entry := self._workers.get(worker_id):
            entry.free_hint = max(entry.free_hint - 1, 0)

    def note_full(self, worker_id: str) -> None:
        if entry := self._workers.get(worker_id):
            entry.free_hint = 0

    def note_gone(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def note_released(self, worker_id: str) -> None:
        if entry := self._workers.get(worker_id):
            entry.free_hint += 1
            self._capacity.set()

    async def wait_for_capacity(self, timeout: float) -> None:
        """Return when a worker reports free slots, or after ``timeout`` seconds."""
        self._capacity.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._capacity.wait(), timeout)
