"""A slot sandbox's bubblewrap process: what its spawn started (:func:`read_spawned`), its end
(:func:`end_bubblewrap`: never before its sandbox's pid 1 is known), and the wait for it.

Cheap to start and to keep, because a worker holds a thousand of them:

- Started by the launcher zygote (``LauncherZygote.spawn``), which joins the slot's pids
  cgroup and drops to the slot's user before its exec: no shell and no ``setpriv`` exec in
  front of bubblewrap, and no copy of the worker (a big process). It is still the worker's
  child (``CLONE_PARENT``), so ``--die-with-parent`` ties it to the worker and its pid stays
  its own until the worker reaps it.
- No asyncio child watcher (one thread per child on Python 3.11): the exit is read, only
  when someone waits for it, from a pidfd in the event loop; ``poll`` looks without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
from dataclasses import dataclass

import structlog

log = structlog.get_logger("toolbus.sandbox")

# SIGKILL ends bubblewrap at once; only a process stuck in the kernel (D state) can delay it.
STOP_TIMEOUT_S = 5.0
_POLL_S = 0.01


class SandboxProcess:
    """bubblewrap: a child of this process whose pid the launcher zygote said."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._code: int | None = None

    def poll(self) -> int | None:
        """Its exit code if it has exited (and then it is reaped), else None."""
        if self._code is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not ours to reap (never happens): as good as ended
                self._code = -int(signal.SIGKILL)
            else:
                if pid:
                    self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def kill(self) -> None:
        # Only while unreaped: until then the pid cannot be another process's.
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    async def wait(self) -> int:
        """Its exit code, once it has exited; the pidfd is open only while waiting."""
        while (code := self.poll()) is None:
            try:
                pidfd = os.pidfd_open(self.pid)
            except OSError:  # out of fds: look again and again instead
                await asyncio.sleep(_POLL_S)
                continue
            try:
                await pidfd_exited(pidfd)
            finally:
                os.close(pidfd)
        return code


async def pidfd_exited(pidfd: int, timeout_s: float | None = None) -> bool:
    """Whether the process of ``pidfd`` has ended (within ``timeout_s``, if given): a pidfd is
    readable from then on. The event loop watches it only while this waits."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        async with asyncio.timeout(timeout_s):
            await exited
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
    return True


@dataclass(frozen=True, slots=True)
class Spawned:
    """What a spawn of bubblewrap started (``read_spawned``): bubblewrap (None if nothing
    started), the host pid of its namespace's pid 1 and a pidfd of it (None if bubblewrap
    ended before it said, or with ``error``: why none could be opened)."""

    process: SandboxProcess | None
    pid1: int | None = None
    pidfd: int | None = None
    error: str | None = None


async def read_spawned(report: int, info: int) -> Spawned:
    """Bubblewrap's pid from ``report`` (the pipe its spawn writes it to), then its child's
    from ``info`` (bubblewrap's info pipe, written at once after its clone, before the
    sandbox's set-up); both pipes are closed here. Whoever takes the result ends it."""
    try:
        said = await read_pipe(report)
    except BaseException:
        os.close(info)
        raise
    if not said.isdigit():
        os.close(info)  # nothing started: the zygote could not, or was gone
        return Spawned(None)
    process = SandboxProcess(int(said))
    pid1 = _child_pid(await read_pipe(info))
    if pid1 is None:
        return Spawned(process)
    try:
        pidfd = os.pidfd_open(pid1)
    except OSError as exc:
        if exc.errno == errno.ESRCH:  # it has ended already
            return Spawned(process)
        return Spawned(process, pid1, error=f"cannot watch the sandbox: {exc.strerror}")
    # Bubblewrap reaps its child only as it exits itself: while bubblewrap is unreaped and
    # that pid is still its child's, the pidfd is of the sandbox's pid 1, not of a reuse.
    if process.poll() is not None or _parent_of(pid1) != process.pid:
        os.close(pidfd)
        return Spawned(process)
    return Spawned(process, pid1, pidfd)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    return int(text[text.rfind(b")") + 2 :].split()[1])


async def end_bubblewrap(
    process: SandboxProcess | None,
    pidfd: int | None,
    spawning: asyncio.Task[Spawned] | None,
    unreaped: list[SandboxProcess],
) -> bool:
    """Until nothing of the sandbox runs: its pid 1 is killed (``pidfd``), and with it, by the
    kernel, every process of its namespace; then bubblewrap, which exits as its child does.
    A stop that came before its start learnt them takes them from ``spawning`` first:
    bubblewrap is never killed before its child is known, because its child sets
    --die-with-parent only at the end of its set-up, and outlives an earlier kill. One that
    does not exit in time goes to ``unreaped``. False when pid 1 did not end in time (or was
    not known in time: it is ended once it is). The pidfd is closed here."""
    pid1 = None
    if spawning is not None:
        # Within moments: the spawn says bubblewrap's pid first, bubblewrap its child's
        # right after its clone. Never cancelled: what it yields late is ended then.
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                spawned = await asyncio.shield(spawning)
        except TimeoutError:
            log.warning("a sandbox's start did not say its processes in time")
            spawning.add_done_callback(lambda task: _end_when_known(task, unreaped))
            return False
        except Exception:  # its pipes failed: nothing is known to end
            spawned = Spawned(None)
        process, pidfd, pid1 = spawned.process, spawned.pidfd, spawned.pid1
    try:
        _kill_pid1(pidfd, pid1, process)
        if process is not None:
            process.kill()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:  # stuck in the kernel: reaped by a later stop
                log.warning("bubblewrap did not exit after SIGKILL", pid=process.pid)
                unreaped.append(process)
        # A namespace's pid 1 ends once the kernel has ended every other process in it.
        if pidfd is not None and not await pidfd_exited(pidfd, STOP_TIMEOUT_S):
            log.warning("the sandbox's processes did not all end after SIGKILL")
            return False
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_pid1(pidfd: int | None, pid1: int | None, process: SandboxProcess | None) -> None:
    if pidfd is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    elif pid1 is not None and process is not None and process.poll() is None:
        # No pidfd could be opened (out of fds): by its number, while bubblewrap, which reaps
        # it only as it exits, still runs.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid1, signal.SIGKILL)


def _end_when_known(spawning: asyncio.Task[Spawned], unreaped: list[SandboxProcess]) -> None:
    """A spawn's late outcome, when its stop could not wait for it: ended, reaped later."""
    if spawning.cancelled() or spawning.exception() is not None:
        return
    spawned = spawning.result()
    _kill_pid1(spawned.pidfd, spawned.pid1, spawned.process)
    if spawned.pidfd is not None:
        os.close(spawned.pidfd)
    if spawned.process is not None:
        spawned.process.kill()
        unreaped.append(spawned.process)


def _child_pid(info: bytes) -> int | None:
    """The pid in bubblewrap's info JSON, if it says one."""
    try:
        pid = json.loads(info).get("child-pid")
    except (ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 1 else None


async def read_pipe(fd: int, *, until: bytes = b"") -> bytes:
    """What is written to pipe ``fd`` until it closes (or ends with ``until``), at most 64 KiB;
    the fd is closed here, whatever happens."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and sum(map(len, chunks)) < 65536:
            chunks.append(data)
            if not until or not b"".join(chunks).endswith(until):
                return
        if not done.done():
            done.set_result(None)

    try:
        os.set_blocking(fd, False)
        loop.add_reader(fd, on_readable)
        try:
            await done
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)
    return b"".join(chunks)
