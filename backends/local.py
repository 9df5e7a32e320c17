"""Sandbox workers as child processes of this host (``toolbus worker``), one per worker.

Each child gets the service's settings through ``TOOLBUS_*`` environment variables, its own
worker id, and is stopped with SIGTERM (then SIGKILL) when the backend exits; it also gets
SIGTERM if toolbus itself dies, so no worker is left orphaned. An autoscaler starts more and
stops chosen ones (``backends/scaling.py``); a worker started takes the lowest index no running
worker has, so ``env_for`` (its sandbox users' uids) never gives two running workers one range.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable, Mapping
from types import TracebackType

import structlog

from services._children import child_preexec, stop_process
from services.exceptions import StartupError

log = structlog.get_logger("toolbus.backend.local")

DEFAULT_READY_TIMEOUT_S = 30.0


class LocalWorkers:
    """``count`` worker processes; ``env_for(k)`` adds variables for the worker of index k."""

    def __init__(
        self,
        *,
        count: int,
        env: Mapping[str, str],
        env_for: Callable[[int], Mapping[str, str]] | None = None,
        python: str = sys.executable,
    ) -> None:
        self._count = count
        self._env = dict(env)
        self._env_for = env_for
        self._python = python
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._indexes: dict[str, int] = {}  # of the workers in _processes

    @property
    def worker_ids(self) -> list[str]:
        return list(self._processes)

    def running(self) -> list[str]:
        """The workers started here whose process has not ended."""
        return [wid for wid, process in self._processes.items() if process.returncode is None]

    async def __aenter__(self) -> LocalWorkers:
        try:
            for _ in range(self._count):
                await self.start_worker()
        except BaseException:
            await self.stop_all()
            raise
        return self

    async def start_worker(self) -> str:
        worker_id = f"local-{uuid.uuid4().hex[:8]}"
        self._forget_ended()
        index = min(set(range(len(self._indexes) + 1)) - set(self._indexes.values()))
        extra = self._env_for(index) if self._env_for is not None else {}
        env = {**self._env, **extra, "TOOLBUS_WORKER_ID": worker_id}
        try:
            process = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                "services",
                "worker",
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=child_preexec,
            )
        except OSError as exc:
            raise StartupError(f"could not start a local worker: {exc.strerror}") from exc
        self._processes[worker_id] = process
        self._indexes[worker_id] = index
        log.info("local worker started", worker_id=worker_id, pid=process.pid, index=index)
        return worker_id

    async def stop_worker(self, worker_id: str) -> None:
        """SIGTERM to one worker (SIGKILL if it has not ended within the stop timeout)."""
        process = self._processes.pop(worker_id, None)
        self._indexes.pop(worker_id, None)
        if process is not None:
            await stop_process(process)
            log.info("local worker stopped", worker_id=worker_id, code=process.returncode)

    def _forget_ended(self) -> None:
        """Workers whose process ended on its own: their index is free again."""
        for worker_id in [wid for wid in self._processes if wid not in self.running()]:
            del self._processes[worker_id]
            self._indexes.pop(worker_id, None)

    async def wait_registered(
        self, registered: Callable[[], int], *, timeout_s: float = DEFAULT_READY_TIMEOUT_S
    ) -> None:
        """Return once ``registered()`` counts every worker started here.

        Raises StartupError when a worker exits first or the deadline passes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while registered() < len(self._processes):
            if failed := self.exited():
                raise StartupError(f"local workers exited at start: {failed} (see their logs)")
            if loop.time() > deadline:
                raise StartupError(f"local workers did not register within {timeout_s:g}s")
            await asyncio.sleep(0.05)

    def exited(self) -> dict[str, int]:
        """Workers whose process ended, with their exit codes."""
        return {
            worker_id: process.returncode
            for worker_id, process in self._processes.items()
            if process.returncode is not None
        }

    async def stop_all(self) -> None:
        processes = list(self._processes.values())
        self._processes.clear()
        self._indexes.clear()
        await asyncio.gather(*(stop_process(process) for process in processes))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()
        log.info("local workers stopped")
