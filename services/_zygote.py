"""The worker's side of its launcher zygote (``_zygote_main.py``).

One small process per worker starts every slot's bubblewrap (as a child of the worker's) and
forks every slot's launcher into its sandbox, so a sandbox's start costs bubblewrap and a fork:
no interpreter start, no shell or ``setpriv`` in front of bubblewrap. :class:`LauncherZygote`
starts it at the first spawn, starts it again if it is gone, and ends it at :meth:`close`
(the launchers it made end with their own control sockets, the sandboxes with their stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import marshal
import os
import socket
import subprocess
import sys
from pathlib import Path

import structlog

from ._sandbox_contract import SANDBOX_WORKSPACE, SandboxError
from ._sandbox_process import pidfd_exited

log = structlog.get_logger("toolbus.sandbox")

_MAIN = Path(__file__).with_name("_zygote_main.py")
_CLOSE_TIMEOUT_S = 5.0


class LauncherZygote:
    """Forks launchers into sandboxes on request; one per worker."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._launch_ids = itertools.count(1)

    async def spawn(
        self,
        argv: list[str],
        *,
        report_pid: int,
        stderr: int,
        fds: list[int],
        owner: tuple[int, int] | None,
        cgroup: Path | None,
    ) -> None:
        """Start ``argv`` as a child of this process, in ``cgroup``, as ``owner``, with
        ``stderr`` and ``fds`` as its 2, 3, 4, ...; it writes its pid to ``report_pid`` (a
        pipe) first and closes it, and says on ``stderr`` why it could not run, if so.
        SandboxError when no zygote answers."""
        message = {
            "op": "spawn",
            "argv": argv,
            "uid": owner[0] if owner else None,
            "gid": owner[1] if owner else None,
            "cgroup": str(cgroup) if cgroup is not None else None,
        }
        await self._send(marshal.dumps(message), [report_pid, stderr, *fds])

    async def launch(
        self,
        control: socket.socket,
        *,
        pid1: int,
        pidfd: int,
        owner: tuple[int, int] | None,
        cgroup: Path | None,
        rlimits: str,
        cwd: str = SANDBOX_WORKSPACE,
    ) -> int:
        """Fork a launcher that joins the namespaces of ``pidfd`` (pid ``pid1`` on the host)
        and serves ``control`` from ``cwd`` (its commands start there); its launch id, for
        :meth:`end`. The launcher says ``ready`` (or why not) on ``control``. SandboxError
        when no zygote answers."""
        launch_id = next(self._launch_ids)
        message = {
            "op": "launch",
            "id": launch_id,
            "pid": pid1,
            "uid": owner[0] if owner else None,
            "gid": owner[1] if owner else None,
            "cgroup": str(cgroup) if cgroup is not None else None,
            "rlimits": rlimits,
            "cwd": cwd,
        }
        await self._send(marshal.dumps(message), [pidfd, control.fileno()])
        return launch_id

    async def _send(self, data: bytes, fds: list[int]) -> None:
        for _ in range(2):  # a zygote that died is started again, once
            sock = self._running()
            try:
                await send_with_fds(sock, data, fds)
                return
            except OSError as exc:
                if not isinstance(exc, ConnectionError) and exc.errno != errno.EBADF:
                    raise SandboxError(f"cannot reach the launcher zygote: {exc}") from None
                # Another launch may have started a new zygote while this one waited to send.
                if self._sock is sock:
                    log.warning("the launcher zygote is gone; starting another", error=str(exc))
                    self._forget()
        raise SandboxError("the launcher zygote is not answering")

    def end(self, launch_id: int) -> None:
        """SIGKILL to a launcher, if it still runs (it ends anyway when its socket closes)."""
        if self._sock is None:
            return
        # If full, or the zygote is gone: the control socket's close ends the launcher anyway.
        with contextlib.suppress(OSError):
            self._sock.send(marshal.dumps({"op": "end", "id": launch_id}))

    async def close(self) -> None:
        """End the zygote: it exits when its socket closes (killed if it does not)."""
        process, sock = self._process, self._sock
        self._process = self._sock = None
        if sock is not None:
            sock.close()
        if process is None:
            return
        if not await _exited(process, _CLOSE_TIMEOUT_S):
            process.kill()
            await _exited(process, _CLOSE_TIMEOUT_S)

    def _running(self) -> socket.socket:
        if self._sock is not None and self._process is not None and self._process.poll() is None:
            return self._sock
        self._forget()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(_MAIN), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        return ours

    def _forget(self) -> None:
        """Let go of a zygote that is gone (or never was)."""
        if self._sock is not None:
            self._sock.close()
        if self._process is not None:
            self._process.kill()
            self._process.poll()  # reaped if it has exited; else a later poll reaps it
        self._process = self._sock = None


async def _exited(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    if process.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(process.pid)
    except OSError:
        return process.poll() is not None
    try:
        ended = await pidfd_exited(pidfd, timeout_s)
    finally:
        os.close(pidfd)
    process.poll()
    return ended


async def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """One packet with ``fds`` attached, waiting while the socket's buffer is full."""
    while True:
        try:
            socket.send_fds(sock, [data], fds)
            return
        except BlockingIOError:
            await asyncio.sleep(0.001)
