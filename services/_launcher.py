"""The in-sandbox launcher: one per slot, it starts each command inside the slot's sandbox.

It runs as the sandbox's main process (``python3 -I -S launcher.py FD RLIMITS_JSON``; the
rlimits apply to the launcher and so to every command it starts) and speaks a small
protocol over a SOCK_SEQPACKET socket (one JSON object per packet):

    worker -> launcher  {"op": "run", "id": N, "argv": [...], "env": {...}}
                        with file descriptors attached: the command's stdout and stderr, and
                        optionally its stdin (else /dev/null)
                        {"op": "kill", "id": N}     kill the call's process group and every
                                                    process that still carries its tag
    launcher -> worker  {"event": "ready"}
                        {"event": "started", "id": N, "pid": P}
                        {"event": "exited", "id": N, "code": C}   (C < 0: killed by signal -C)
                        {"event": "failed", "id": N, "error": "..."}

Forking this small process and exec'ing the command costs about what a plain spawn costs,
while the namespaces (set up once by bubblewrap) are reused. Only the standard library is used:
the sandbox sees the system's Python, not the service's packages.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import sys

CALL_TAG = "TOOLBUS_CALL"
_MAX_PACKET = 1 << 20


def _send(sock: socket.socket, message: dict[str, object]) -> None:
    sock.send(json.dumps(message).encode())


def _spawn(message: dict[str, object], fds: list[int]) -> int:
    """Start the command in its own session with the given stdout, stderr (and stdin).

    posix_spawn (a vfork underneath) rather than fork: no copy of this process's memory map,
    so a command starts as cheaply as from a shell. Rlimits were set on the launcher itself at
    start and are inherited.
    """
    argv = [str(arg) for arg in message["argv"]]  # type: ignore[attr-defined]
    env = {str(k): str(v) for k, v in message["env"].items()}  # type: ignore[attr-defined]
    if len(fds) > 2:
        stdin: tuple[object, ...] = (os.POSIX_SPAWN_DUP2, fds[2], 0)
    else:
        stdin = (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)
    actions = [stdin, (os.POSIX_SPAWN_DUP2, fds[0], 1), (os.POSIX_SPAWN_DUP2, fds[1], 2)]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in fds if fd > 2]
    return os.posix_spawn(
        argv[0],
        argv,
        env,
        file_actions=actions,
        setsid=True,  # its own session, so a kill of its group reaches its children
        setsigdef=(signal.SIGCHLD, signal.SIGPIPE),
    )


def _tagged_pids(call_id: int) -> list[int]:
    """Processes in this sandbox that still carry the call's tag (setsid does not drop it)."""
    tag = f"{CALL_TAG}={call_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if tag in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _kill_call(call_id: int, pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    # A fork bomb keeps forking while it is being killed: sweep until none is left.
    for _ in range(50):
        tagged = [p for p in _tagged_pids(call_id) if p != os.getpid()]
        if not tagged:
            return
        for victim in tagged:
            with contextlib.suppress(OSError):
                os.kill(victim, signal.SIGKILL)


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
    running: dict[int, int] = {}  # pid -> call id
    pids: dict[int, int] = {}  # call id -> pid
    _send(sock, {"event": "ready"})
    while True:
        readable, _, _ = select.select([sock.fileno(), wake_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 4096)
        for pid in list(running):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                call_id = running.pop(pid)
                pids.pop(call_id, None)
                _send(
                    sock,
                    {"event": "exited", "id": call_id, "code": os.waitstatus_to_exitcode(status)},
                )
        if sock.fileno() not in readable:
            continue
        data, fds, _, _ = socket.recv_fds(sock, _MAX_PACKET, 4)
        if not data:  # the worker closed the socket: end everything
            for pid in running:
                _kill_call(running[pid], pid)
            return
        message = json.loads(data)
        call_id = int(message["id"])
        if message["op"] == "run":
            try:
                pid = _spawn(message, fds)
            except OSError as exc:
                _send(sock, {"event": "failed", "id": call_id, "error": str(exc)})
            else:
                running[pid] = call_id
                pids[call_id] = pid
                _send(sock, {"event": "started", "id": call_id, "pid": pid})
            finally:
                for fd in fds:
                    os.close(fd)
        elif message["op"] == "kill":
            _kill_call(call_id, pids.get(call_id))


if __name__ == "__main__":
    main()
