"""Running ``_artifact_helper.py`` in a slot's sandbox, for the artifact operations.

The helper runs as the slot's user, inside the sandbox, so it can reach nothing the agent's own
commands could not. Its stdout carries the operation's bytes (a file, a listing, an archive),
bounded by what the operation expects; its last stderr line is its JSON summary, which says
whether it succeeded and what it did.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._sandbox import Sandbox

_HELPER_SOURCE = Path(__file__).with_name("_artifact_helper.py").read_text()
_MAX_HELPER_STDERR = 64 * 1024
_READ_CHUNK = 1 << 16


class ArtifactFailure(Exception):
    """The operation ran and failed; the message is for the caller."""


async def run_helper(
    sandbox: Sandbox,
    operation: str,
    arguments: dict[str, Any],
    *,
    sink: Callable[[bytes], object] | None = None,
    max_output: int = 0,
    stdin_fd: int | None = None,
) -> dict[str, Any]:
    """Run the helper in the sandbox; its stdout goes to ``sink``; its summary returned."""
    argv = [
        sandbox.python,
        "-I",
        "-S",
        "-B",
        "-c",
        _HELPER_SOURCE,
        operation,
        json.dumps({"root": sandbox.inner_workspace, **arguments}),
    ]
    command = await sandbox.spawn(argv, stdin_fd=stdin_fd)

    async def pump_stdout() -> None:
        received = 0
        while chunk := await command.stdout.read(_READ_CHUNK):
            received += len(chunk)
            if received > max_output:
                raise ArtifactFailure(f"artifact {operation}: more output than expected")
            if sink is not None:
                sink(chunk)

    try:
        _, errors = await asyncio.gather(
            pump_stdout(), _read_capped(command.stderr, _MAX_HELPER_STDERR)
        )
        code = await command.wait()
    finally:
        command.close()
    summary = _summary(errors)
    if summary is None:
        tail = errors.decode(errors="replace").strip()[-500:]
        raise ArtifactFailure(
            f"artifact {operation} failed in the sandbox (exit code {code})"
            + (f": {tail}" if tail else "")
        )
    if not summary.get("ok"):
        raise ArtifactFailure(str(summary.get("error") or f"artifact {operation} failed"))
    return summary


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> bytes:
    """Everything until EOF, keeping the last ``limit`` bytes (the summary is the last line)."""
    kept = b""
    while chunk := await stream.read(_READ_CHUNK):
        kept = (kept + chunk)[-limit:]
    return kept


def _summary(stderr: bytes) -> dict[str, Any] | None:
    """The helper's last stderr line, when it is its JSON summary."""
    lines = stderr.strip().splitlines()
    if not lines:
        return None
    try:
        summary = json.loads(lines[-1])
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None
