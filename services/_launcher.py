"""The in-sandbox launcher: one per slot, it starts each command inside the slot's sandbox.

It runs as the sandbox's main process (``python3 -I -S launcher.py FD RLIMITS_JSON``; the
rlimits apply to the launcher and so to every command it starts) and speaks a small
protocol over a SOCK_SEQPACKET socket (one JSON object per packet):

    worker -> launcher  {"op": "run", "id": N, "argv": [...], "env": {...}}
                        with file descriptors attached: the command's stdout and stderr, and
                        optionally its stdin (else /dev/null)
                        {"op": "run", "id": N, "via_fd": true}   the same, for a message too
                                                    big for one packet: the whole message is
                                                    in one more fd, attached last (a memfd)
                        {"op": "kill", "id": N}     kill the call's process group and every
                                                    process that still carries its marks
    launcher -> worker  {"event": "ready"}
                        {"event": "started", "id": N, "pid": P}
                        {"event": "exited", "id": N, "code": C}   (C < 0: killed by signal -C)
                        {"event": "failed", "id": N, "error": "..."}   the call did not start
                        {"event": "rejected", "error": "..."}   a message without a usable id

Whatever a packet holds, the launcher answers it and goes on: its death would end every
process of the slot.

Forking this small process and exec'ing the command costs about what a plain spawn costs,
while the namespaces (set up once by bubblewrap) are reused. Only the standard library is used:
the sandbox sees the system's Python, not the service's packages.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import socket
import sys

CALL_TAG = "TOOLBUS_CALL"
# A run message larger than this goes in a memfd: a packet must fit the socket's send buffer.
INLINE_MESSAGE_BYTES = 32 * 1024
_RECEIVE_BYTES = INLINE_MESSAGE_BYTES + 1024
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_MAX_FDS = 4  # stdout, stderr, stdin, the message's memfd
_MAX_CALL_ID = 1 << 40

# Which processes belong to a call. The process group misses ``setsid``, the environment tag
# misses ``env -i``; a soft limit keeps through both, through fork, exec and daemonizing, and
# costs nothing to set: the launcher sets RLIMIT_RTTIME's soft limit to a per-call value around
# posix_spawn, so the command inherits it, and a kill reads it back with prlimit(2). RTTIME only
# limits real-time scheduled tasks, and the values (over 12 days of CPU time) are never reached
# anyway. (A child subreaper would not do: it learns of an orphan only once its parent is gone,
# when nothing says any more which call it came from.) A process can still drop all three marks
# on purpose; the slot's release ends the whole sandbox.
_MARK_BASE = 1 << 40


class _Rejected(Exception):
    """A message the launcher cannot act on; the text says why."""


def _send(sock: socket.socket, message: dict[str, object]) -> None:
    sock.send(json.dumps(message).encode())


def _mark(call_id: int) -> int:
    return _MARK_BASE + call_id


def _read_message_fd(fd: int) -> object:
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
    return json.loads(b"".join(chunks))


def _call_id(message: dict[str, object]) -> int:
    call_id = message.get("id")
    if not isinstance(call_id, int) or isinstance(call_id, bool):
        raise _Rejected("the id must be an integer")
    if not 0 <= call_id < _MAX_CALL_ID:
        raise _Rejected(f"the id must be from 0 to {_MAX_CALL_ID - 1}")
    return call_id


def _command(message: dict[str, object], fds: list[int]) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a run message, checked."""
    argv, env = message.get("argv"), message.get("env")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise _Rejected("argv must be a non-empty list of strings")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise _Rejected("env must be an object of strings")
    if any("\0" in arg for arg in argv) or any("\0" in f"{k}{v}" for k, v in env.items()):
        raise _Rejected("the command line or environment contains a NUL byte")
    if len(fds) not in (2, 3):
        raise _Rejected(f"a run needs 2 or 3 file descriptors, not {len(fds)}")
    return argv, env


