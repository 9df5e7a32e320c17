"""The launcher: one per slot, it starts each command inside the slot's sandbox.

A worker's launcher zygote (``_zygote_main.py``) forks it and it joins the sandbox's
namespaces (``setns``): it runs in the sandbox's mount, user, ipc, uts, cgroup and network
namespaces as the sandbox's user, with no capability left, but it stays in the host's pid
namespace while the commands it starts are in the sandbox's. So nothing in the sandbox can see,
signal or trace it, and a slot's sandbox costs no interpreter start of its own. (``python3 -I
-S -B launcher.py FD RLIMITS`` runs the same loop as a plain process, without a sandbox: the
protocol's tests do.) RLIMITS is ``NAME=SOFT:HARD,...`` and applies to the launcher and so to
every command it starts. It speaks a small protocol over a SOCK_SEQPACKET socket, one message
per packet. The worker is the trusted side: what it sends is marshal-encoded; what the
launcher sends is JSON, written here by hand, because the worker must never unmarshal data
from inside a sandbox.

    worker -> launcher  {"op": "run", "id": N, "argv": [...], "env": {...}}
                        with file descriptors attached: the command's stdout and stderr, and
                        optionally its stdin (else /dev/null)
                        {"op": "run", "id": N, "via_fd": True}   the same, for a message too
                                                    big for one packet: the whole message is
                                                    in one more fd, attached last (a memfd)
                        {"op": "kill", "id": N}     kill the call's process group and every
                                                    process that still carries its marks
    launcher -> worker  {"event": "ready"}
                        {"event": "started", "id": N, "pid": P}   (P: the host's pid)
                        {"event": "exited", "id": N, "code": C}   (C < 0: killed by signal -C)
                        {"event": "failed", "id": N, "error": "..."}   the call did not start
                        {"event": "rejected", "error": "..."}   a message without a usable id

Whatever a packet holds, the launcher answers it and goes on. It reaps its own children (the
commands); the sandbox's pid 1 (a shell, see ``_bwrap.py``) reaps the orphans.

Only builtin and C modules are imported (no enum, re, json or selectors): every launcher is a
fork of the zygote, and what it imports is what each live slot's copy may come to dirty.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no stub; signal would import enum
import _socket
import marshal
import os
import resource
import select
import sys

TYPE_CHECKING = False  # not typing's: importing typing would cost more than the launcher
if TYPE_CHECKING:
    from collections.abc import Callable

CALL_TAG = "TOOLBUS_CALL"
# A run message larger than this goes in a memfd: a packet must fit the socket's send buffer.
INLINE_MESSAGE_BYTES = 32 * 1024
_RECEIVE_BYTES = INLINE_MESSAGE_BYTES + 1024
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_MAX_FDS = 4  # stdout, stderr, stdin, the message's memfd
_ANCILLARY_BYTES = _socket.CMSG_SPACE(_MAX_FDS * 4)
_MAX_CALL_ID = 1 << 40

# Which processes belong to a call. The process group misses ``setsid``, the environment tag
# misses ``env -i``; a soft limit keeps through both, through fork, exec and daemonizing, and
# costs nothing to set: the launcher sets RLIMIT_RTTIME's soft limit to a per-call value around
# posix_spawn, so the command inherits it, and a kill reads it back from /proc. RTTIME only
# limits real-time scheduled tasks, and the values (over 12 days of CPU time) are never reached
# anyway. (Reaping orphans as pid 1 would not do: an orphan is seen only once its parent is
# gone, when nothing says any more which call it came from.) A process can still drop all
# three marks on purpose; the slot's release ends the whole sandbox.
_MARK_BASE = 1 << 40


class _Rejected(Exception):
    """A message the launcher cannot act on; the text says why."""


def json_string(text: str) -> str:
    """``text`` as a JSON string literal, ASCII only (as ``json.dumps`` writes it)."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:  # outside the BMP: a surrogate pair
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    out.append('"')
    return "".join(out)


def _send(sock: _socket.socket, event: str) -> None:
    sock.send(event.encode())


def _failed(call_id: int | None, error: str) -> str:
    if call_id is None:
        return f'{{"event": "rejected", "error": {json_string(error)}}}'
    return f'{{"event": "failed", "id": {call_id}, "error": {json_string(error)}}}'


def _mark(call_id: int) -> int:
    return _MARK_BASE + call_id


def _quietly(call: Callable[..., object], *args: int) -> None:
    """``call(*args)``, an OSError ignored (contextlib would import collections, functools)."""
    try:
        call(*args)
    except OSError:
        return


