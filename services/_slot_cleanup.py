"""Taking a slot back from a trajectory: cancel its calls, end its sandbox, empty its workspace.

Stopping its calls and ending its sandbox have deadlines; the wipe runs in a thread for as long
as the tree takes (the slot stays WIPING meanwhile). A slot whose clean-up fails or overruns
goes OUT_OF_SERVICE rather than back to FREE: it is never handed to another trajectory with
files, processes or calls of the last one. The wipe removes whatever the agent left, whatever it
did to permissions (``chmod 555 d`` or ``chmod 000 d`` defeat ``shutil.rmtree``) and however deep
(it keeps one directory open at a time and no recursion), never following a symlink out of the
workspace, and checks that the workspace is empty before the slot counts as clean.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from ._image_slots import ImageSlots
from ._slots import Slot, SlotTable
from ._tasks import finish_or_cancel

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
        assignment_ended: Callable[[int], None] = lambda epoch: None,
        images: ImageSlots,
    ) -> None:
        self._table = table
        self._images = images  # what image slots made, undone with the rest
        self._assignment_ended = assignment_ended  # by epoch: what is kept of its calls goes
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
        await finish_or_cancel(self._running.values(), wait_s=timeout_s)

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
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a slot's clean-up failed", slot=slot.index, error=repr(exc))

    async def _release(self, slot: Slot, *, wipe: bool) -> None:
        # The sandbox ends even when a call would not stop: nothing of the slot runs on.
        problems = [await self._stop_calls(slot), await self._end_sandbox(slot)]
        self._assignment_ended(slot.epoch)
        if any(problems):
            self._table.out_of_service(slot, "; ".join(p for p in problems if p))
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
            await asyncio.wait_for(self._end_sandboxes(slot), self._sandbox_end_timeout_s)
        except TimeoutError:
            return f"its sandbox did not end within {self._sandbox_end_timeout_s:g}s"
        except Exception as exc:
            log.exception("ending a slot's sandbox failed", slot=slot.index)
            return f"ending its sandbox failed: {exc}"
        return ""

    async def _end_sandboxes(self, slot: Slot) -> None:
        try:
            await slot.tools.close()
        finally:
            await self._images.end(slot)

    async def _wipe(self, slot: Slot) -> None:
        try:
            await self._images.drop_overlay(slot)
            # In a thread: a big tree takes a while, and heartbeats must go on meanwhile.
            await asyncio.to_thread(wipe_workspace, slot.workspace, slot.tools.sandbox.owner)
        except Exception as exc:  # whatever it was, the slot is not known to be clean
            self._table.out_of_service(slot, f"wipe failed: {exc!r}")
            return
        self._table.wiped(slot)


def wipe_workspace(workspace: Path, owner: tuple[int, int] | None = None) -> None:
    """Empty ``workspace`` (it stays, with its usual mode and owner); WipeFailed if anything is
    left. Only what is inside is touched: symlinks are removed, never followed.

    Depth-first without recursion, holding one directory open at a time and going back up
    through ``..`` (nothing of the trajectory runs any more, so nothing can move a directory
    meanwhile): no tree is too deep for it, for the stack or for open files.
    """
    _give_back(workspace)
    fd = os.open(workspace, _DIRECTORY_FLAGS)
    try:
        path: list[tuple[str, list[str]]] = []  # the directories we are in: (name, still to do)
        todo = _remove_files(fd)
        while True:
            if todo:
                name = todo.pop()
                inner = os.open(name, _DIRECTORY_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
                path.append((name, todo))
                todo = _remove_files(fd)
                continue
            if not path:
                break
            name, todo = path.pop()
            outer = os.open("..", _DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = outer
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    left = [entry.name for entry in os.scandir(workspace)]
    if left:
        raise WipeFailed(f"{len(left)} entries left, e.g. {left[0]!r}")
    os.chmod(workspace, _WORKSPACE_MODE)
    if owner is not None:
        os.chown(workspace, *owner)


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _remove_files(fd: int) -> list[str]:
    """Remove every entry of the open directory but its subdirectories; those are returned,
    listable and enterable again (the agent may have taken its owner's rights away)."""
    directories = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                mode = entry.stat(follow_symlinks=False).st_mode
                if mode & stat.S_IRWXU != stat.S_IRWXU:
                    os.chmod(entry.name, stat.S_IMODE(mode) | stat.S_IRWXU, dir_fd=fd)
                directories.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    return directories


def _give_back(workspace: Path) -> None:
    mode = os.lstat(workspace).st_mode
    if mode & stat.S_IRWXU != stat.S_IRWXU:
        os.chmod(workspace, stat.S_IMODE(mode) | stat.S_IRWXU)
