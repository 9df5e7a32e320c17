"""A sandbox worker or an executor in a process of its own, for tests that stop, pause or kill
it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from services.executor import ExecutorService

_READY_TIMEOUT_S = 30.0


class WorkerProcess:
    def __init__(self, process: asyncio.subprocess.Process, worker_id: str) -> None:
        self.process = process
        self.worker_id = worker_id

    def pause(self) -> None:
        """SIGSTOP: the worker stalls as a whole (no heartbeats, no answers), as under a long
        GC pause, a swapped-out host or a CPU-starved container."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def worker_process(
    nats_url: str,
    data_dir: Path,
    worker_id: str,
    *,
    registered: Callable[[str], bool],
    slots: int = 2,
    heartbeat_s: float = 0.5,
    **settings: str,
) -> AsyncIterator[WorkerProcess]:
    """``toolbus worker`` as a child process; yields once ``registered(worker_id)`` is true."""
    process = await _start(
        "worker",
        nats_url,
        worker_id=worker_id,
        slots=str(slots),
        heartbeat_s=str(heartbeat_s),
        data_dir=str(data_dir),
        min_free_disk_mb="0",
        **settings,
    )
    worker = WorkerProcess(process, worker_id)
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            while not registered(worker_id):
                if process.returncode is not None:
                    raise RuntimeError(f"worker exited at start with {process.returncode}")
                await asyncio.sleep(0.05)
        yield worker
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.resume()
            await stop_process(process)


@contextlib.asynccontextmanager
async def executor_process(
    nats_url: str, *, ready: Callable[[], Awaitable[bool]], **settings: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``toolbus executor`` as a child process; yields once ``await ready()`` is true."""
    process = await _start("executor", nats_url, **settings)
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            while not await ready():
                if process.returncode is not None:
                    raise RuntimeError(f"executor exited at start with {process.returncode}")
                await asyncio.sleep(0.05)
        yield process
    finally:
        await stop_process(process)


async def _start(command: str, nats_url: str, **settings: str) -> asyncio.subprocess.Process:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "TOOLBUS_NATS_URL": nats_url,
        "TOOLBUS_LOG_LEVEL": "warning",
        **{f"TOOLBUS_{name.upper()}": value for name, value in settings.items()},
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services", command, env=env, stdin=asyncio.subprocess.DEVNULL
    )


async def stop_process(process: asyncio.subprocess.Process, *, grace_s: float = 20) -> None:
    """SIGTERM, and SIGKILL if it has not exited within ``grace_s``."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        process.kill()
        await process.wait()


def registered_with(executor: ExecutorService) -> Callable[[str], bool]:
    """For ``worker_process``: whether the executor knows the worker of this id."""

    def known(worker_id: str) -> bool:
        return any(info.worker_id == worker_id for info, _ in executor.registered_workers())

    return known
