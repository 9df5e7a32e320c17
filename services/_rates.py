"""Events per second over a sliding window, for ``tools.status``: how busy the executor is now.

Totals since start say little about the present; a rate over the last 10 or 60 seconds does.
Counts go into one-second buckets of a ring, so memory stays O(window) whatever the call rate,
and ``add`` is a few integer operations on the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

DEFAULT_WINDOW_S = 60
# A rate over less than this is noise (a burst of three calls is not "3000 per second").
_MIN_SPAN_S = 1.0


class RateWindow:
    """Counts of events in one-second buckets over the last ``window_s`` seconds."""

    def __init__(
        self, *, window_s: int = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if window_s < 1:
            raise ValueError(f"window_s must be at least 1 second, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._created = clock()
        # One bucket more than the window: the oldest, partly covered second is weighed in.
        self._counts = [0] * (window_s + 1)
        self._seconds = [-1] * (window_s + 1)  # which second each bucket holds

    def add(self, n: int = 1) -> None:
        """Count ``n`` events now."""
        second = math.floor(self._clock())
        index = second % len(self._counts)
        if self._seconds[index] != second:  # the bucket held a second that left the window
            self._seconds[index] = second
            self._counts[index] = 0
        self._counts[index] += n

    def per_second(self, window_s: float) -> float:
        """Events per second over the last ``window_s`` seconds (1 to the window's length).

        Younger than that, the rate is over the time since creation (at least a second). The
        oldest second is weighed by how much of it lies in the window, so a steady rate reads
        steady, not in a saw-tooth as whole seconds drop out.
        """
        if not 1 <= window_s <= self.window_s:
            raise ValueError(f"window_s must be between 1 and {self.window_s}, got {window_s}")
        now = self._clock()
        start = now - window_s
        if start < self._created:  # younger than the window: everything, since creation
            return self._sum(lambda second: 1.0) / max(now - self._created, _MIN_SPAN_S)
        first = math.floor(start)
        partial = first + 1 - start  # the part of the oldest second inside the window

        def weight(second: int) -> float:
            if second > first:
                return 1.0
            return partial if second == first else 0.0  # older: a stale bucket

        return self._sum(weight) / window_s

    def _sum(self, weight: Callable[[int], float]) -> float:
        return sum(
            count * weight(second)
            for count, second in zip(self._counts, self._seconds, strict=True)
            if count
        )
