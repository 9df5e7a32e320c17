"""A slot's commands in its persistent bubblewrap sandbox.

:class:`BwrapSandbox` starts one bubblewrap sandbox per slot (its command line is
``_bwrap.py``'s, its pid 1 a shell that holds the namespaces), has the worker's launcher zygote
(``_zygote.py``) fork a launcher (``_launcher.py``) into it, and asks the launcher to start
each command: a run message over a socket, with the command's pipes attached
(:func:`_send_run`). The namespaces are set up once per slot, so a sandboxed command costs
about a plain fork/exec; and no interpreter starts per sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import marshal
import os
import signal
import socket
from pathlib import Path

import structlog

from ._bwrap import (
    _SANDBOX_PYTHON_PREFIX,
    HOLD_COMMAND,
    SANDBOX_READY,
    BwrapOptions,
    ImageRoot,
    _sandbox_python,
    bwrap_argv,
    identity_files,
    image_bwrap_argv,
)
from ._command_pipes import _CallPipes
from ._fd_limits import inherited_limit
from ._launcher import CALL_TAG, INLINE_MESSAGE_BYTES, format_rlimits
from ._sandbox_contract import (
    _BASE_ENV,
    SANDBOX_WORKSPACE,
    RunningCommand,
    SandboxError,
    _SandboxGone,
    check_argv,
)
from ._sandbox_process import (
    STOP_TIMEOUT_S,
    SandboxProcess,
    Spawned,
    end_bubblewrap,
    read_pipe,
    read_spawned,
)
from ._zygote import LauncherZygote, send_with_fds

log = structlog.get_logger("toolbus.sandbox")

_READY_TIMEOUT_S = 10.0
_SAID_CHARS = 2000  # of what a sandbox writes to its stderr, for the log or a start error


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
        zygote: LauncherZygote,
        cgroup: Path | None = None,
        owner: tuple[int, int] | None = None,
        image: ImageRoot | None = None,
        image_env: tuple[str, ...] = (),
    ) -> None:
        self.workspace = workspace
        self.image = image  # the slot's root filesystem, when it is an image's
        self.inner_workspace = SANDBOX_WORKSPACE
        self.python = _sandbox_python().executable
        self.owner = owner  # (uid, gid) the sandbox runs as, when the worker is root
        self._options = options
        self._zygote = zygote
        self._cgroup = cgroup
        self._rlimits = {**options.limits.rlimits(), **inherited_limit()}
        self.network_isolated = not options.allow_network
        self._process: SandboxProcess | None = None
        # Reads the pid of the bubblewrap being started: a stop before its start knew it ends it.
        self._spawning: asyncio.Task[Spawned] | None = None
        self._unreaped: list[SandboxProcess] = []
        # A pidfd of the sandbox's pid 1, opened when bubblewrap says its pid: a stop kills it
        # and waits for its end, which the kernel lets come only after every other process of
        # the namespace has ended.
        self._pid1: int | None = None
        self._launch_id: int | None = None  # the zygote's name for this start's launcher
        self._left_running = False  # a stop found its namespace not ended in time
        self._said: list[str] = []  # what the sandbox wrote to its stderr before it was ready
        self._socket: socket.socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._start_lock = asyncio.Lock()
        self._resets = 0  # how many resets began: a start that saw one begin gives up
        self._calls: dict[int, _SandboxCommand] = {}
        self._call_ids = itertools.count(1)
        self._env = _command_env(image, image_env)

    async def _ensure_started(self) -> socket.socket:
        async with self._start_lock:
            if self._socket is not None and self._alive():
                return self._socket
            await self._stop()  # dead, or never started: clean up whatever is left
            return await self._start()

    def _alive(self) -> bool:
        return (
            self._process is not None
            and self._process.poll() is None
            and self._reader is not None
            and not self._reader.done()
        )

    @property
    def running(self) -> bool:
        """Whether the sandbox is up and ready: a command now costs no start."""
        ready = self._ready
        return (
            self._alive()
            and ready is not None
            and ready.done()
            and not ready.cancelled()
            and ready.exception() is None
        )

    @property
    def launcher_pid(self) -> int | None:
        """bubblewrap's pid while the sandbox is up: a new one at each start."""
        return self._process.pid if self._process is not None and self.running else None

    async def start(self) -> None:
        """Start the sandbox now unless it is up (a warm slot's); SandboxError when it cannot,
        or when a reset began meanwhile."""
        await self._ensure_started()

    async def _start(self) -> socket.socket:
        resets = self._resets
        python = _sandbox_python()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        report = info = said = None
        # Given to bubblewrap as 3, 4, ... (_passed_as); sources as open fds: a sandbox user
        # may not be able to walk to them.
        fds: list[int] = []
        try:
            fds.append(os.open(self.workspace, os.O_PATH | os.O_DIRECTORY))
            if self.image is not None:  # the image's own /etc, /usr, everything
                argv = image_bwrap_argv(self._options, self.image, _passed_as(0), HOLD_COMMAND)
            else:
                argv = self._default_argv(fds)
            # bubblewrap says its child's pid (the namespace's pid 1) on a pipe of its own;
            # its stderr is another, where its errors come, or the sandbox's "ready".
            info, info_theirs = os.pipe2(os.O_CLOEXEC)
            fds.append(info_theirs)
            extra = ["--info-fd", str(_passed_as(len(fds) - 1))]
            if python.prefix is not None and self.image is None:
                fds.append(os.open(python.prefix, os.O_PATH | os.O_DIRECTORY))
                extra += ["--ro-bind-fd", str(_passed_as(len(fds) - 1)), _SANDBOX_PYTHON_PREFIX]
            argv[1:1] = extra
            report, report_theirs = os.pipe2(os.O_CLOEXEC)  # where the spawn says its pid
            fds.append(report_theirs)
            said, said_theirs = os.pipe2(os.O_CLOEXEC)
            fds.append(said_theirs)
            # Sent whole or not at all: no child is started half-way.
            await self._zygote.spawn(
                argv,
                report_pid=report_theirs,
                stderr=said_theirs,
                fds=fds[:-2],
                owner=self.owner,
                cgroup=self._cgroup,
            )
        except BaseException as exc:
            # Whatever failed, no fd of a sandbox that never was stays open.
            for fd in (report, info, said):
                if fd is not None:
                    os.close(fd)
            ours.close()
            theirs.close()
            if isinstance(exc, OSError):
                where = f" ({exc.filename})" if exc.filename else ""
                raise SandboxError(f"cannot start the sandbox: {exc.strerror}{where}") from None
            raise
        finally:
            for fd in fds:
                os.close(fd)  # the zygote, then its child, have their copies
        ours.setblocking(False)
        self._socket = ours
        self._said = []
        # What was started, read to its end whatever becomes of this start: a stop ends it.
        self._spawning = asyncio.create_task(read_spawned(report, info), name="sandbox-spawn")
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        # Its outcome is read here, unless this start was given up first: then by nobody.
        self._ready.add_done_callback(lambda ready: ready.cancelled() or ready.exception())
        self._reader = asyncio.create_task(self._read_events(ours), name="sandbox-events")
        try:
            async with asyncio.timeout(_READY_TIMEOUT_S):
                await self._launch(self._spawning, said, theirs, resets)
                await asyncio.shield(self._ready)
        except (TimeoutError, SandboxError) as exc:
            detail = " ".join(self._said)[:_SAID_CHARS] or str(exc)
            await self._stop()
            detail = detail or f"not ready within {_READY_TIMEOUT_S:g}s"
            raise SandboxError(f"the sandbox did not start: {detail}") from None
        except asyncio.CancelledError:  # half set up is of no use: nobody may launch into it
            await self._stop()
            raise
        finally:
            theirs.close()
        return ours

    def _default_argv(self, fds: list[int]) -> list[str]:
        """The worker's system read-only, ``fds`` taking the files given to bubblewrap."""
        etc_files: list[tuple[int, str]] = []
        if self.owner is not None:  # the slot's user has a name in there
            for path, data in identity_files(self.owner):
                fds.append(_memfd(data))
                etc_files.append((_passed_as(len(fds) - 1), path))
        return bwrap_argv(
            self._options, _passed_as(0), HOLD_COMMAND, etc_files=etc_files, owner=self.owner
        )

    async def _launch(
        self, spawning: asyncio.Task[Spawned], said: int, theirs: socket.socket, resets: int
    ) -> None:
        """Once bubblewrap has set the sandbox up: a launcher forked into it, on ``theirs``.
        ``said`` (bubblewrap's stderr) is closed here."""
        try:
            spawned = await asyncio.shield(spawning)
        except BaseException:
            os.close(said)
            raise
        if spawned.pidfd is not None:  # else the stop ends what there is (see end_bubblewrap)
            # Taken over from the spawn in one step: a stop from now on ends these.
            self._spawning = None
            self._process, self._pid1 = spawned.process, spawned.pidfd
        if self._resets != resets:  # a reset began: it wants no sandbox
            os.close(said)
            raise SandboxError("the sandbox was reset while it started")
        stderr = await read_pipe(said, until=SANDBOX_READY)
        if self._resets != resets:  # a reset began while bubblewrap started: it wants none
            raise SandboxError("the sandbox was reset while it started")
        pid = spawned.pid1
        if not stderr.endswith(SANDBOX_READY) or self._pid1 is None or pid is None:
            text = stderr.removesuffix(SANDBOX_READY).decode(errors="replace").strip()
            raise SandboxError(text or spawned.error or "bubblewrap exited at start")
        self._launch_id = await self._zygote.launch(
            theirs,
            pid1=pid,
            pidfd=self._pid1,
            owner=self.owner,
            cgroup=self._cgroup,
            rlimits=format_rlimits(self._rlimits),
            cwd=self.image.workdir if self.image is not None else SANDBOX_WORKSPACE,
        )

    async def _read_events(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(sock, 65536):
                self._on_packet(data)
        except OSError as exc:
            log.warning("sandbox event stream failed", error=str(exc))
        finally:
            # The sandbox is gone: nothing it ran will report any more.
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(SandboxError("the sandbox exited at start"))
            for call in self._calls.values():
                if not call.exited.done():
                    call.exited.set_result(-int(signal.SIGKILL))
            self._calls.clear()
            if self._process is not None:
                self._process.poll()  # reaped now if it has exited already

    def _on_packet(self, data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if isinstance(event, dict) and "event" in event:
            self._on_event(event)
            return
        # Not an event: something written to stderr (bubblewrap's error, a traceback).
        text = data.decode(errors="replace").strip()
        if self._ready is not None and not self._ready.done():
            if sum(map(len, self._said)) < _SAID_CHARS:
                self._said.append(text)
        else:
            log.warning("the sandbox wrote to its stderr", text=text[:_SAID_CHARS])

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
        shell = self.image.shell if self.image is not None else "/bin/bash"
        return await self.spawn([shell, "-c", command])

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
            env = {**self._env, CALL_TAG: str(call_id)}
            message = {"op": "run", "id": call_id, "argv": argv, "env": env}
            self._calls[call_id] = call
            try:
                await _send_run(sock, call_id, marshal.dumps(message), pipes.for_child)
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
            self._socket.send(marshal.dumps({"op": "kill", "id": call_id}))

    async def reset(self) -> None:
        """End the sandbox and everything in it; the next command starts a fresh one.

        Bounded in time whatever the sandbox is doing: its pid 1 is killed first, so a start in
        progress (which holds the lock while it waits for the launcher) ends at once; one that
        has not learnt that pid yet does within moments, and then sees the reset."""
        self._resets += 1
        if self._pid1 is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(self._pid1, signal.SIGKILL)
        async with self._start_lock:
            await self._stop()

    async def close(self) -> None:
        """:meth:`reset`; SandboxError when something of the sandbox may still run (its
        namespace did not end within its bound after SIGKILL: a process stuck in the kernel),
        so that a slot's clean-up sends it out of service instead of wiping and freeing it."""
        await self.reset()
        if self._left_running:
            self._left_running = False  # a later clean-up of the slot looks again
            raise SandboxError(
                f"its processes did not all end within {STOP_TIMEOUT_S:g}s of SIGKILL"
            )

    async def _stop(self) -> None:
        reader, sock, process, pid1 = self._reader, self._socket, self._process, self._pid1
        spawning, self._spawning = self._spawning, None
        self._reader = self._socket = self._process = self._pid1 = None
        if self._launch_id is not None:  # ends with its socket anyway; at once, whatever it does
            self._zygote.end(self._launch_id)
            self._launch_id = None
        # One that did not exit in time before (stuck in the kernel) is reaped once it has.
        self._unreaped[:] = [old for old in self._unreaped if old.poll() is None]
        # Shielded: a caller cancelled meanwhile (a call stopped by a release) must not leave
        # the socket open, nor close it before its reader has left the event loop; and what it
        # finds is noted even then.
        ending = asyncio.ensure_future(self._end(reader, sock, process, pid1, spawning))
        ending.add_done_callback(self._note_end)
        await asyncio.shield(ending)

    def _note_end(self, ending: asyncio.Future[bool]) -> None:
        if not ending.cancelled() and ending.exception() is None and not ending.result():
            self._left_running = True

    async def _end(
        self,
        reader: asyncio.Task[None] | None,
        sock: socket.socket | None,
        process: SandboxProcess | None,
        pidfd: int | None,
        spawning: asyncio.Task[Spawned] | None,
    ) -> bool:
        if reader is not None:
            # Before the socket closes: its fd must leave the event loop while it is still its.
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if sock is not None:
            sock.close()
        return await end_bubblewrap(process, pidfd, spawning, self._unreaped)


def _command_env(image: ImageRoot | None, image_env: tuple[str, ...]) -> dict[str, str]:
    """What a command's environment starts from: the image's ``Env`` over the defaults."""
    if image is None:
        return {**_BASE_ENV, "HOME": SANDBOX_WORKSPACE, "PWD": SANDBOX_WORKSPACE}
    env = {**_BASE_ENV, "HOME": "/root", "PWD": image.workdir}
    for item in image_env:
        name, equals, value = item.partition("=")
        if equals and name:
            env[name] = value
    return env


def _memfd(data: bytes) -> int:
    """An fd to read ``data`` from, from its start."""
    fd = os.memfd_create("toolbus-sandbox-file", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _send_run(sock: socket.socket, call_id: int, data: bytes, fds: list[int]) -> None:
    """Send a run message; one too big for a packet goes in a memfd, attached last."""
    if len(data) <= INLINE_MESSAGE_BYTES:
        try:
            await send_with_fds(sock, data, fds)
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
        header = marshal.dumps({"op": "run", "id": call_id, "via_fd": True})
        await send_with_fds(sock, header, [*fds, memfd])
    finally:
        os.close(memfd)


def _passed_as(index: int) -> int:
    """The fd number in bubblewrap of the ``index``-th fd the zygote passes on (after stderr)."""
    return 3 + index
