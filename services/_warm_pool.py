"""Warm slots: FREE slots whose sandbox is started before a trajectory asks for one.

A slot's sandbox otherwise starts at its trajectory's first command, which then pays for the
whole start. The pool keeps up to ``size`` FREE slots warm (their sandbox up and ready) and
refills in the background, at most ``concurrency`` starts at a time (each is a fork, exec and
Python start-up: many at once on a small machine slow every call). ``SlotTable.assign`` gives a
warm slot before a cold one (:func:`is_warm`).

Warmth is not a slot state: a FREE slot is cold, warming or warm, and every transition of the
state machine is as it was. What keeps a warm sandbox as clean as a cold one:

- a start begins only in a FREE slot, and FREE means wiped (or assigned and never used);
- a slot assigned while its warm start runs is fine: the trajectory's first command waits on
  the sandbox's start lock and gets the sandbox just started, in which nothing ran yet;
- every release ends the sandbox (``BwrapSandbox.reset``: it kills bubblewrap, counts a reset
  and takes the start lock), and a start that sees a reset begin gives up: a sandbox that ran a
  trajectory's commands never outlives its release;
- a start that finishes in a slot that is nobody's but not FREE (RELEASING, WIPING, DIRTY, out
  of service: released meanwhile, whatever the sandbox did before it looked at its resets) is
  ended again here: an unwiped slot holds no sandbox.

A warm start that fails leaves the slot FREE and in service (its first command tries again, as
a cold slot's does); that slot is not warmed again before it comes round again (a new epoch),
and warming pauses for a while that doubles with each failure in a row. Only the first failure
of a run of them is logged as a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable

import structlog

from ._sandbox import BwrapSandbox
from ._slots import Slot, SlotState, SlotTable
from ._tasks import cancel_and_wait, finish_or_cancel

log = structlog.get_logger("toolbus.slots")

WARM_START_CONCURRENCY = 2  # starts at once: about the cores of a small worker host
RESCAN_S = 5.0  # a warm sandbox that died (killed from outside) is noticed this often
FAILURE_PAUSE_S = 1.0  # after a failed warm start; doubles with each one in a row
MAX_FAILURE_PAUSE_S = 60.0
_NOBODYS = frozenset(
    {SlotState.RELEASING, SlotState.WIPING, SlotState.DIRTY, SlotState.OUT_OF_SERVICE}
)


def is_warm(slot: Slot) -> bool:
    """Whether the slot's sandbox is up: its next command starts none."""
    sandbox = slot.tools.sandbox
    return isinstance(sandbox, BwrapSandbox) and sandbox.running


