"""A slot sandbox's bubblewrap process, as the worker starts it and waits for its end.

Cheap to start and to keep, because a worker holds a thousand of them:

- No ``preexec_fn``: it would make the worker (a big process) fork instead of vfork. The
  slot's pids cgroup is joined by a ``sh`` that then execs the rest, and the drop to the
  slot's user is ``setpriv`` (util-linux); each is an exec, far cheaper than copying the
  worker's page tables. (Without ``setpriv`` the drop falls back to a ``preexec_fn``.)
- No asyncio child watcher (one thread per child on Python 3.11): the exit is read, only
  when someone waits for it, from a pidfd in the event loop; ``running`` polls.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

# $0 is the cgroup's procs file, "$@" the command: the shell moves itself, then becomes it.
_JOIN_CGROUP = 'echo $$ > "$0" && exec "$@"'


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")


def _drop_to(owner: tuple[int, int]) -> None:
    """In a child before exec: become the slot's unprivileged user (without setpriv)."""
    os.setgroups([])
    os.setgid(owner[1])
    os.setuid(owner[0])


def entry_argv(
    argv: list[str], *, cgroup: Path | None, owner: tuple[int, int] | None
) -> tuple[list[str], Callable[[], None] | None]:
    """The command line that runs ``argv`` in ``cgroup`` as ``owner``; a preexec_fn if needed."""
    prefix: list[str] = []
    if cgroup is not None:  # into the slot's pids cgroup, so nothing escapes it
        prefix = ["/bin/sh", "-c", _JOIN_CGROUP, str(cgroup / "cgroup.procs")]
    if owner is None:
        return prefix + argv, None
    setpriv = _setpriv()
    if setpriv is None:
        return prefix + argv, functools.partial(_drop_to, owner)
    drop = [setpriv, f"--reuid={owner[0]}", f"--regid={owner[1]}", "--clear-groups", "--"]
    return prefix + drop + argv, None


class SandboxProcess:
    """bubblewrap, started with its stderr on ``stderr`` and ``pass_fds`` open."""

    def __init__(
        self,
        argv: list[str],
        *,
        stderr: int,
        pass_fds: list[int],
        cgroup: Path | None,
        owner: tuple[int, int] | None,
    ) -> None:
        command, before_exec = entry_argv(argv, cgroup=cgroup, owner=owner)
        self._popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=pass_fds,
            preexec_fn=before_exec,
        )
        self.pid = self._popen.pid

    def poll(self) -> int | None:
        """Its exit code if it has exited (and then it is reaped), else None."""
        return self._popen.poll()

    def kill(self) -> None:
        self._popen.kill()  # does nothing once it is reaped: the pid may be another's by then

    async def wait(self) -> int:
        """Its exit code, once it has exited; the pidfd is open only while waiting."""
        if (code := self._popen.poll()) is not None:
            return code
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # no pidfds (Linux < 5.3): a thread waits instead
            return await asyncio.get_running_loop().run_in_executor(None, self._popen.wait)
        try:
            await pidfd_exited(pidfd)
        finally:
            os.close(pidfd)
        return self._popen.wait()


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
