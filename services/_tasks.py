"""Ending background tasks at shutdown, whatever they are awaiting.

On Python 3.11, ``asyncio.wait_for`` (which nats-py uses for every request and publish ack)
returns the awaited result when a cancel comes in the very turn that result arrives, and the
cancel is lost: a loop cancelled there (a heartbeat whose ack was just in) goes on running, and
a shutdown that awaits it waits for ever. So a task is cancelled again until it has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

RECANCEL_S = 0.5  # a task still running this long after its cancel is cancelled again


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any]], *, timeout_s: float | None = None
) -> None:
    """Cancel ``tasks`` and wait until each has ended (at most ``timeout_s``, if given)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        wait = RECANCEL_S
        if deadline is not None:
            wait = min(wait, deadline - loop.time())
            if wait <= 0:
                return
        _, pending = await asyncio.wait(pending, timeout=wait)


async def finish_or_cancel(
    tasks: Iterable[asyncio.Future[Any]], *, wait_s: float, cancel_timeout_s: float | None = None
) -> None:
    """Let ``tasks`` finish for ``wait_s``, then cancel what is left and wait for it to end
    (at most ``cancel_timeout_s``, if given): the drain of a graceful shutdown."""
    running = [task for task in tasks if not task.done()]
    if not running:
        return
    _, pending = await asyncio.wait(running, timeout=wait_s)
    await cancel_and_wait(pending, timeout_s=cancel_timeout_s)
