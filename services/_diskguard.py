"""A guard against commands that fill the disk under the workspaces.

RLIMIT_FSIZE bounds one file, not a loop writing many. While commands run, the guard checks the
free space of the workspaces' filesystem a few times a second; below ``min_free_mb`` it kills
every running command (they are the ones writing) and their results say ``disk_full``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ._tasks import cancel_and_wait

_POLL_S = 0.2


class _Killable(Protocol):
    def kill(self) -> None: ...


class DiskGuard:
    def __init__(self, path: Path, *, min_free_mb: int) -> None:
        self._path = path
        self._min_free = min_free_mb * 1024 * 1024
        self._running: dict[_Killable, list[bool]] = {}
        self._task: asyncio.Task[None] | None = None

    def free_bytes(self) -> int:
        stat = os.statvfs(self._path)
        return stat.f_bavail * stat.f_frsize

    @contextlib.contextmanager
    def watch(self, command: _Killable) -> Iterator[list[bool]]:
        """While the block runs, ``flag[0]`` turns True if the guard killed the command."""
        flag = [False]
        self._running[command] = flag
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="disk-guard")
        try:
            yield flag
        finally:
            self._running.pop(command, None)

    async def _poll(self) -> None:
        while self._running:
            if self.free_bytes() < self._min_free:
                for command, flag in list(self._running.items()):
                    flag[0] = True
                    command.kill()
            await asyncio.sleep(_POLL_S)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
