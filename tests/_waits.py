"""Waiting in tests for state that has no event to await (a worker's slots, an executor's
queue): polled, always with a bound, so a test that would wait for ever fails instead."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(
    predicate: Callable[[], bool], timeout_s: float = 30.0, *, every_s: float = 0.02
) -> None:
    """Until ``predicate()`` holds; TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the state is another object's, with no event
            await asyncio.sleep(every_s)
