"""The event loop toolbus runs on: uvloop when it is installed (``pip install toolbus[fast]``),
else asyncio's own. uvloop's loop and transports are written in C: the per-call overhead of the
loop, its timers and its socket writes is a fraction of asyncio's.

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


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when it is installed and not declined; None: asyncio's loop."""
    if os.environ.get(EVENT_LOOP_ENV, "auto").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
