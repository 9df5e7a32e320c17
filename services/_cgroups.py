"""A pids cgroup per slot, so a fork bomb in one slot stops at ``max_processes``.

RLIMIT_NPROC cannot do this when the worker runs as root (the kernel exempts root), so the
worker puts each slot's sandbox in a cgroup of the pids controller when it can write one:
cgroup v1's ``/sys/fs/cgroup/pids`` today. Without one, the limit is the rlimit alone (which
holds for a non-root worker, per user).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

_V1_PIDS = Path("/sys/fs/cgroup/pids")


class PidsCgroups:
    def __init__(self, root: Path) -> None:
        self._root = root

    @classmethod
    def create(cls, name: str) -> PidsCgroups | None:
        """A writable pids hierarchy for this worker, or None when there is none."""
        if not (_V1_PIDS / "cgroup.procs").exists() or not os.access(_V1_PIDS, os.W_OK):
            return None
        root = _V1_PIDS / "toolbus" / name
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        return cls(root)

    def slot(self, index: int, max_pids: int) -> Path:
        path = self._root / f"slot_{index}"
        path.mkdir(exist_ok=True)
        (path / "pids.max").write_text(str(max_pids))
        return path

    async def remove(self, *, timeout_s: float = 2.0) -> None:
        """Remove the cgroups once empty (killed sandboxes take a moment to be reaped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            for child in self._root.glob("slot_*"):
                with contextlib.suppress(OSError):
                    child.rmdir()
            with contextlib.suppress(OSError):
                self._root.rmdir()
            if not self._root.exists() or loop.time() > deadline:
                return
            await asyncio.sleep(0.05)


def join_cgroup(path: Path) -> None:
    """In a child process before exec: move itself into the cgroup (its children follow)."""
    (path / "cgroup.procs").write_text(str(os.getpid()))
