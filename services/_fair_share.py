"""Fair share between trajectories at an executor: a cap on each one's calls in flight.

An executor holds at most ``max_pending_calls`` calls, shared by every trajectory; without a
cap of its own, one trajectory sending calls without waiting for their answers fills that and
every other trajectory gets 429. Past ``max_calls_per_trajectory`` calls in flight, a
trajectory's new call is refused at once (429 ``too_many_calls``, nothing ran, so sending it
again is safe) with a hint of when a call of it is likely to end.

The hint is the trajectory's pace: calls of one slot run one after another, so the next one
ends about one interval between endings from the last. Only trajectories with calls in flight
are kept, so memory follows the calls, not the trajectories ever seen.

The cap is per executor: executors share no counts (a shared count would cost a round trip per
call), so a trajectory whose calls spread over E executors has at most E times the cap in
flight. A worker's slots are fair by themselves: a slot runs one call at a time, so a flood
waits in its own slot's queue, not in another's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from schemas.errors import ErrorKind

from .exceptions import Overloaded

# Before a trajectory's first call has ended, there is no pace to go by.
DEFAULT_RETRY_AFTER_S = 0.5
_MIN_RETRY_AFTER_S = 0.01
_MAX_RETRY_AFTER_S = 10.0
_PACE_WEIGHT = 0.3  # of the newest interval in the running mean: follows a change in a few


class TrajectoryLimits:
    """Counts each trajectory's calls in flight and refuses one past ``max_calls``."""

    def __init__(self, *, max_calls: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_calls < 1:
            raise ValueError(f"max_calls must be at least 1, got {max_calls}")
        self.max_calls = max_calls
        self._clock = clock
        self._in_flight: dict[str, _Calls] = {}

    @property
    def trajectories(self) -> int:
        """Trajectories with calls in flight here now."""
        return len(self._in_flight)

    def admit(self, trajectory_id: str) -> AbstractContextManager[None]:
        """Count one call of the trajectory until the returned block exits; raise 429 when it
        has ``max_calls`` in flight already."""
        calls = self._in_flight.get(trajectory_id)
        if calls is None:
            calls = self._in_flight[trajectory_id] = _Calls(self, trajectory_id, self._clock())
        elif calls.count >= self.max_calls:
            raise Overloaded(
                f"trajectory {trajectory_id!r} has {calls.count} calls in flight at this "
                f"executor, the most it may have (max_calls_per_trajectory); send this call "
                "again when one of them has been answered",
                kind=ErrorKind.TOO_MANY_CALLS,
                retry_after_s=calls.retry_after_s(),
            )
        calls.count += 1
        return calls

    def _ended(self, calls: _Calls) -> None:
        now = self._clock()
        calls.count -= 1
        calls.note_end(now)
        if calls.count == 0:
            del self._in_flight[calls.trajectory_id]


class _Calls(AbstractContextManager[None]):
    """One trajectory's calls in flight, and its pace. The block of one call (no per-call
    object: this is on every call's path)."""

    __slots__ = ("_began", "_last_end", "_limits", "_pace", "count", "trajectory_id")

    def __init__(self, limits: TrajectoryLimits, trajectory_id: str, began: float) -> None:
        self._limits = limits
        self.trajectory_id = trajectory_id
        self.count = 0
        self._began = began
        self._last_end: float | None = None
        self._pace: float | None = None  # running mean of the time between endings

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        self._limits._ended(self)

    def note_end(self, now: float) -> None:
        interval = now - (self._last_end if self._last_end is not None else self._began)
        self._last_end = now
        if self._pace is None:
            self._pace = interval
        else:
            self._pace += _PACE_WEIGHT * (interval - self._pace)

    def retry_after_s(self) -> float:
        pace = DEFAULT_RETRY_AFTER_S if self._pace is None else self._pace
        return round(min(max(pace, _MIN_RETRY_AFTER_S), _MAX_RETRY_AFTER_S), 3)
