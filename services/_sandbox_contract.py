"""What every kind of sandbox is, for the code that runs commands in one.

The :class:`Sandbox` and :class:`RunningCommand` protocols, the :class:`SandboxError` family,
the per-command :class:`SandboxLimits`, and what both kinds share: the refusal of a command line
no exec could take (:func:`check_argv`) and the environment a command starts with. The kinds
themselves are in ``_plain_sandbox.py`` and ``_bwrap_sandbox.py``; ``_sandbox.py`` chooses one.
"""

from __future__ import annotations

import asyncio
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .settings import (
    DEFAULT_MAX_CPU_S,
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_MEMORY_MB,
    DEFAULT_MAX_PROCESSES,
    DEFAULT_MAX_TMP_MB,
)

SANDBOX_WORKSPACE = "/workspace"
# Linux's MAX_ARG_STRLEN (32 pages of 4 KiB), less the terminating NUL: the most bytes one
# argument of an exec can have.
MAX_ARG_BYTES = 32 * 4096 - 1
_BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": "dumb",
}


class SandboxError(Exception):
    """The sandbox could not run a command (it failed to start, or died)."""


class _SandboxGone(SandboxError):
    """The sandbox ended between two commands."""


class InvalidCommand(SandboxError):
    """The command line cannot be run as given (a NUL byte, an argument too long); refused
    before it reaches the sandbox, which stays as it was."""


def check_argv(argv: list[str]) -> None:
    """Refuse a command line that no exec could take, with the reason."""
    if not argv:
        raise InvalidCommand("the command line is empty")
    for index, arg in enumerate(argv):
        if "\0" in arg:
            raise InvalidCommand(f"argument {index} of the command line contains a NUL byte")
        try:
            size = len(arg.encode("utf-8", "surrogateescape"))  # as exec will get it
        except UnicodeEncodeError:
            raise InvalidCommand(
                f"argument {index} of the command line is not valid text (a lone surrogate)"
            ) from None
        if size > MAX_ARG_BYTES:
            raise InvalidCommand(
                f"argument {index} of the command line is {size} bytes; one argument can be "
                f"at most {MAX_ARG_BYTES} bytes"
            )


class RunningCommand(Protocol):
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader
    stdin: asyncio.WriteTransport | None  # only when asked for

    async def wait(self) -> int:
        """The exit code; negative when killed by a signal."""
        ...

    def kill(self) -> None:
        """Kill the command and every process it started."""
        ...

    def close(self) -> None:
        """Release the pipes."""
        ...


class Sandbox(Protocol):
    workspace: Path  # the host directory
    inner_workspace: str  # the workspace as commands see it
    python: str  # a Python interpreter commands can run (stdlib only)
    owner: tuple[int, int] | None  # (uid, gid) its files must belong to; None: the worker's
    sandboxed: bool
    network_isolated: bool

    async def run(self, command: str) -> RunningCommand:
        """``bash -c command`` in the workspace."""
        ...

    async def spawn(
        self, argv: list[str], *, stdin: bool = False, stdin_fd: int | None = None
    ) -> RunningCommand:
        """Any program in the workspace; its stdin is a pipe (``stdin``), a copy of an open
        file descriptor of the caller's (``stdin_fd``), or /dev/null."""
        ...

    async def reset(self) -> None:
        """End every process the slot left running."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxLimits:
    """Per-command limits (setrlimit in the command's process) and the slot's process cap."""

    max_processes: int = DEFAULT_MAX_PROCESSES
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB
    max_cpu_s: int = DEFAULT_MAX_CPU_S
    max_file_mb: int = DEFAULT_MAX_FILE_MB
    max_tmp_mb: int = DEFAULT_MAX_TMP_MB

    def rlimits(self) -> dict[str, tuple[int, int]]:
        mib = 1024 * 1024
        return {
            "RLIMIT_NPROC": (self.max_processes, self.max_processes),
            "RLIMIT_AS": (self.max_memory_mb * mib, self.max_memory_mb * mib),
            "RLIMIT_CPU": (self.max_cpu_s, self.max_cpu_s + 1),  # SIGXCPU first, then KILL
            "RLIMIT_FSIZE": (self.max_file_mb * mib, self.max_file_mb * mib),
            "RLIMIT_CORE": (0, 0),
        }


def apply_rlimits(rlimits: dict[str, tuple[int, int]]) -> None:
    for name, pair in rlimits.items():
        resource.setrlimit(getattr(resource, name), pair)
