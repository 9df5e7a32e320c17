"""Running one shell command in a sandbox with a timeout, bounded output and a whole-tree kill."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from ._diskguard import DiskGuard
from ._sandbox import MAX_ARG_BYTES, RunningCommand, Sandbox

# ``bash -c COMMAND`` takes the command as one exec argument: the longest ``terminal`` command,
# in bytes of UTF-8 (the persistent shell reads its commands from stdin: no such limit there).
MAX_COMMAND_BYTES = MAX_ARG_BYTES
# After the command's own process exits, its background children may still hold the pipes open:
# read what they already wrote for this long, then stop listening rather than wait for them.
_PIPE_GRACE_S = 0.2
_READ_CHUNK = 64 * 1024
# A killed command reports its exit at once; when it does not, the sandbox's launcher is not
# answering (stopped, say): then the whole sandbox is reset, so the timeout still ends it all.
_KILL_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class StreamCapture:
    text: str
    total_bytes: int
    truncated: bool
    data: bytes = b""  # the bytes kept (at most 4 per character of the limit), undecoded


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    exit_code: int | None  # None when it was killed for the timeout
    stdout: StreamCapture
    stderr: StreamCapture
    timed_out: bool
    duration_s: float
    disk_full: bool = False  # killed by the disk guard


class BoundedReader:
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
        data = b"".join(self._chunks)
        text = data.decode("utf-8", errors="replace")
        truncated = self.total > self._kept or len(text) > self._max_chars
        return StreamCapture(text[: self._max_chars], self.total, truncated, data)


async def run_command(
    sandbox: Sandbox,
    command: str,
    *,
    timeout_s: float,
    max_output_chars: int,
    disk_guard: DiskGuard | None = None,
) -> CommandOutcome:
    """Run ``command``; on timeout kill it and all it started, keeping the output so far."""
    started = time.monotonic()
    running = await sandbox.run(command)
    with disk_guard.watch(running) if disk_guard else contextlib.nullcontext([False]) as killed:
        return await _finish(sandbox, running, started, timeout_s, max_output_chars, killed)


async def _finish(
    sandbox: Sandbox,
    running: RunningCommand,
    started: float,
    timeout_s: float,
    max_output_chars: int,
    disk_full: list[bool],
) -> CommandOutcome:
    out, err = BoundedReader(max_output_chars), BoundedReader(max_output_chars)
    readers = [
        asyncio.ensure_future(out.drain(running.stdout)),
        asyncio.ensure_future(err.drain(running.stderr)),
    ]
    timed_out = False
    exit_code: int | None = None
    try:
        try:
            exit_code = await asyncio.wait_for(running.wait(), timeout_s)
        except TimeoutError:
            timed_out = True
            await _kill(sandbox, running)
        await asyncio.wait(readers, timeout=_PIPE_GRACE_S)
    finally:
        # Cancelled (release, shutdown) or done: nothing of this call may keep its pipes.
        running.close()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return CommandOutcome(
        exit_code=None if timed_out else exit_code,
        stdout=out.capture(),
        stderr=err.capture(),
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
        disk_full=disk_full[0],
    )


async def _kill(sandbox: Sandbox, running: RunningCommand) -> None:
    running.kill()
    try:
        await asyncio.wait_for(running.wait(), _KILL_WAIT_S)
    except TimeoutError:
        await sandbox.reset()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(running.wait(), _KILL_WAIT_S)
