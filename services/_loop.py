"""The event loop toolbus runs on: uvloop when it is installed (``pip install toolbus[fast]``),
else asyncio's own. uvloop's loop and transports are written in C: the per-call overhead of the
loop, its timers and its socket writes is lower than asyncio's.

Not for processes that start processes (sandbox workers, the sandbox benchmark): uvloop starts
a child by forking the whole process, asyncio (3.11) with vfork where it can; measured in the
sandbox benchmark's process, a plain ``bash -c true`` took 5.9 ms of its CPU with uvloop and
spawned at a quarter of asyncio's rate. Those run on asyncio's loop (``fast=False``).

``TOOLBUS_EVENT_LOOP=asyncio`` keeps asyncio's loop even where uvloop is installed; it is read
here, not in Settings, because the loop is chosen before settings are read and child processes
inherit the variable.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOP_ENV = "TOOLBUS_EVENT_LOOP"


def loop_factory(*, fast: bool = True) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when ``fast``, it is installed and not declined; None: asyncio's."""
    if not fast or os.environ.get(EVENT_LOOP_ENV, "auto").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name(*, fast: bool = True) -> str:
    return "asyncio" if loop_factory(fast=fast) is None else "uvloop"


def run(main: Coroutine[Any, Any, T], *, fast: bool = True) -> T:
    """``asyncio.run`` on the chosen loop (asyncio's own unless ``fast``)."""
    with asyncio.Runner(loop_factory=loop_factory(fast=fast)) as runner:
        return runner.run(main)
