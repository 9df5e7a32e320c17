"""Sandbox workers as child processes of this host (``toolbus worker``), one per worker.

Each child gets the service's settings through ``TOOLBUS_*`` environment variables, its own
worker id, and is stopped with SIGTERM (then SIGKILL) when the backend exits; it also gets
SIGTERM if toolbus itself dies, so no worker is left orphaned.
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
    """``count`` worker processes; ``env_for(k)`` adds variables for the k-th one started."""

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
        self._started = 0
        self._processes: dict[str, asyncio.subprocess.Process] = {}

    @property
    def worker_ids(self) -> list[str]:
        return list(self._processes)

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
        extra = self._env_for(self._started) if self._env_for is not None else {}
        self._started += 1
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
        log.info("local worker started", worker_id=worker_id, pid=process.pid)
        return worker_id

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
        await asyncio.gather(*(stop_process(process) for process in processes))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()
        log.info("local workers stopped")
