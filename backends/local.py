"""Sandbox workers as child processes of this host (``toolbus worker``), one per worker.

Each child gets the service's settings through ``TOOLBUS_*`` environment variables, its own
worker id, and is stopped with SIGTERM (then SIGKILL) when the backend exits; it also gets
SIGTERM if toolbus itself dies, so no worker is left orphaned.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Mapping
from types import TracebackType

import structlog

from services._children import child_preexec, stop_process
from services.exceptions import StartupError

log = structlog.get_logger("toolbus.backend.local")


class LocalWorkers:
    def __init__(self, *, count: int, env: Mapping[str, str], python: str = sys.executable) -> None:
        self._count = count
        self._env = dict(env)
        self._python = python
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
        env = {**self._env, "TOOLBUS_WORKER_ID": worker_id}
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
