"""One run of a call, for every item that asked for it; and a worker's memory of runs by id.

A call that carries a ``uniq_id`` runs at most once per id within its trajectory's assignment:
an item whose ``(trajectory, epoch, uniq_id)`` matches a run joins it as one more asker instead
of running again (a client's retry, through any executor: every call of a trajectory reaches
the worker that holds its slot). A run's state changes only here and in ``SlotCalls``, each in
one step::

    WAITING ──its tool starts──▶ RUNNING ──outcome──▶ DONE (held for the window: retries get it)
       └──every asker cancelled, or the slot released, before it started──▶ DONE (forgotten:
          nothing of it ran, so a retry runs it)

A finished run's outcome is held for ``window_s`` within ``max_bytes`` of outcomes (the oldest
go first when over); the id of one dropped for memory stays known for the window, so a retry of
it is refused with a clear error instead of running a second time.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from schemas.internal import BatchItem, ItemResult

from ._setting_defaults import DEFAULT_RETRY_MEMORY_MB, DEFAULT_RETRY_WINDOW_S
from ._slots import Slot

DEFAULT_RETRY_MEMORY_BYTES = DEFAULT_RETRY_MEMORY_MB * 1024 * 1024
_MAX_REFUSED_IDS = 100_000  # ids whose outcome was dropped for memory, kept for the window
_OUTCOME_OVERHEAD_BYTES = 512  # an outcome's size beyond its output and error, roughly

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
    outcome: ItemResult | None = None


def run_key(item: BatchItem) -> RunKey | None:
    return None if item.uniq_id is None else (item.trajectory_id, item.epoch, item.uniq_id)


class Refused:
    """What a retry finds when its run's outcome was dropped for memory."""


REFUSED = Refused()


@dataclass(slots=True)
class _Held:
    outcome: ItemResult  # only the outcome: a run holds its arguments, which may be large
    size: int
    until: float  # monotonic


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
        self._held: collections.OrderedDict[RunKey, _Held] = collections.OrderedDict()
        self._held_bytes = 0
        self._refused: collections.OrderedDict[RunKey, float] = collections.OrderedDict()

    @property
    def held(self) -> int:
        return len(self._held)

    def find(self, key: RunKey) -> CallRun | ItemResult | Refused | None:
        """What an item of this key gets: the run it joins (WAITING or RUNNING), the outcome
        of a finished one, REFUSED, or None: it runs."""
        self._expire()
        if (run := self._live.get(key)) is not None:
            return run
        if (held := self._held.get(key)) is not None:
            return held.outcome
        return REFUSED if key in self._refused else None

    def started(self, run: CallRun) -> None:
        """A new run of this key: items of the key join it from now."""
        assert run.key is not None
        self._live[run.key] = run

    def finished(self, run: CallRun, *, ran: bool) -> None:
        """The run is DONE: its outcome is held for the window if any of it ran, else its key
        is free again."""
        assert run.key is not None and run.outcome is not None
        if self._live.get(run.key) is run:
            del self._live[run.key]
        if not ran:
            return
        self._expire()
        size = _size(run.outcome)
        self._held[run.key] = _Held(run.outcome, size, self._clock() + self.window_s)
        self._held_bytes += size
        while self._held_bytes > self._max_bytes and self._held:
            key, dropped = self._held.popitem(last=False)
            self._held_bytes -= dropped.size
            self._refused[key] = dropped.until
            if len(self._refused) > _MAX_REFUSED_IDS:
                self._refused.popitem(last=False)

    def _expire(self) -> None:
        # Both are in order of finishing, and the window is the same for all.
        now = self._clock()
        while self._held and next(iter(self._held.values())).until <= now:
            _, dropped = self._held.popitem(last=False)
            self._held_bytes -= dropped.size
        while self._refused and next(iter(self._refused.values())) <= now:
            self._refused.popitem(last=False)


def _size(outcome: ItemResult) -> int:
    result = outcome.result
    if result is None:
        return _OUTCOME_OVERHEAD_BYTES * 4  # an artifact reply: small, and not run by id
    return len(result.output) + len(result.error) + _OUTCOME_OVERHEAD_BYTES
