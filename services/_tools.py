"""The built-in tools as a sandbox worker runs them, one call in one slot's workspace."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.messages import ErrorKindOfResult, ToolResult
from schemas.tools import (
    ReadFileArgs,
    StatefulTerminalArgs,
    TerminalArgs,
    TmuxArgs,
    WriteFileArgs,
)

from . import _files as files
from ._diskguard import DiskGuard
from ._process import MAX_COMMAND_BYTES, CommandOutcome, run_command
from ._sandbox import InvalidCommand, Sandbox, SandboxError
from ._stateful import StatefulShell
from ._tmux import TmuxError, TmuxState, run_tmux
from ._validation import describe_validation_error

_FILE_TOOLS = frozenset({"read_file", "write_file"})
_SIGNAL_HINTS = {"SIGXCPU": ": CPU time limit", "SIGXFSZ": ": file size limit"}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time and other unnamed signals
        return f"signal {number}"


class ToolFailure(Exception):
    """The tool refused or failed; becomes ``success: false`` for the model to read."""

    def __init__(self, message: str, kind: ErrorKindOfResult = ErrorKindOfResult.TOOL) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class SlotTools:
    """What the tools of one slot share: its sandbox, its persistent shell, its tmux state,
    and (made on first use) a network-less sandbox on the same workspace for calls that ask
    for ``allow_network: false`` where the service allows the network."""

    sandbox: Sandbox
    shell: StatefulShell
    make_offline: Callable[[], Sandbox | None]
    tmux: TmuxState = field(default_factory=TmuxState)
    offline: Sandbox | None = None

    @classmethod
    def for_sandbox(cls, sandbox: Sandbox, make_offline: Callable[[], Sandbox | None]) -> SlotTools:
        return cls(sandbox, StatefulShell(sandbox), make_offline)

    def sandbox_for(self, tool: str, allow_network: bool) -> Sandbox:
        # The file tools never touch the network: any call may use them as it is.
        if allow_network or self.sandbox.network_isolated or tool in _FILE_TOOLS:
            return self.sandbox
        if tool != "terminal":
            raise ToolFailure(
                f"allow_network=false is supported for terminal only, not {tool}: its session "
                "lives in the slot's networked sandbox",
                ErrorKindOfResult.SANDBOX,
            )
        if self.offline is None:
            self.offline = self.make_offline()
        if self.offline is None:
            raise ToolFailure(
                "allow_network=false needs a sandbox, and this worker runs commands unsandboxed",
                ErrorKindOfResult.SANDBOX,
            )
        return self.offline

    async def close(self) -> None:
        """End the shell and every process the slot left (tmux included); SandboxError when
        something of a sandbox may still run."""
        await self.shell.close()
        self.tmux = TmuxState()
        try:
            await self.sandbox.close()
        finally:
            if self.offline is not None:
                await self.offline.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolLimits:
    max_output_chars: int
    max_file_chars: int


class ToolRunner:
    """Runs a validated call of a built-in tool; knows nothing of NATS or slots."""

    def __init__(self, *, limits: ToolLimits, disk_guard: DiskGuard | None = None) -> None:
        self._limits = limits
        self._disk_guard = disk_guard

    async def run(
        self,
        tool: str,
        arguments: dict[str, Any],
        slot: SlotTools,
        *,
        timeout_s: float,
        allow_network: bool = True,
    ) -> ToolResult:
        """Run the call in a slot; the result's metadata says how it was sandboxed."""
        try:
            sandbox = slot.sandbox_for(tool, allow_network)
        except ToolFailure as failure:
            sandbox, result = slot.sandbox, self._failure(failure)
        else:
            result = await self._run(tool, arguments, slot, sandbox, timeout_s)
        result.metadata.update(
            sandboxed=sandbox.sandboxed, network_isolated=sandbox.network_isolated
        )
        return result

    async def _run(
        self,
        tool: str,
        arguments: dict[str, Any],
        slot: SlotTools,
        sandbox: Sandbox,
        timeout_s: float,
    ) -> ToolResult:
        workspace = sandbox.workspace
        try:
            if tool == "terminal":
                terminal = TerminalArgs.model_validate(arguments)
                return await self._terminal(terminal, sandbox, timeout_s)
            if tool == "terminal_stateful":
                args = StatefulTerminalArgs.model_validate(arguments)
                return await self._terminal_stateful(args, slot.shell, timeout_s)
            if tool == "tmux":
                tmux = TmuxArgs.model_validate(arguments)
                output, metadata = await run_tmux(
                    tmux, sandbox, slot.tmux, max_chars=self._limits.max_output_chars
                )
                return ToolResult(success=True, output=output, metadata=metadata)
            if tool == "read_file":
                read = ReadFileArgs.model_validate(arguments)
                return self._read_file(read, workspace)
            if tool == "write_file":
                write = WriteFileArgs.model_validate(arguments)
                return self._write_file(write, workspace, sandbox.owner)
            raise ToolFailure(f"Unknown tool: {tool}")
        except ValidationError as exc:
            failure = ToolFailure(
                f"Invalid arguments for {tool}: {describe_validation_error(exc)}",
                ErrorKindOfResult.INVALID_ARGUMENTS,
            )
            return self._failure(failure)
        except ToolFailure as failure:
            return self._failure(failure)
        except TmuxError as exc:
            return self._failure(ToolFailure(f"tmux: {exc}"))
        except InvalidCommand as exc:
            refused = ToolFailure(
                f"Invalid arguments for {tool}: {exc}", ErrorKindOfResult.INVALID_ARGUMENTS
            )
            return self._failure(refused)
        except SandboxError as exc:
            return self._failure(ToolFailure(f"Sandbox failure: {exc}", ErrorKindOfResult.SANDBOX))
        except OSError as exc:
            # A file tool hit the filesystem (missing file, a directory, permissions): the
            # model should see the reason, not the service's paths.
            return self._failure(
                ToolFailure(f"{tool} failed: {exc.strerror or type(exc).__name__}")
            )

    def _failure(self, failure: ToolFailure) -> ToolResult:
        return ToolResult(
            success=False, error=str(failure), metadata={"error_kind": str(failure.kind)}
        )

    async def _terminal(self, args: TerminalArgs, sandbox: Sandbox, timeout_s: float) -> ToolResult:
        if args.background:
            raise ToolFailure(
                "background=true is not supported; run the command in the foreground "
                "(append '&' inside the command to detach a process)",
                ErrorKindOfResult.INVALID_ARGUMENTS,
            )
        size = len(args.command.encode("utf-8", "surrogatepass"))
        if size > MAX_COMMAND_BYTES:
            raise ToolFailure(
                f"Invalid arguments for terminal: command is {size} bytes of UTF-8; a terminal "
                f"command can be at most {MAX_COMMAND_BYTES} bytes (the kernel's limit on one "
                "argument of a program). Write a longer script to a file and run that, or use "
                "terminal_stateful, which has no such limit",
                ErrorKindOfResult.INVALID_ARGUMENTS,
            )
        outcome = await run_command(
            sandbox,
            args.command,
            timeout_s=timeout_s,
            max_output_chars=self._limits.max_output_chars,
            disk_guard=self._disk_guard,
        )
        return self._terminal_result(outcome, timeout_s)

    async def _terminal_stateful(
        self, args: StatefulTerminalArgs, shell: StatefulShell, timeout_s: float
    ) -> ToolResult:
        stateful = await shell.run(
            args.command,
            timeout_s=timeout_s,
            max_output_chars=self._limits.max_output_chars,
            disk_guard=self._disk_guard,
        )
        result = self._terminal_result(stateful.outcome, timeout_s)
        result.metadata.update(new_shell=stateful.new_shell, shell_restarted=stateful.shell_ended)
        if stateful.shell_ended:
            if stateful.outcome.disk_full:
                reason = "was stopped with its shell"
            elif stateful.outcome.timed_out:
                reason = "timed out"
            else:
                reason = "ended the shell"
            note = (
                f"The command {reason}; the next call starts a new shell "
                "(cwd, variables and functions are reset)."
            )
            result.error = f"{result.error}. {note}" if result.error else note
        return result

    def _terminal_result(self, outcome: CommandOutcome, timeout_s: float) -> ToolResult:
        output = outcome.stdout.text
        if outcome.stderr.text:
            separator = "" if not output or output.endswith("\n") else "\n"
            output = f"{output}{separator}[stderr]\n{outcome.stderr.text}"
        truncated = outcome.stdout.truncated or outcome.stderr.truncated
        metadata: dict[str, Any] = {
            "exit_code": outcome.exit_code,
            "timeout": outcome.timed_out,
            "duration_s": round(outcome.duration_s, 6),
            "stdout_bytes": outcome.stdout.total_bytes,
            "stderr_bytes": outcome.stderr.total_bytes,
            "truncated": truncated,
        }
        if outcome.disk_full:
            status, kind = "disk_full", ErrorKindOfResult.DISK_LIMIT
            error = "Stopped: the disk under the workspaces is nearly full"
        elif outcome.timed_out:
            status, kind = "timeout", ErrorKindOfResult.TIMEOUT
            error = f"Command timed out after {timeout_s:g}s"
        elif outcome.exit_code != 0:
            status, kind = "exit", ErrorKindOfResult.EXIT
            error = f"Exit code: {outcome.exit_code}"
            if outcome.exit_code is not None and outcome.exit_code < 0:
                name = _signal_name(-outcome.exit_code)
                metadata["signal"] = name
                error += f" (killed by {name}{_SIGNAL_HINTS.get(name, '')})"
        else:
            metadata["status"] = "ok"
            return ToolResult(success=True, output=output, metadata=metadata)
        metadata.update(status=status, error_kind=str(kind))
        return ToolResult(success=False, output=output, error=error, metadata=metadata)

    def _read_file(self, args: ReadFileArgs, workspace: Path) -> ToolResult:
        limit = self._limits.max_file_chars
        try:
            size, head = files.read_head(workspace, args.path, limit * 4 + 1)
        except files.PathRefused as refused:
            raise ToolFailure(str(refused)) from None
        text = head.decode("utf-8", errors="replace")
        truncated = len(text) > limit or size > len(head)
        return ToolResult(
            success=True,
            output=text[:limit],
            metadata={"file_size": size, "truncated": truncated},
        )

    def _write_file(
        self, args: WriteFileArgs, workspace: Path, owner: tuple[int, int] | None
    ) -> ToolResult:
        if len(args.content) > self._limits.max_file_chars:
            raise ToolFailure(
                f"content has {len(args.content)} characters; the limit is "
                f"{self._limits.max_file_chars}",
                ErrorKindOfResult.INVALID_ARGUMENTS,
            )
        data = args.content.encode("utf-8")
        try:
            files.write(workspace, args.path, data, owner)
        except files.PathRefused as refused:
            raise ToolFailure(str(refused)) from None
        return ToolResult(
            success=True,
            output=f"Wrote {len(data)} bytes to {args.path}",
            metadata={"bytes_written": len(data)},
        )
