"""``terminal_stateful``: one persistent bash per slot, whose cwd, environment, variables and
functions carry over from one call to the next.

Each call is sent to the shell as one line that ``eval``s the command (base64-encoded, so no
quoting in it can break the line) with stdin from /dev/null, then prints an end marker with the
exit code on stdout and one on stderr; the markers carry a random nonce per call. A timeout or an
``exit`` ends the shell; the next call starts a new one, and the results say so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import time
from dataclasses import dataclass

from ._diskguard import DiskGuard
from ._process import BoundedReader, CommandOutcome
from ._sandbox import RunningCommand, Sandbox

_SHELL = ["/bin/bash", "--noprofile", "--norc"]
_MARKER = b"__TOOLBUS_DONE_"
_HOLD_BACK = 256  # longer than any marker: bytes that may be the start of one
_EXIT_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class StatefulOutcome:
    outcome: CommandOutcome
    new_shell: bool  # this call started a new shell (the first, or after one ended)
    shell_ended: bool  # this call ended the shell (timeout or exit): its state is gone


class _MarkedReader(BoundedReader):
    """Reads a stream up to an end marker, keeping the first characters and counting bytes."""

    def __init__(self, max_chars: int, marker: re.Pattern[bytes]) -> None:
        super().__init__(max_chars)
        self._marker = marker
        self.match: re.Match[bytes] | None = None

    async def drain_until_marker(self, stream: asyncio.StreamReader) -> None:
        pending = b""
        try:
            while chunk := await stream.read(64 * 1024):
                pending += chunk
                found = self._marker.search(pending)
                if found is not None:
                    self.match = found
                    pending = pending[: found.start()]
                    return
                if len(pending) > _HOLD_BACK:
                    self._keep(pending[:-_HOLD_BACK])
                    pending = pending[-_HOLD_BACK:]
        finally:
            # Marker found, shell ended, or timed out (cancelled): what came before is output.
            self._keep(pending)

    def _keep(self, piece: bytes) -> None:
        self.total += len(piece)
        if self._kept < self._max_bytes:
            kept = piece[: self._max_bytes - self._kept]
            self._chunks.append(kept)
            self._kept += len(kept)


class StatefulShell:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self._shell: RunningCommand | None = None

    async def run(
        self,
        command: str,
        *,
        timeout_s: float,
        max_output_chars: int,
        disk_guard: DiskGuard | None = None,
    ) -> StatefulOutcome:
        started = time.monotonic()
        new_shell = self._shell is None
        if self._shell is None:
            self._shell = await self._sandbox.spawn(_SHELL, stdin=True)
        shell = self._shell
        assert shell.stdin is not None
        nonce = secrets.token_hex(16).encode()
        encoded = base64.b64encode(command.encode()).decode()
        marker = (_MARKER + nonce).decode()
        shell.stdin.write(
            f'eval "$(printf %s {encoded} | base64 -d)" </dev/null; __toolbus_rc=$?; '
            f"printf '{marker}:%d;' \"$__toolbus_rc\"; printf '{marker};' >&2\n".encode()
        )
        out = _MarkedReader(
            max_output_chars, re.compile(re.escape(_MARKER + nonce) + rb":(-?\d+);")
        )
        err = _MarkedReader(max_output_chars, re.compile(re.escape(_MARKER + nonce) + rb";"))
        timed_out = False
        # The guard kills the whole shell: the drain then ends at EOF without a marker.
        guard = disk_guard.watch(shell) if disk_guard else contextlib.nullcontext([False])
        with guard as disk_full:
            try:
                await asyncio.wait_for(
                    asyncio.gather(
                        out.drain_until_marker(shell.stdout), err.drain_until_marker(shell.stderr)
                    ),
                    timeout_s,
                )
            except TimeoutError:
                timed_out = True
        exit_code: int | None
        if out.match is not None and not timed_out:
            exit_code = int(out.match.group(1))
            shell_ended = False
        else:
            # Timed out, or the command ended the shell (``exit``): this shell is done.
            shell_ended = True
            exit_code = None if timed_out else await self._exit_code(shell)
            await self.close()
        return StatefulOutcome(
            CommandOutcome(
                exit_code=exit_code,
                stdout=out.capture(),
                stderr=err.capture(),
                timed_out=timed_out,
                duration_s=time.monotonic() - started,
                disk_full=disk_full[0],
            ),
            new_shell=new_shell,
            shell_ended=shell_ended,
        )

    @staticmethod
    async def _exit_code(shell: RunningCommand) -> int | None:
        try:
            return await asyncio.wait_for(shell.wait(), _EXIT_WAIT_S)
        except TimeoutError:
            return None

    async def close(self) -> None:
        """End the shell and everything it started."""
        shell, self._shell = self._shell, None
        if shell is not None:
            shell.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shell.wait(), _EXIT_WAIT_S)
            shell.close()
