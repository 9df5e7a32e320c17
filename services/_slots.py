"""A worker's slots and the one place their state changes.

::

    FREE ──assign──▶ ASSIGNING ──confirm──▶ ASSIGNED ──begin_release──▶ RELEASING
      ▲    (lease being written)  │ └──fail_assignment (lease maybe written)──▶ │ calls cancelled,
      │                           └──abandon (no lease: nothing ran)──▶ FREE  sandbox ended
      │                                                                    ▼
      └────────wiped──── WIPING ◀──────────────── ended(reset) ─────────────┤
                           ▲                                                │ ended(no reset)
                           └──────────── claim_dirty ◀──── DIRTY ◀──────────┘
    any clean-up that fails ──▶ OUT_OF_SERVICE ──claim_out_of_service──▶ RELEASING (a retry)

A table may hold more slots than trajectories may hold at once (``capacity``: a worker's
``slots``; the rest are its spare slots, free and warm while the released ones are wiped):
``assign`` gives none while ``capacity`` slots are ASSIGNING or ASSIGNED, and ``free`` counts
no more than that leaves.

Every transition is a plain method call with no ``await`` inside, so no other task can see a
slot half-way: a slot is either free and clean, or it belongs to exactly one trajectory, or it
is being cleaned and belongs to nobody. ``assign`` takes only a FREE slot, and a slot becomes
FREE only through ``wiped`` (its workspace emptied, its sandbox ended) or ``abandon`` (assigned
but never used, because its lease could not be written). A transition from the wrong state is a
bug and raises :class:`SlotStateError`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import structlog

from schemas.internal import Lease

from ._image_store import Image
from ._tools import SlotTools

log = structlog.get_logger("toolbus.slots")


class SlotState(StrEnum):
    FREE = "free"  # clean and nobody's: the only state a trajectory is given a slot from
    ASSIGNING = "assigning"  # reserved for a trajectory while the worker writes its lease
    ASSIGNED = "assigned"  # the trajectory's workspace
    RELEASING = "releasing"  # nobody's: its calls are being cancelled and its sandbox ended
    DIRTY = "dirty"  # nobody's: released without reset; wiped before anyone gets it
    WIPING = "wiping"  # nobody's: its workspace is being emptied
    OUT_OF_SERVICE = "out_of_service"  # its clean-up failed: never handed out until one works


_HELD = frozenset({SlotState.ASSIGNING, SlotState.ASSIGNED})


class SlotStateError(RuntimeError):
    """A transition was asked of a slot in a state it cannot leave that way (a bug)."""


@dataclass(slots=True, eq=False)
class Slot:
    index: int
    workspace: Path
    tools: SlotTools
    state: SlotState = SlotState.FREE
    trajectory_id: str | None = None
    epoch: int = 0  # the assignment: a new one each time the slot is given to a trajectory
    lease: Lease | None = None  # the assignment's lease, once written
    lease_revision: int = 0  # the lease's revision in KV, as this worker last wrote it
    lease_written_at: float = 0.0  # monotonic
    last_used: float = 0.0  # monotonic time of its last call's start or end
    calls: int = 0  # calls this assignment has taken
    problem: str = ""  # why it is out of service
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # its calls run one at a time
    # Its lease's writes run one at a time, each from the revision the last one left.
    lease_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # its calls, queued or running
    # The image the assignment is made from (its trajectory named it), and what of it the
    # slot has at the time (``_image_slots.py``): its tools, made at the first call, and the
    # image they hold.
    image: str | None = None
    image_tools: SlotTools | None = None
    image_held: Image | None = None

    @property
    def held(self) -> bool:
        return self.state in _HELD


class SlotTable:
    """The slots of one worker. ``on_change`` is called after every transition that changes
    how many slots are free (the worker announces it); at most ``capacity`` are held at once
    (None: all of them)."""

    def __init__(
        self,
        *,
        on_change: Callable[[], None],
        warm: Callable[[], Slot | None] = lambda: None,
        capacity: int | None = None,
    ) -> None:
        self._capacity = capacity
        self._slots: list[Slot] = []
        self._warm = warm  # a FREE slot whose sandbox is up, given before a cold one
        self._by_trajectory: dict[str, Slot] = {}
        self._epochs = itertools.count(1)
        self._on_change = on_change

    def __iter__(self) -> Iterator[Slot]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, slot: Slot) -> None:
        """A new slot, in the state it was made in (a worker starts them WIPING)."""
        self._slots.append(slot)

    # -- reading ------------------------------------------------------------------------------
    def holding(self, trajectory_id: str) -> Slot | None:
        """The slot assigned (or being assigned) to the trajectory."""
        return self._by_trajectory.get(trajectory_id)

    def accepting(self, trajectory_id: str, epoch: int) -> Slot | None:
        """The slot a call of this assignment may run in, if it still has it."""
        slot = self._by_trajectory.get(trajectory_id)
        return slot if slot is not None and slot.epoch == epoch else None

    def count(self, *states: SlotState) -> int:
        return sum(1 for slot in self._slots if slot.state in states)

    @property
    def capacity(self) -> int:
        """How many trajectories may hold a slot at once."""
        return len(self._slots) if self._capacity is None else self._capacity

    @property
    def room(self) -> int:
        """How many more trajectories may be given a slot now, free slots permitting."""
        return max(self.capacity - self.count(SlotState.ASSIGNING, SlotState.ASSIGNED), 0)

    @property
    def free(self) -> int:
        """Slots a new trajectory can get: FREE now, or DIRTY (wiped first); no more than
        ``room``."""
        return min(self.count(SlotState.FREE, SlotState.DIRTY), self.room)

    # -- transitions --------------------------------------------------------------------------
    def assign(self, trajectory_id: str, image: str | None = None) -> Slot | None:
        """FREE → ASSIGNING for the trajectory, with a new epoch (a warm slot before a cold
        one), made from ``image`` if given; None when no slot is free."""
        if trajectory_id in self._by_trajectory:
            raise SlotStateError(f"trajectory {trajectory_id!r} already holds a slot")
        if not self.room:
            return None  # as many trajectories hold a slot as may: the spare ones stay free
        slot = self._warm()
        if slot is None or slot.state is not SlotState.FREE:
            slot = next((s for s in self._slots if s.state is SlotState.FREE), None)
        if slot is None:
            return None
        slot.state = SlotState.ASSIGNING
        slot.trajectory_id = trajectory_id
        slot.image = image
        slot.epoch = next(self._epochs)
        slot.last_used = time.monotonic()
        slot.calls = 0
        self._by_trajectory[trajectory_id] = slot
        self._on_change()
        return slot

    def confirm(self, slot: Slot, lease: Lease, revision: int) -> None:
        """ASSIGNING → ASSIGNED: its lease is in KV at ``revision``."""
        self._expect(slot, SlotState.ASSIGNING)
        slot.state = SlotState.ASSIGNED
        slot.lease = lease
        slot.lease_revision = revision
        slot.lease_written_at = time.monotonic()

    def abandon(self, slot: Slot) -> None:
        """ASSIGNING → FREE: its lease was never written, so no call could have reached it."""
        self._expect(slot, SlotState.ASSIGNING)
        self._unhold(slot)
        slot.state = SlotState.FREE
        slot.image = None  # nothing of it was made: no call came
        self._on_change()

    def fail_assignment(self, slot: Slot) -> None:
        """ASSIGNING → RELEASING: writing its lease failed in a way that may have written it,
        and a call may have come in: cleaned up like any released slot, never just freed."""
        self._expect(slot, SlotState.ASSIGNING)
        self._unhold(slot)
        slot.state = SlotState.RELEASING
        self._on_change()  # room for one more trajectory: a spare slot may be free for it

    def begin_release(self, slot: Slot) -> str:
        """ASSIGNED → RELEASING: from here no new call reaches it. Returns the trajectory."""
        self._expect(slot, SlotState.ASSIGNED)
        trajectory_id = self._unhold(slot)
        slot.state = SlotState.RELEASING
        self._on_change()  # as in fail_assignment
        return trajectory_id

    def ended(self, slot: Slot, *, wipe: bool) -> None:
        """RELEASING → WIPING (now) or DIRTY (the wipe waits until the slot is needed)."""
        self._expect(slot, SlotState.RELEASING)
        slot.state = SlotState.WIPING if wipe else SlotState.DIRTY
        if not wipe:
            self._on_change()

    def claim_dirty(self) -> Slot | None:
        """DIRTY → WIPING: a slot whose wipe was deferred, to be wiped now (none while there
        is no room for another trajectory: it could not be given)."""
        if not self.room:
            return None
        slot = next((s for s in self._slots if s.state is SlotState.DIRTY), None)
        if slot is not None:
            slot.state = SlotState.WIPING
            self._on_change()
        return slot

    def claim_out_of_service(self) -> Slot | None:
        """OUT_OF_SERVICE → RELEASING: one more try at the whole clean-up of a slot that failed."""
        slot = next((s for s in self._slots if s.state is SlotState.OUT_OF_SERVICE), None)
        if slot is not None:
            slot.state = SlotState.RELEASING
        return slot

    def wiped(self, slot: Slot) -> None:
        """WIPING → FREE: its workspace (and its image overlay) empty and its sandbox gone."""
        self._expect(slot, SlotState.WIPING)
        slot.state = SlotState.FREE
        slot.image = None
        slot.problem = ""
        self._on_change()

    def out_of_service(self, slot: Slot, problem: str) -> None:
        """RELEASING or WIPING → OUT_OF_SERVICE: never handed out dirty."""
        self._expect(slot, SlotState.RELEASING, SlotState.WIPING)
        slot.state = SlotState.OUT_OF_SERVICE
        slot.problem = problem
        log.error("slot out of service", slot=slot.index, problem=problem)
        self._on_change()

    # -- plumbing -----------------------------------------------------------------------------

    def _unhold(self, slot: Slot) -> str:
        trajectory_id = slot.trajectory_id
        assert trajectory_id is not None
        del self._by_trajectory[trajectory_id]
        slot.trajectory_id = None
        slot.lease = None
        return trajectory_id

    @staticmethod
    def _expect(slot: Slot, *states: SlotState) -> None:
        if slot.state not in states:
            wanted = " or ".join(states)
            raise SlotStateError(f"slot {slot.index} is {slot.state}, not {wanted}")
