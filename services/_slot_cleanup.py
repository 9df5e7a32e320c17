"""Taking a slot back from a trajectory: cancel its calls, end its sandbox, empty its workspace.

Each step has a deadline, and a slot whose clean-up fails or overruns goes OUT_OF_SERVICE rather
than back to FREE: it is never handed to another trajectory with files, processes or calls of the
last one. The wipe removes whatever the agent left, whatever it did to permissions
(``chmod 555 d`` or ``chmod 000 d`` defeat ``shutil.rmtree``), without following a symlink out of
the workspace, and checks that the workspace is empty before the slot counts as clean.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from ._slots import Slot, SlotTable

log = structlog.get_logger("toolbus.slots")

DEFAULT_CANCEL_TIMEOUT_S = 5.0  # for a slot's cancelled calls to finish
DEFAULT_SANDBOX_END_TIMEOUT_S = 10.0  # for its sandbox (and every process in it) to end
_WORKSPACE_MODE = 0o755


class WipeFailed(Exception):
    """Something is left in the workspace after the wipe."""


class SlotCleaner:
    """Runs the clean-up of slots that left a trajectory, and keeps track of it."""

    def __init__(
        self,
        table: SlotTable,
        *,
        cancel_timeout_s: float = DEFAULT_CANCEL_TIMEOUT_S,
        sandbox_end_timeout_s: float = DEFAULT_SANDBOX_END_TIMEOUT_S,
    ) -> None:
        self._table = table
        self._cancel_timeout_s = cancel_timeout_s
        self._sandbox_end_timeout_s = sandbox_end_timeout_s
        self._running: dict[Slot, asyncio.Task[None]] = {}
        self._settled = asyncio.Event()
        self._settled.set()

    def start_release(self, slot: Slot, *, wipe: bool) -> asyncio.Task[None]:
        """Clean a RELEASING slot up in a task of its own (it outlives the request that asked)."""
        return self._start(slot, self._release(slot, wipe=wipe))

    def start_wipe(self, slot: Slot) -> asyncio.Task[None]:
        """Wipe a WIPING slot in a task of its own."""
        return self._start(slot, self._wipe(slot))

    async def wait_settled(self) -> None:
        """Until no clean-up is running."""
        await self._settled.wait()

    async def close(self, timeout_s: float) -> None:
        """At shutdown: let running clean-ups finish for a while, then cancel them."""
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- the steps ----------------------------------------------------------------------------
    def _start(self, slot: Slot, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=f"slot-{slot.index}-cleanup")
        self._running[slot] = task
        self._settled.clear()
        task.add_done_callback(lambda done: self._finished(slot, done))
        return task

    def _finished(self, slot: Slot, task: asyncio.Task[None]) -> None:
        # Only its own entry: the slot may be cleaning again already, under a new task.
        if self._running.get(slot) is task:
            del self._running[slot]
        if not self._running:
            self._settled.set()

    async def _release(self, slot: Slot, *, wipe: bool) -> None:
        problem = await self._stop_calls(slot) or await self._end_sandbox(slot)
        if problem:
            self._table.out_of_service(slot, problem)
            return
        self._table.ended(slot, wipe=wipe)
        if wipe:
            await self._wipe(slot)

    async def _stop_calls(self, slot: Slot) -> str:
        calls = set(slot.tasks)  # final: a RELEASING slot takes no new call
        for task in calls:
            task.cancel()
        if calls:
            _, pending = await asyncio.wait(calls, timeout=self._cancel_timeout_s)
            if pending:
                return f"{len(pending)} calls did not stop within {self._cancel_timeout_s:g}s"
        return ""

    async def _end_sandbox(self, slot: Slot) -> str:
        try:
            # Background processes (&, nohup, setsid, tmux) end with the sandbox.
            await asyncio.wait_for(slot.tools.close(), self._sandbox_end_timeout_s)
        except TimeoutError:
            return f"its sandbox did not end within {self._sandbox_end_timeout_s:g}s"
        except Exception as exc:
            log.exception("ending a slot's sandbox failed", slot=slot.index)
            return f"ending its sandbox failed: {exc}"
        return ""

    async def _wipe(self, slot: Slot) -> None:
        try:
            # In a thread: a big tree takes a while, and heartbeats must go on meanwhile.
            await asyncio.to_thread(wipe_workspace, slot.workspace, slot.tools.sandbox.owner)
        except (OSError, WipeFailed) as exc:
            self._table.out_of_service(slot, f"wipe failed: {exc}")
            return
        self._table.wiped(slot)


def wipe_workspace(workspace: Path, owner: tuple[int, int] | None = None) -> None:
    """Empty ``workspace`` (it stays, with its usual mode and owner); WipeFailed if anything is
    left. Only what is inside is touched: symlinks are removed, never followed."""
    _make_removable(workspace)
    for entry in list(os.scandir(workspace)):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    left = [entry.name for entry in os.scandir(workspace)]
    if left:
        raise WipeFailed(f"{len(left)} entries left, e.g. {left[0]!r}")
    os.chmod(workspace, _WORKSPACE_MODE)
    if owner is not None:
        os.chown(workspace, *owner)


def _make_removable(workspace: Path) -> None:
    """Give every directory of the tree back its owner's rights (the agent may have taken them),
    top-down, so that each can be listed before it is entered."""
    _owner_rwx(str(workspace))
    for root, dirnames, _ in os.walk(workspace):
        for name in dirnames:
            _owner_rwx(os.path.join(root, name))


def _owner_rwx(path: str) -> None:
    mode = os.lstat(path).st_mode
    # lstat, and only directories: a symlink is never followed out of the workspace. Nothing of
    # the trajectory runs any more, so nothing can swap the entry in between.
    if stat.S_ISDIR(mode) and mode & stat.S_IRWXU != stat.S_IRWXU:
        os.chmod(path, stat.S_IMODE(mode) | stat.S_IRWXU)