class WarmPool:
    """Keeps up to ``size`` FREE slots of ``table`` warm; ``wanted()`` after every change of
    the table (a slot freed or taken) makes it look again."""

    def __init__(
        self,
        table: SlotTable,
        *,
        size: int,
        concurrency: int = WARM_START_CONCURRENCY,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self._table = table
        self._paused = paused  # while true (a draining worker), no new warm start
        self._size = size
        self._concurrency = max(1, min(concurrency, size))
        self._wanted = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._starting: dict[Slot, asyncio.Task[None]] = {}
        self._warmed: dict[Slot, None] = {}  # slots it warmed (an entry may be stale)
        self._failed_epoch: dict[Slot, int] = {}  # a failed start: not again in this epoch
        self._pause_s = 0.0  # after failures in a row
        self._loop: asyncio.Task[None] | None = None
        self._closing = False
        self.failures = 0  # warm starts that failed in a FREE slot (for tests and status)
        self.peak_starting = 0  # most warm starts at once so far

    @property
    def warm(self) -> int:
        """FREE slots whose sandbox is up."""
        self._prune()
        return sum(1 for slot in self._warmed if slot.state is SlotState.FREE)

    def pick(self) -> Slot | None:
        """A warm FREE slot, for ``SlotTable.assign`` (it looks at ``size`` slots, not all)."""
        self._prune()
        return next((slot for slot in self._warmed if slot.state is SlotState.FREE), None)

    def _prune(self) -> None:
        for slot in [slot for slot in self._warmed if not is_warm(slot)]:
            del self._warmed[slot]

    @property
    def starting(self) -> int:
        return len(self._starting)

    def wanted(self) -> None:
        """The table changed: look for slots to warm (cheap; many calls make one look)."""
        if self._loop is not None and not self._closing:
            self._wanted.set()
            self._settled.clear()

    def start(self) -> None:
        if self._size > 0 and self._loop is None:
            self._loop = asyncio.create_task(self._refill(), name="warm-slots")
            self.wanted()

    async def wait_settled(self) -> None:
        """Until no warm start runs and none is due now (for tests and benchmarks)."""
        await self._settled.wait()

    async def close(self, timeout_s: float) -> None:
        """At shutdown, before anything else of the slots: no new start; those running get
        ``timeout_s``, then are cancelled; the warm sandboxes of FREE slots are ended."""
        self._closing = True
        if self._loop is not None:
            await cancel_and_wait([self._loop])
        started = list(self._starting)
        await finish_or_cancel(self._starting.values(), wait_s=timeout_s)
        # A start cancelled half-way may leave a sandbox that is up but not ready.
        ending = {slot for slot in [*self._warmed, *started] if slot.state is SlotState.FREE}
        await asyncio.gather(*(_end(slot, always=True) for slot in ending), return_exceptions=True)
        self._settled.set()

    # -- the refill ---------------------------------------------------------------------------
    async def _refill(self) -> None:
        while not self._closing:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
            # comes as the event is set, and this loop would then run on after close().
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESCAN_S):
                    await self._wanted.wait()
            self._wanted.clear()
            slots = self._to_warm()
            if slots and self._pause_s:  # after failures: slower, until one works
                await asyncio.sleep(self._pause_s)
                slots = self._to_warm()  # the table changed meanwhile
            for slot in slots:
                task = asyncio.create_task(self._warm(slot), name=f"slot-{slot.index}-warm")
                self._starting[slot] = task
                task.add_done_callback(functools.partial(self._finished, slot))
            self.peak_starting = max(self.peak_starting, len(self._starting))
            if self._starting:
                self._settled.clear()
            elif not self._wanted.is_set():
                self._settled.set()

    def _to_warm(self) -> list[Slot]:
        """Cold FREE slots to start now: within the bound (warm and warming count) and the
        concurrency."""
        if self._paused():
            return []
        starting = len(self._starting)
        room = min(self._size - self.warm - starting, self._concurrency - starting)
        if room <= 0:
            return []
        picked = []
        for slot in self._table:
            if (
                slot.state is SlotState.FREE
                and slot not in self._starting
                and self._failed_epoch.get(slot) != slot.epoch
                and isinstance(slot.tools.sandbox, BwrapSandbox)
                and not slot.tools.sandbox.running
            ):
                picked.append(slot)
                if len(picked) == room:
                    break
        return picked

    def _finished(self, slot: Slot, _: asyncio.Task[None]) -> None:
        del self._starting[slot]
        if not self._closing:
            self.wanted()  # the next one, or the bound is met

    async def _warm(self, slot: Slot) -> None:
        sandbox = slot.tools.sandbox
        assert isinstance(sandbox, BwrapSandbox)
        epoch = slot.epoch
        if slot.state is not SlotState.FREE:  # taken since it was picked
            return
        try:
            await sandbox.start()
        except Exception as exc:
            if slot.state is SlotState.FREE and slot.epoch == epoch:
                self._failed(slot, epoch, exc)
            else:  # released meanwhile (its reset made the start give up): not a failure
                log.debug("a warm start gave up", slot=slot.index, error=str(exc))
        else:
            self._pause_s = 0.0
            self._warmed[slot] = None  # counted while it is FREE and its sandbox up
        finally:
            if slot.state in _NOBODYS:
                # Released during the start: whatever came up is not left in an unwiped slot.
                await _end(slot)

    def _failed(self, slot: Slot, epoch: int, exc: Exception) -> None:
        self.failures += 1
        self._failed_epoch[slot] = epoch
        first = self._pause_s == 0.0
        self._pause_s = min(max(2 * self._pause_s, FAILURE_PAUSE_S), MAX_FAILURE_PAUSE_S)
        level = log.warning if first else log.debug
        level(
            "a warm start failed: the slot stays free and starts its sandbox at its first call",
            slot=slot.index,
            error=str(exc) or type(exc).__name__,
            failures=self.failures,
            next_try_s=self._pause_s,
        )


async def _end(slot: Slot, *, always: bool = False) -> None:
    """End the slot's sandbox (a reset: bounded in time, never raises)."""
    sandbox = slot.tools.sandbox
    if isinstance(sandbox, BwrapSandbox) and (always or sandbox.running or slot.state in _NOBODYS):
        await sandbox.reset()
