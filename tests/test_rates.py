"""RateWindow: events per second over a sliding window, on a clock the test moves."""

from __future__ import annotations

import pytest

from services._rates import DEFAULT_WINDOW_S, RateWindow


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_a_steady_rate_reads_steady_over_every_window() -> None:
    clock = FakeClock(1000.3)
    rates = RateWindow(clock=clock)
    for tick in range(1, 1201):  # two minutes in 0.1 s steps, an event every other step: 5/s
        clock.now = 1000.3 + tick / 10
        if tick % 2 == 0:
            rates.add()
        if tick > 600:  # past the first minute, no saw-tooth as seconds leave the window
            assert rates.per_second(60) == pytest.approx(5, abs=0.05)
            assert rates.per_second(10) == pytest.approx(5, abs=0.2)
            assert rates.per_second(1) == pytest.approx(5, abs=1.0)


def test_the_oldest_second_is_weighed_by_its_part_in_the_window() -> None:
    clock = FakeClock(2000.0)
    rates = RateWindow(window_s=10, clock=clock)
    clock.advance(20)
    rates.add(10)  # all in second 2020
    clock.advance(10.25)  # now 2030.25: the window starts at 2020.25, 3/4 of second 2020
    assert rates.per_second(10) == pytest.approx(10 * 0.75 / 10)
    clock.advance(0.75)  # second 2020 left the window
    assert rates.per_second(10) == 0


def test_younger_than_the_window_the_rate_is_since_creation_and_never_divides_by_zero() -> None:
    clock = FakeClock()
    rates = RateWindow(clock=clock)
    assert rates.per_second(60) == 0
    rates.add(3)
    assert rates.per_second(60) == 3  # at least a second: not 3 / 0
    clock.advance(0.5)
    assert rates.per_second(10) == 3
    clock.advance(3.5)  # 4 s old
    rates.add(5)
    assert rates.per_second(60) == pytest.approx(8 / 4)
    assert rates.per_second(10) == pytest.approx(8 / 4)


def test_events_older_than_the_window_are_forgotten_and_memory_stays_bounded() -> None:
    clock = FakeClock()
    rates = RateWindow(clock=clock)
    for _ in range(1000):
        rates.add(7)
        clock.advance(1)
    assert rates.per_second(60) == pytest.approx(7)
    assert len(rates._counts) == DEFAULT_WINDOW_S + 1
    clock.advance(61)
    assert rates.per_second(60) == 0
    assert rates.per_second(1) == 0
    rates.add(2)  # a bucket reused after a long pause starts from zero
    assert rates.per_second(1) == 2


def test_window_bounds_are_checked() -> None:
    rates = RateWindow(window_s=10, clock=FakeClock())
    with pytest.raises(ValueError, match="between 1 and 10"):
        rates.per_second(11)
    with pytest.raises(ValueError, match="between 1 and 10"):
        rates.per_second(0)
    with pytest.raises(ValueError, match="at least 1"):
        RateWindow(window_s=0)
