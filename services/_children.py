"""Child processes that must not outlive toolbus (nats-server, local workers)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
DEFAULT_STOP_TIMEOUT_S = 15.0


def child_preexec() -> None:
    """In the child before exec: its own session, and SIGTERM when toolbus dies (Linux)."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def stop_process(
    process: asyncio.subprocess.Process, *, timeout: float = DEFAULT_STOP_TIMEOUT_S
) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
