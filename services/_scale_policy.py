"""How many workers an autoscaler wants, and what it does about it: pure, no I/O.

- **Desired**: enough workers for the slots held now, the trajectories waiting for one and
  ``headroom_slots`` more (a burst of new trajectories finds a slot at once), in
  ``min_workers..max_workers``.
- **Up at once**: a worker being drained is taken back first (it serves again at once, warm),
  then new ones are started; workers started but not registered yet count as there.
- **Down slowly**: only when fewer were wanted all through the last ``cooldown_s``, and nothing
  was changed within it; one worker at a time, and only by draining it (``_worker_drain.py``):
  it is stopped once it holds no slot, never before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._setting_defaults import DEFAULT_SCALE_COOLDOWN_S, DEFAULT_SCALE_HEADROOM_SLOTS


@dataclass(frozen=True, kw_only=True)
class ScalePolicy:
    min_workers: int
    max_workers: int
    slots_per_worker: int
    headroom_slots: int = DEFAULT_SCALE_HEADROOM_SLOTS
    cooldown_s: float = DEFAULT_SCALE_COOLDOWN_S

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} > max_workers {self.max_workers}")
        if self.slots_per_worker < 1:
            raise ValueError("slots_per_worker must be 1 or more")

    def desired(self, *, slots_held: int, waiting: int) -> int:
        wanted = slots_held + waiting + self.headroom_slots
        count = math.ceil(wanted / self.slots_per_worker)
        return max(self.min_workers, min(self.max_workers, count))


@dataclass(frozen=True, kw_only=True)
class WorkersSeen:
    """The workers one backend runs, as their registrations say."""

    serving: dict[str, int]  # worker id: slots held
    draining: list[str]
    drained: list[str]
    pending: int = 0  # started (or asked of the backend) but not registered yet

    @property
    def current(self) -> int:
        """Workers that serve, or will."""
        return len(self.serving) + self.pending


@dataclass(frozen=True)
class Step:
    """What one round of the autoscaler does, in this order."""

    resume: list[str] = field(default_factory=list)  # drained or draining: serve again
    start: int = 0  # new workers
    stop: list[str] = field(default_factory=list)  # drained: stopped (they hold nothing)
    drain_one: bool = False  # drain one serving worker (the backend says which)


@dataclass
class Cooldown:
    """Whether a scale-down may start now: fewer workers wanted all through the last
    ``cooldown_s``, and no change made within it."""

    cooldown_s: float
    _fewer_since: float | None = None
    _changed_at: float = -math.inf

    def changed(self, now: float) -> None:
        self._changed_at = now

    def allows_down(self, now: float, *, fewer_wanted: bool) -> bool:
        if not fewer_wanted:
            self._fewer_since = None
            return False
        if self._fewer_since is None:
            self._fewer_since = now
        quiet_since = max(self._fewer_since, self._changed_at)
        return now - quiet_since >= self.cooldown_s


def plan(desired: int, seen: WorkersSeen, *, down_allowed: bool) -> Step:
    """One round's step from the desired count and the workers as they are."""
    current = seen.current
    leaving = [*seen.draining, *seen.drained]  # draining first: its slots are still warm
    resume = leaving[: max(desired - current, 0)]
    start = max(desired - current - len(resume), 0)
    stop = [worker_id for worker_id in seen.drained if worker_id not in resume]
    drain_one = (
        desired < current
        and down_allowed
        and not seen.draining  # one at a time
        and not seen.pending  # the count is settled
        and len(seen.serving) > 0
    )
    return Step(resume=resume, start=start, stop=stop, drain_one=drain_one)
