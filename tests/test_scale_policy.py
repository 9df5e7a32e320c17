"""The autoscaler's arithmetic and steps (``services/_scale_policy.py``): pure, no I/O."""

from __future__ import annotations

import pytest

from services._scale_policy import Cooldown, ScalePolicy, Step, WorkersSeen, plan


def _policy(**overrides: float) -> ScalePolicy:
    options = {"min_workers": 1, "max_workers": 5, "slots_per_worker": 4, "headroom_slots": 2}
    return ScalePolicy(**(options | overrides))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("held", "waiting", "desired"),
    [
        (0, 0, 1),  # headroom 2 -> one worker; and never below min_workers
        (2, 0, 1),  # 2 + 2 = 4 slots: one worker
        (3, 0, 2),  # 5 slots: two
        (4, 6, 3),  # 12 slots: three
        (40, 10, 5),  # clamped to max_workers
    ],
)
def test_desired_is_held_plus_waiting_plus_headroom_in_workers(
    held: int, waiting: int, desired: int
) -> None:
    assert _policy().desired(slots_held=held, waiting=waiting) == desired


def test_desired_keeps_min_workers_with_nothing_to_do() -> None:
    assert _policy(min_workers=3, headroom_slots=0).desired(slots_held=0, waiting=0) == 3
    assert _policy(min_workers=0, headroom_slots=0).desired(slots_held=0, waiting=0) == 0


def test_a_policy_with_min_above_max_is_refused() -> None:
    with pytest.raises(ValueError, match="min_workers"):
        _policy(min_workers=6)


def _seen(
    serving: dict[str, int] | None = None,
    draining: list[str] | None = None,
    drained: list[str] | None = None,
    pending: int = 0,
) -> WorkersSeen:
    return WorkersSeen(
        serving=serving or {}, draining=draining or [], drained=drained or [], pending=pending
    )


def test_scale_up_takes_back_draining_then_drained_workers_before_starting_new_ones() -> None:
    seen = _seen({"a": 4}, draining=["b"], drained=["c"])
    assert plan(2, seen, down_allowed=False) == Step(resume=["b"], stop=["c"])
    assert plan(3, seen, down_allowed=False) == Step(resume=["b", "c"])
    assert plan(5, seen, down_allowed=False) == Step(resume=["b", "c"], start=2)


def test_workers_started_and_not_registered_yet_count_as_there() -> None:
    assert plan(3, _seen({"a": 4}, pending=2), down_allowed=False) == Step()
    assert plan(4, _seen({"a": 4}, pending=2), down_allowed=False) == Step(start=1)


def test_a_drained_worker_not_wanted_is_stopped() -> None:
    assert plan(1, _seen({"a": 0}, drained=["b"]), down_allowed=False) == Step(stop=["b"])


def test_scale_down_drains_one_worker_only_when_allowed_and_settled() -> None:
    two = {"a": 1, "b": 0}
    assert plan(1, _seen(two), down_allowed=False) == Step()
    assert plan(1, _seen(two), down_allowed=True) == Step(drain_one=True)
    # One at a time: not while another drains, nor while a start is under way.
    assert plan(1, _seen(two, draining=["c"]), down_allowed=True) == Step()
    assert plan(1, _seen(two, pending=1), down_allowed=True) == Step()
    assert plan(2, _seen(two), down_allowed=True) == Step()  # as many as wanted


def test_cooldown_needs_fewer_wanted_all_through_it_and_no_change_within_it() -> None:
    cooldown = Cooldown(60.0)
    assert not cooldown.allows_down(0.0, fewer_wanted=True)
    assert not cooldown.allows_down(59.0, fewer_wanted=True)
    assert cooldown.allows_down(60.0, fewer_wanted=True)
    # A moment with as many wanted restarts the clock.
    assert not cooldown.allows_down(61.0, fewer_wanted=False)
    assert not cooldown.allows_down(62.0, fewer_wanted=True)
    assert cooldown.allows_down(122.0, fewer_wanted=True)
    # A change (a start, a drain) does too.
    cooldown.changed(122.0)
    assert not cooldown.allows_down(150.0, fewer_wanted=True)
    assert cooldown.allows_down(182.0, fewer_wanted=True)
