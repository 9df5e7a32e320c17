"""Running one shell command with a timeout, bounded output and a whole-group kill.

:class:`ProcessLauncher` is the seam where a sandbox wraps the command: the plain launcher runs
``bash -c`` in the workspace; a sandboxing launcher only changes the argv and says so in
``sandboxed`` / ``network_isolated``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

# After the command's own process exits, its background children may still hold the pipes open:
# read what they already wrote for this long, then stop listening rather than wait for them.
_PIPE_GRACE_S = 0.2
_READ_CHUNK = 64 * 1024

_BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": "dumb",
}


class ProcessLauncher:
    """Starts ``bash -c`` in a workspace as a plain host process (no isolation)."""

    sandboxed = False
    network_isolated = False

    def argv(self, command: str, workspace: Path) -> list[str]:
        return ["bash", "-c", command]

    def env(self, workspace: Path) -> dict[str, str]:
        return {**_BASE_ENV, "HOME": str(workspace), "PWD": str(workspace)}

    async def start(self, command: str, workspace: Path) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.argv(command, workspace),
            cwd=workspace,
            env=self.env(workspace),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so a kill reaches its children
        )


@dataclass(frozen=True, slots=True)
class StreamCapture:
    text: str
    total_bytes: int
    truncated: bool


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    exit_code: int | None  # None when it was killed for the timeout
    stdout: StreamCapture
    stderr: StreamCapture
    timed_out: bool
    duration_s: float


class _BoundedReader:
    """Keeps the first ``max_chars`` characters of a stream and counts every byte."""

    def __init__(self, max_chars: int) -> None:
        self._max_bytes = max_chars * 4  # a UTF-8 character is at most 4 bytes
        self._max_chars = max_chars
        self._chunks: list[bytes] = []
        self._kept = 0
        self.total = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(_READ_CHUNK):
            self.total += len(chunk)
            if self._kept < self._max_bytes:
                piece = chunk[: self._max_bytes - self._kept]
                self._chunks.append(piece)
                self._kept += len(piece)

    def capture(self) -> StreamCapture:
        text = b"".join(self._chunks).decode("utf-8", errors="replace")
        truncated = self.total > self._kept or len(text) > self._max_chars
        return StreamCapture(text[: self._max_chars], self.total, truncated)


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_command(
    launcher: ProcessLauncher,
    command: str,
    workspace: Path,
    *,
    timeout_s: float,
    max_output_chars: int,
    on_start: asyncio.Future[int] | None = None,
) -> CommandOutcome:
    """Run ``command``; on timeout kill its whole process group and keep the output so far."""
    started = time.monotonic()
    proc = await launcher.start(command, workspace)
    if on_start is not None and not on_start.done():
        on_start.set_result(proc.pid)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _BoundedReader(max_output_chars), _BoundedReader(max_output_chars)
    readers = [
        asyncio.ensure_future(out.drain(proc.stdout)),
        asyncio.ensure_future(err.drain(proc.stderr)),
    ]
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            timed_out = True
            kill_group(proc.pid)
            await proc.wait()
        await asyncio.wait(readers, timeout=_PIPE_GRACE_S)
    finally:
        # Cancelled (release, shutdown) or done: nothing of this call may keep running.
        if proc.returncode is None:
            kill_group(proc.pid)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return CommandOutcome(
        exit_code=None if timed_out else proc.returncode,
        stdout=out.capture(),
        stderr=err.capture(),
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
    )
