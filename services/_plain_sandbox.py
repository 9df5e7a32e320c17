"""A slot's commands as plain host processes: no isolation at all.

:class:`PlainSandbox` runs ``bash -c`` as a host process in the workspace. It is used only when
bubblewrap cannot run and ``require_sandbox`` is off; results say ``sandboxed: false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from ._command_pipes import _CallPipes
from ._sandbox_contract import (
    _BASE_ENV,
    RunningCommand,
    SandboxLimits,
    apply_rlimits,
    check_argv,
)


class _HostCommand:
    def __init__(self, process: asyncio.subprocess.Process, pipes: _CallPipes) -> None:
        self._process = process
        self._transports = pipes.transports
        self.stdout, self.stderr = pipes.readers
        self.stdin: asyncio.WriteTransport | None = pipes.stdin

    async def wait(self) -> int:
        return await self._process.wait()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)

    def close(self) -> None:
        if self._process.returncode is None:
            self.kill()
        for transport in self._transports:
            transport.close()


class PlainSandbox:
    """``bash -c`` as a host process in the workspace: no isolation at all."""

    sandboxed = False
    network_isolated = False

    def __init__(self, workspace: Path, limits: SandboxLimits) -> None:
        self.workspace = workspace
        self.inner_workspace = str(workspace)
        self.python = sys.executable
        self.owner: tuple[int, int] | None = None
        self._rlimits = limits.rlimits()
        self._groups: set[int] = set()

    async def run(self, command: str) -> RunningCommand:
        return await self.spawn(["bash", "-c", command])

    async def spawn(
        self, argv: list[str], *, stdin: bool = False, stdin_fd: int | None = None
    ) -> RunningCommand:
        check_argv(argv)
        rlimits = self._rlimits
        pipes = _CallPipes()
        try:
            await pipes.make(stdin and stdin_fd is None)
            child_stdin = pipes.for_child[2] if pipes.stdin else asyncio.subprocess.DEVNULL
            process = await asyncio.create_subprocess_exec(
                *argv,
                preexec_fn=lambda: apply_rlimits(rlimits),
                cwd=self.workspace,
                env={**_BASE_ENV, "HOME": str(self.workspace), "PWD": str(self.workspace)},
                stdin=stdin_fd if stdin_fd is not None else child_stdin,
                stdout=pipes.for_child[0],
                stderr=pipes.for_child[1],
                start_new_session=True,  # its own process group, so a kill reaches its children
            )
        except BaseException:
            pipes.abandon()
            raise
        pipes.close_child_ends()
        self._groups.add(process.pid)
        return _HostCommand(process, pipes)

    async def reset(self) -> None:
        for group in self._groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        self._groups.clear()

    async def close(self) -> None:
        await self.reset()
