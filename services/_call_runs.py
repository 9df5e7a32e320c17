"""One run of a call, for every item that asked for it; and a worker's memory of runs by id.

A call that carries a ``uniq_id`` runs at most once per id within its trajectory's assignment:
an item whose ``(trajectory, epoch, uniq_id)`` matches a run joins it as one more asker instead
of running again (a client's retry, through any executor: every call of a trajectory reaches
the worker that holds its slot). A run's state changes only in ``SlotCalls``, each in one step::

    WAITING ──its tool starts──▶ RUNNING ──outcome──▶ DONE (held for the window: retries get it)
       └──every asker cancelled, or the slot released, before it started──▶ DONE (forgotten:
          nothing of it ran, so a retry runs it)

A finished run's outcome is held, as the bytes that were sent (no object for the garbage
collector to walk, its size exact), for ``window_s`` within ``max_bytes`` (the oldest go first
when over); the id of one dropped for memory stays known for the window, so a retry of it is
refused with a clear error instead of running a second time. Only when even the known ids
outgrow the memory are the oldest forgotten (logged). The entries of an assignment go when its
slot is released: no call of it can come any more.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

import pydantic_core
import structlog

from schemas.internal import BatchItem

from ._setting_defaults import DEFAULT_RETRY_MEMORY_MB, DEFAULT_RETRY_WINDOW_S
from ._slots import Slot

log = structlog.get_logger("toolbus.worker")

DEFAULT_RETRY_MEMORY_BYTES = DEFAULT_RETRY_MEMORY_MB * 1024 * 1024
# What an entry costs beyond its encoded outcome (its key, tuple and dict slots); a known id
# alone, less.
_ENTRY_OVERHEAD_BYTES = 300
_ID_OVERHEAD_BYTES = 256
_FORGOTTEN_LOG_EVERY_S = 60.0

RunKey = tuple[str, int, str]  # trajectory, epoch, uniq_id


class RunState(StrEnum):
    WAITING = "waiting"  # taken in; its tool has not started (behind the gate or the slot lock)
    RUNNING = "running"  # its tool started: from here it happened, whatever comes
    DONE = "done"  # its outcome went to its askers


@dataclass(slots=True, eq=False)
class Asker:
    """An item waiting for a run's outcome, and where it goes."""

    item: BatchItem
    reply_to: str
    owed_start: bool  # acknowledged as queued: told when the run starts


@dataclass(slots=True, eq=False)
class CallRun:
    slot: Slot
    item: BatchItem  # the first asker's: what runs
    key: RunKey | None  # None: the call has no uniq_id, so nothing can join it
    askers: dict[str, Asker] = field(default_factory=dict)  # by item id
    state: RunState = RunState.WAITING
    task: asyncio.Task[None] | None = None


def run_key(item: BatchItem) -> RunKey | None:
    return None if item.uniq_id is None else (item.trajectory_id, item.epoch, item.uniq_id)


def same_call(item: BatchItem, other: BatchItem) -> bool:
    return item.tool == other.tool and item.arguments == other.arguments


def fingerprint(item: BatchItem) -> int:
    """Of the call an item asks for (its tool and arguments), to tell a retry from another call
    that reuses an id."""
    return hash((item.tool, pydantic_core.to_json(item.arguments)))


class Refused:
    """What a retry finds when its run's outcome was dropped for memory."""


REFUSED = Refused()


class Held(NamedTuple):
    """A finished run's outcome (only that: a run holds its arguments, which may be large).
    Tuples of plain values: the garbage collector stops tracking them."""

    payload: bytes  # the ItemResult as sent to the run's own asker
    fingerprint: int
    size: int
    until: float  # monotonic


class _Known(NamedTuple):
    size: int
    until: float


class RunsById:
    def __init__(
        self,
        *,
        window_s: float = DEFAULT_RETRY_WINDOW_S,
        max_bytes: int = DEFAULT_RETRY_MEMORY_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._live: dict[RunKey, CallRun] = {}  # WAITING or RUNNING
        # Both in order of finishing (the window is the same for all): the oldest first.
        self._held: collections.OrderedDict[RunKey, Held] = collections.OrderedDict()
        self._refused: collections.OrderedDict[RunKey, _Known] = collections.OrderedDict()
        self._bytes = 0
        self._by_epoch: dict[int, set[RunKey]] = {}  # what forget_assignment drops
        self._forgotten = 0
        self._forgotten_logged_at = float("-inf")

    def find(self, key: RunKey) -> CallRun | Held | Refused | None:
        """What an item of this key gets: the run it joins (WAITING or RUNNING), the outcome
        of a finished one, REFUSED, or None: it runs."""
        if (run := self._live.get(key)) is not None:
            return run
        # Past their window, entries are as good as gone (finished() drops them).
        now = self._clock()
        if (held := self._held.get(key)) is not None and held.until > now:
            return held
        known = self._refused.get(key)
        return REFUSED if known is not None and known.until > now else None

    def started(self, run: CallRun) -> None:
        """A new run of this key: items of the key join it from now."""
        assert run.key is not None
        self._live[run.key] = run

    def finished(self, run: CallRun, payload: bytes, *, ran: bool) -> None:
        """The run is DONE with this (encoded) outcome: held for the window if any of it ran,
        else its key is free again."""
        key = run.key
        assert key is not None
        if self._live.get(key) is run:
            del self._live[key]
        if not ran:
            return
        self._expire()
        size = len(payload) + _ENTRY_OVERHEAD_BYTES
        held = Held(payload, fingerprint(run.item), size, self._clock() + self.window_s)
        self._held[key] = held
        if (keys := self._by_epoch.get(key[1])) is None:
            keys = self._by_epoch[key[1]] = set()
        keys.add(key)
        self._bytes += size
        while self._bytes > self._max_bytes and self._held:
            old_key, dropped = self._held.popitem(last=False)
            known = _Known(len(old_key[0]) + len(old_key[2]) + _ID_OVERHEAD_BYTES, dropped.until)
            self._refused[old_key] = known
            self._bytes += known.size - dropped.size
        while self._bytes > self._max_bytes and self._refused:
            self._drop_refused(*self._refused.popitem(last=False))
            self._note_forgotten()

    def forget_assignment(self, epoch: int) -> None:
        """The assignment ended (its slot is released): no item of it can come any more."""
        for key in self._by_epoch.pop(epoch, ()):
            if (held := self._held.pop(key, None)) is not None:
                self._bytes -= held.size
            if (known := self._refused.pop(key, None)) is not None:
                self._bytes -= known.size

    def _expire(self) -> None:
        now = self._clock()
        while self._held and next(iter(self._held.values())).until <= now:
            key, held = self._held.popitem(last=False)
            self._bytes -= held.size
            self._unindex(key)
        while self._refused and next(iter(self._refused.values())).until <= now:
            self._drop_refused(*self._refused.popitem(last=False))

    def _drop_refused(self, key: RunKey, known: _Known) -> None:
        self._bytes -= known.size
        self._unindex(key)

    def _unindex(self, key: RunKey) -> None:
        keys = self._by_epoch.get(key[1])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_epoch[key[1]]

    def _note_forgotten(self) -> None:
        self._forgotten += 1
        now = self._clock()
        if now - self._forgotten_logged_at >= _FORGOTTEN_LOG_EVERY_S:
            self._forgotten_logged_at = now
            log.warning(
                "the retry memory is full: ids of calls that ran are forgotten within the "
                "window, so a retry of one would run again (raise retry_memory_mb)",
                forgotten=self._forgotten,
            )