class _Launcher:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._running: dict[int, int] = {}  # pid -> call id
        self._pids: dict[int, int] = {}  # call id -> pid
        self._rttime = resource.getrlimit(resource.RLIMIT_RTTIME)
        # Marks need room under the hard limit (unlimited everywhere we know of).
        self._marking = self._rttime[1] == resource.RLIM_INFINITY

    def reap(self) -> None:
        for pid in list(self._running):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                call_id = self._running.pop(pid)
                self._pids.pop(call_id, None)
                code = os.waitstatus_to_exitcode(status)
                _send(self._sock, {"event": "exited", "id": call_id, "code": code})

    def receive(self) -> bool:
        """Handle one packet; False when the worker has closed the socket."""
        data, fds, flags, _ = socket.recv_fds(self._sock, _RECEIVE_BYTES, _MAX_FDS)
        if not data and not fds:  # the worker closed the socket: end everything
            for pid, running_id in self._running.items():
                self._kill_call(running_id, pid)
            return False
        call_id: int | None = None
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise _Rejected("the packet was cut (too large, or too many fds)")
            message = json.loads(data)
            if not isinstance(message, dict):
                raise _Rejected("a message must be a JSON object")
            call_id = _call_id(message)
            self._handle(call_id, message, list(fds))
        except Exception as exc:  # whatever it was, it must not end the launcher
            error = str(exc) or type(exc).__name__
            if call_id is None:
                _send(self._sock, {"event": "rejected", "error": error})
            else:
                _send(self._sock, {"event": "failed", "id": call_id, "error": error})
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return True

    def _handle(self, call_id: int, message: dict[str, object], fds: list[int]) -> None:
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
            if not isinstance(loaded, dict) or loaded.get("id") != call_id:
                raise _Rejected("the message in the fd is not this call's run message")
            message = loaded
        argv, env = _command(message, fds)
        pid = self._spawn(call_id, argv, env, fds)
        self._running[pid] = call_id
        self._pids[call_id] = pid
        _send(self._sock, {"event": "started", "id": call_id, "pid": pid})

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
                setsigdef=(signal.SIGCHLD, signal.SIGPIPE),
            )
        finally:
            if self._marking:
                resource.setrlimit(resource.RLIMIT_RTTIME, self._rttime)

    def _kill_call(self, call_id: int, pid: int | None) -> None:
        if pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        # A fork bomb keeps forking while it is being killed: sweep until no new one is found.
        killed: set[int] = set()
        for _ in range(50):
            found = [p for p in self._marked_pids(call_id) if p not in killed]
            if not found:
                return
            for victim in found:
                with contextlib.suppress(OSError):
                    os.kill(victim, signal.SIGKILL)
            killed.update(found)

    def _marked_pids(self, call_id: int) -> list[int]:
        """Processes in this sandbox with the call's rlimit mark or environment tag."""
        mark, tag = _mark(call_id), f"{CALL_TAG}={call_id}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            try:
                if self._marking and resource.prlimit(pid, resource.RLIMIT_RTTIME)[0] == mark:
                    found.append(pid)
                    continue
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if tag in handle.read().split(b"\0"):
                        found.append(pid)
            except OSError:
                continue
        return found


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(sock.fileno(), False)  # commands must not get the control socket
    for name, limit in json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}").items():
        resource.setrlimit(getattr(resource, name), tuple(limit))
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # epoll, not select(): the control socket's fd number is the worker's, and select() fails
    # on numbers over 1023 (a worker with ~500 sandboxes has them).
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    launcher = _Launcher(sock)
    _send(sock, {"event": "ready"})
    while True:
        ready = {key.fd for key, _ in selector.select()}
        if wake_read in ready:
            os.read(wake_read, 4096)
        launcher.reap()
        if sock.fileno() in ready and not launcher.receive():
            return


if __name__ == "__main__":
    main()
