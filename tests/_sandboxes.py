"""Direct BwrapSandbox instances for tests that need the sandbox without the rest of the stack."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from services._process import CommandOutcome, run_command
from services._sandbox import BwrapOptions, BwrapSandbox, Sandbox, find_bwrap
from services._zygote import LauncherZygote


@asynccontextmanager
async def bwrap_sandbox(
    workspace: Path, *, allow_network: bool = False, zygote: LauncherZygote | None = None
) -> AsyncIterator[BwrapSandbox]:
    """A sandbox on ``workspace``, with a launcher zygote of its own unless given one."""
    bwrap = find_bwrap()
    assert bwrap is not None, "these tests need bubblewrap"
    workspace.mkdir(parents=True, exist_ok=True)
    options = BwrapOptions(bwrap=bwrap, allow_network=allow_network)
    own = zygote is None
    launchers = LauncherZygote() if zygote is None else zygote
    sandbox = BwrapSandbox(workspace, options, zygote=launchers)
    try:
        yield sandbox
    finally:
        try:
            await sandbox.close()
        finally:
            if own:
                await launchers.close()


async def sh(sandbox: Sandbox, command: str, *, timeout_s: float = 20) -> CommandOutcome:
    return await run_command(sandbox, command, timeout_s=timeout_s, max_output_chars=100_000)


# Markers of the test processes of this run (``sleep {RUN}1003``): another test run on the same
# machine starts the same commands, and pgrep must not count those.
RUN = str(10_000 + os.getpid() % 90_000)


def host_processes(marker: str) -> list[str]:
    """Pids of host processes whose command line contains ``marker``."""
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False)
    return found.stdout.split()