def _read_message_fd(fd: int) -> dict[object, object]:
    size = os.fstat(fd).st_size
    if size > _MAX_MESSAGE_BYTES:
        raise _Rejected(f"the message is {size} bytes; at most {_MAX_MESSAGE_BYTES}")
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return _decode(b"".join(chunks))


def _decode(data: bytes) -> dict[object, object]:
    try:
        message = marshal.loads(data)
    except Exception:  # EOFError, ValueError, TypeError: not marshal data
        raise _Rejected("the message is not marshal data") from None
    if not isinstance(message, dict):
        raise _Rejected("a message must be a dict")
    return message


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += memoryview(data[: len(data) - len(data) % 4]).cast("i").tolist()
    return fds


def _call_id(message: dict[object, object]) -> int:
    call_id = message.get("id")
    if not isinstance(call_id, int) or isinstance(call_id, bool):
        raise _Rejected("the id must be an integer")
    if not 0 <= call_id < _MAX_CALL_ID:
        raise _Rejected(f"the id must be from 0 to {_MAX_CALL_ID - 1}")
    return call_id


def _command(message: dict[object, object], fds: list[int]) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a run message, checked."""
    argv, env = message.get("argv"), message.get("env")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise _Rejected("argv must be a non-empty list of strings")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise _Rejected("env must be a dict of strings")
    if any("\0" in arg for arg in argv) or any("\0" in f"{k}{v}" for k, v in env.items()):
        raise _Rejected("the command line or environment contains a NUL byte")
    if len(fds) not in (2, 3):
        raise _Rejected(f"a run needs 2 or 3 file descriptors, not {len(fds)}")
    return argv, env


class _Launcher:
    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._running: dict[int, int] = {}  # pid -> call id
        self._pids: dict[int, int] = {}  # call id -> pid
        self._rttime = resource.getrlimit(resource.RLIMIT_RTTIME)
        # Marks need room under the hard limit (unlimited everywhere we know of).
        self._marking = self._rttime[1] == resource.RLIM_INFINITY

    def reap(self) -> None:
        """Collect every child that exited (the commands)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            call_id = self._running.pop(pid, None)
            if call_id is not None:
                self._pids.pop(call_id, None)
                code = os.waitstatus_to_exitcode(status)
                _send(self._sock, f'{{"event": "exited", "id": {call_id}, "code": {code}}}')

    def receive(self) -> bool:
        """Handle one packet; False when the worker has closed the socket."""
        data, ancillary, flags, _ = self._sock.recvmsg(_RECEIVE_BYTES, _ANCILLARY_BYTES)
        fds = _received_fds(ancillary)
        if not data and not fds:  # the worker closed the socket: end everything
            for pid, running_id in self._running.items():
                self._kill_call(running_id, pid)
            return False
        call_id: int | None = None
        try:
            if flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
                raise _Rejected("the packet was cut (too large, or too many fds)")
            message = _decode(data)
            call_id = _call_id(message)
            self._handle(call_id, message, list(fds))
        except Exception as exc:  # whatever it was, it must not end the launcher
            _send(self._sock, _failed(call_id, str(exc) or type(exc).__name__))
        finally:
            for fd in fds:
                _quietly(os.close, fd)
        return True

    def _handle(self, call_id: int, message: dict[object, object], fds: list[int]) -> None:
        op = message.get("op")
        if op == "kill":
            self._kill_call(call_id, self._pids.get(call_id))
            return
        if op != "run":
            raise _Rejected(f"unknown op {op!r}")
        if message.get("via_fd") is True:
            if not fds:
                raise _Rejected("via_fd is set but no fd came with the message")
            loaded = _read_message_fd(fds.pop())
            if loaded.get("id") != call_id:
                raise _Rejected("the message in the fd is not this call's run message")
            message = loaded
        argv, env = _command(message, fds)
        pid = self._spawn(call_id, argv, env, fds)
        self._running[pid] = call_id
        self._pids[call_id] = pid
        _send(self._sock, f'{{"event": "started", "id": {call_id}, "pid": {pid}}}')

    def _spawn(self, call_id: int, argv: list[str], env: dict[str, str], fds: list[int]) -> int:
        """Start the command in its own session with the given stdout, stderr (and stdin).

        posix_spawn (a vfork underneath) rather than fork: no copy of this process's memory
        map, so a command starts as cheaply as from a shell. Rlimits were set on the launcher
        itself at start and are inherited; so is the call's mark, set just around the spawn.
        """
        if len(fds) > 2:
            stdin: tuple[object, ...] = (os.POSIX_SPAWN_DUP2, fds[2], 0)
        else:
            stdin = (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)
        actions = [stdin, (os.POSIX_SPAWN_DUP2, fds[0], 1), (os.POSIX_SPAWN_DUP2, fds[1], 2)]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in fds if fd > 2]
        if self._marking:
            resource.setrlimit(resource.RLIMIT_RTTIME, (_mark(call_id), self._rttime[1]))
        try:
            return os.posix_spawn(
                argv[0],
                argv,
                env,
                file_actions=actions,
                setsid=True,  # its own session, so a kill of its group reaches its children
                setsigdef=(_signal.SIGCHLD, _signal.SIGPIPE),
            )
        finally:
            if self._marking:
                resource.setrlimit(resource.RLIMIT_RTTIME, self._rttime)

    def _kill_call(self, call_id: int, pid: int | None) -> None:
        if pid is not None:  # the host's pid of the launcher's own child: its group's id too
            _quietly(os.killpg, pid, _signal.SIGKILL)
        # A fork bomb keeps forking while it is being killed: sweep until no new one is found.
        killed: set[int] = set()
        for _ in range(50):
            found = [p for p in _marked_pids(call_id, self._marking) if p not in killed]
            if not found:
                return
            for victim in found:
                _kill_in_sandbox(victim)
            killed.update(found)


def _marked_pids(call_id: int, marking: bool) -> list[int]:
    """Processes with the call's rlimit mark or environment tag, as the sandbox's /proc numbers
    them (the launcher's own pid namespace is the host's: it cannot use those numbers)."""
    mark, tag = str(_mark(call_id)).encode(), f"{CALL_TAG}={call_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if marking and _rttime_soft(entry) == mark:
                found.append(int(entry))
                continue
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if tag in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _rttime_soft(pid: str) -> bytes:
    """The soft RLIMIT_RTTIME of a process, from ``/proc/PID/limits``."""
    with open(f"/proc/{pid}/limits", "rb") as handle:
        for line in handle:
            if line.startswith(b"Max realtime timeout"):
                return line.split()[3]
    return b""


def _kill_in_sandbox(pid: int) -> None:
    """SIGKILL to a process by the sandbox's number for it: through a pidfd made of its /proc
    directory, which names that process (not whichever takes the number next)."""
    try:
        pidfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        _signal.pidfd_send_signal(pidfd, _signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def parse_rlimits(text: str) -> list[tuple[int, tuple[int, int]]]:
    """``RLIMIT_AS=1:2,RLIMIT_CPU=3:4`` as (resource, (soft, hard)) pairs."""
    limits = []
    for item in filter(None, text.split(",")):
        name, _, values = item.partition("=")
        soft, _, hard = values.partition(":")
        limits.append((getattr(resource, name), (int(soft), int(hard))))
    return limits


def format_rlimits(rlimits: dict[str, tuple[int, int]]) -> str:
    """The launcher's RLIMITS argument (the worker's side of :func:`parse_rlimits`)."""
    return ",".join(f"{name}={soft}:{hard}" for name, (soft, hard) in rlimits.items())


class ChildLoop:
    """An epoll loop on a control socket that also wakes when a child exits (SIGCHLD through
    a wakeup fd): the launcher's, and the launcher zygote's."""

    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        _signal.set_wakeup_fd(wake_write)
        _signal.signal(_signal.SIGCHLD, lambda *_: None)
        self._poller = select.epoll()  # not select(): fd numbers over 1023 must work too
        self._poller.register(sock.fileno(), select.EPOLLIN)
        self._poller.register(self._wake_read, select.EPOLLIN)
        self.fds = [self._wake_read, wake_write, self._poller.fileno()]  # a fork closes them

    def run(self, reap: Callable[[], None], receive: Callable[[], bool]) -> None:
        """``reap`` at every wake-up, ``receive`` when a packet is there; until it is False."""
        while True:
            ready = {fd for fd, _ in self._poller.poll()}
            if self._wake_read in ready:
                os.read(self._wake_read, 4096)
            reap()
            if self._sock.fileno() in ready and not receive():
                return


def serve(sock_fd: int, rlimits: str) -> None:
    """The launcher's loop on the control socket ``sock_fd``, until the worker closes it."""
    # Moved to the lowest free fd number: the worker's number can be over 1023, and commands
    # must not get the control socket (os.dup makes it non-inheritable).
    sock = _socket.socket(fileno=os.dup(sock_fd))
    os.close(sock_fd)
    for which, limit in parse_rlimits(rlimits):
        resource.setrlimit(which, limit)
    loop = ChildLoop(sock)
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    launcher = _Launcher(sock)
    _send(sock, '{"event": "ready"}')
    loop.run(launcher.reap, launcher.receive)


def main() -> None:
    serve(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")


if __name__ == "__main__":
    main()
