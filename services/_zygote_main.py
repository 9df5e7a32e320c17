"""The launcher zygote: a small process, one per worker, that starts each slot's bubblewrap and
forks each slot's launcher.

``python -I -S -B _zygote_main.py FD`` (the worker's interpreter, on the host; see
``_zygote.py``). A sandbox's start costs no interpreter start: bubblewrap makes the
namespaces, and the zygote forks a copy of itself that joins them and runs the launcher's
loop (``_launcher.serve``). The zygote is not a fork of the worker, so a launcher holds none of
the worker's memory (credentials, connections), only this small interpreter's.

It reads messages from the worker on a SOCK_SEQPACKET socket, marshal-encoded:

    {"op": "spawn", "argv": [...], "uid": U or None, "gid": G or None,
     "cgroup": PATH or None}
        with fds attached: a pipe for its pid, the program's stderr, then those it gets as 3,
        4, ...; the child is the worker's (``CLONE_PARENT``: the worker reaps it, and
        ``--die-with-parent`` ties bubblewrap to the worker, not to this process); before
        anything else it writes its pid to the first fd and closes it, so the worker learns
        it whatever fails next; a failure before the exec is said on its stderr
    {"op": "launch", "id": N, "pid": P, "uid": U or None, "gid": G or None,
     "cgroup": PATH or None, "rlimits": "...", "cwd": DIR}
        with two fds attached: a pidfd of the sandbox's pid 1 (P, the host's pid), and the
        launcher's end of its control socket
    {"op": "end", "id": N}      SIGKILL to that launcher if it still runs

and answers nothing: a launcher says "ready" (or why it could not start, as text) on its
control socket, which the worker reads anyway. It ends when the worker's socket closes;
launchers end when their own control socket closes.

A spawn costs no shell (to join the cgroup) or ``setpriv`` (to drop to the slot's user) in
front of bubblewrap: this process does both before its exec, and it is small, so its copy is
cheap, where the worker's (a big process) would not be.

A launcher, in this order: a session of its own; the slot's pids cgroup (while /sys is the
host's); no supplementary group, then the slot's uid and gid (as root: for a worker that is
not root, it is already the sandbox's owner); ``setns`` into every namespace of the sandbox's
pid 1 that is not already its own, which gives it every capability there; then it drops them
all (bounding set, then capset) and sets no_new_privs, as bubblewrap does for its command.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no stub; signal would import enum
import _socket
import ctypes
import gc
import marshal
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _launcher  # type: ignore[import-not-found]  # run as a script, by path

_NAMESPACES = {  # /proc/PID/ns name: its CLONE_NEW* flag
    "user": 0x10000000,
    "mnt": 0x00020000,
    "pid": 0x20000000,
    "ipc": 0x08000000,
    "uts": 0x04000000,
    "net": 0x40000000,
    "cgroup": 0x02000000,
}
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_RECEIVE_BYTES = 65536
_MAX_SPAWN_FDS = 16
# clone(2)'s and getpid(2)'s numbers; clone's other arguments, all zero here, may come in
# any order. getpid(2) itself: a glibc before 2.25 answers a raw clone's child from a cache.
_SYSCALLS = {"x86_64": (56, 39), "aarch64": (220, 172), "riscv64": (220, 172)}
_CLONE_PARENT = 0x00008000
_ANCILLARY_BYTES = _socket.CMSG_SPACE(_MAX_SPAWN_FDS * 4)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32)]
    _fields_ += [("inheritable", ctypes.c_uint32)]


class _Zygote:
    def __init__(self, sock: _socket.socket, own_fds: list[int]) -> None:
        self._sock = sock
        self._own_fds = own_fds  # the loop's, closed in each launcher
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._libc.syscall.argtypes = [ctypes.c_long] * 6
        self._syscalls = _SYSCALLS.get(os.uname().machine)
        self._launchers: dict[int, int] = {}  # launch id -> pid, until reaped
        self._launch_ids: dict[int, int] = {}  # pid -> launch id
        with open("/proc/sys/kernel/cap_last_cap") as last:
            self._last_cap = int(last.read())

    def reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            launch_id = self._launch_ids.pop(pid, None)
            if launch_id is not None:
                del self._launchers[launch_id]

    def receive(self) -> bool:
        """Handle one packet; False when the worker has closed the socket."""
        data, ancillary, _, _ = self._sock.recvmsg(_RECEIVE_BYTES, _ANCILLARY_BYTES)
        fds = _launcher._received_fds(ancillary)
        if not data and not fds:
            return False
        op = None
        try:
            message = marshal.loads(data)
            op = message.get("op")
            if op == "end":
                pid = self._launchers.get(message["id"])
                if pid is not None:  # not reaped yet: the pid is still that launcher's
                    os.kill(pid, _signal.SIGKILL)
            elif op == "spawn" and fds:
                self._spawn(message, fds)
            elif op == "launch" and len(fds) == 2:
                pid = self._fork(message, fds[0], fds[1])
                self._launchers[message["id"]] = pid
                self._launch_ids[pid] = message["id"]
        except Exception as exc:  # a bad message must not end the zygote
            # Said where the worker looks: a spawn's stderr, a launch's control socket.
            what = "bubblewrap" if op == "spawn" else "the launcher"
            if len(fds) >= 2 and (op == "spawn" or len(fds) == 2):
                _say(fds[1], f"the launcher zygote could not start {what}: {_why(exc)}")
        finally:
            for fd in fds:
                _launcher._quietly(os.close, fd)
        return True

    def _spawn(self, message: dict[str, object], fds: list[int]) -> None:
        """A child of the worker's that runs ``argv`` (see the module's docstring)."""
        if self._syscalls is None:
            raise OSError(f"no clone(2) number known for {os.uname().machine}")
        clone, getpid = self._syscalls
        argv = message["argv"]
        if not isinstance(argv, list) or not argv or len(fds) < 2:
            raise ValueError("a spawn needs argv, a pipe for its pid and a stderr")
        # A raw clone: no fork handlers run in the child, so it only moves fds and execs.
        pid = self._libc.syscall(clone, _CLONE_PARENT | _signal.SIGCHLD, 0, 0, 0, 0)
        if pid < 0:
            raise OSError(ctypes.get_errno(), f"clone: {os.strerror(ctypes.get_errno())}")
        if pid == 0:
            try:
                _exec_child(message, argv, fds, self._libc.syscall(getpid, 0, 0, 0, 0, 0))
            finally:
                os._exit(127)

    def _fork(self, message: dict[str, object], pid1: int, control: int) -> int:
        pid = os.fork()
        if pid:
            return pid
        try:  # the launcher, from here on; never back into the zygote's loop
            self._sock.close()
            _signal.set_wakeup_fd(-1)  # the launcher's loop sets its own
            for fd in self._own_fds:
                os.close(fd)
            self._enter(message, pid1)
            os.close(pid1)
            _launcher.serve(control, str(message["rlimits"]))
        except BaseException as exc:
            _say(control, f"the launcher could not enter its sandbox: {_why(exc)}")
            os._exit(1)
        os._exit(0)

    def _enter(self, message: dict[str, object], pid1: int) -> None:
        os.setsid()  # no terminal of the worker's session to reach
        cgroup = message.get("cgroup")
        if isinstance(cgroup, str):
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))
        # Only the namespaces it does not share already (the network, when the sandbox has it).
        flags = 0
        for name, flag in _NAMESPACES.items():
            theirs = os.stat(f"/proc/{message['pid']}/ns/{name}").st_ino
            if theirs != os.stat(f"/proc/self/ns/{name}").st_ino:
                flags |= flag
        uid, gid = message.get("uid"), message.get("gid")
        if os.geteuid() == 0 and isinstance(uid, int) and isinstance(gid, int):
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        # The pidfd names the process whose pid was looked at: if it has ended, this fails.
        if self._libc.setns(pid1, flags) != 0:
            raise OSError(ctypes.get_errno(), f"setns: {os.strerror(ctypes.get_errno())}")
        for capability in range(self._last_cap + 1):
            if self._libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "cannot drop the capability bounding set")
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        if self._libc.capset(ctypes.byref(header), (_CapData * 2)()) != 0:
            raise OSError(ctypes.get_errno(), "cannot drop the capabilities")
        if self._libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot set no_new_privs")
        cwd = message.get("cwd")
        try:
            os.chdir(cwd if isinstance(cwd, str) else "/workspace")
        except OSError:  # an image's WorkingDir that is not there: its commands say so
            os.chdir("/")


def _exec_child(message: dict[str, object], argv: list[str], fds: list[int], pid: int) -> None:
    """In the spawned child (``pid``): it execs, or says why not and returns."""
    report, fds = fds[0], fds[1:]
    stderr = fds[0]
    step = "say its pid"
    try:
        os.write(report, str(pid).encode())
        os.close(report)
        _signal.set_wakeup_fd(-1)
        # Dispositions that an exec keeps: as a program started by anyone else finds them.
        for number in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGCHLD):
            _signal.signal(number, _signal.SIG_DFL)
        step = "pass its fds"
        # The attached fds to 2, 3, 4, ... by way of numbers above all of them; the rest closed.
        above = max(fds) + len(fds) + 3
        for index, fd in enumerate(fds):
            os.dup2(fd, above + index)
        stderr = above
        for index in range(len(fds)):
            os.dup2(above + index, 2 + index)  # inheritable
        stderr = 2
        os.closerange(2 + len(fds), 2**31 - 1)
        cgroup = message.get("cgroup")
        if isinstance(cgroup, str):
            step = f"join the cgroup {cgroup}"
            procs = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY)
            os.write(procs, b"0")  # this process
            os.close(procs)
        uid, gid = message.get("uid"), message.get("gid")
        if os.geteuid() == 0 and isinstance(uid, int) and isinstance(gid, int):
            step = f"become uid {uid}, gid {gid}"
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        step = f"run {argv[0]}"
        os.execv(argv[0], argv)
    except BaseException as exc:
        _say(stderr, f"cannot {step}: {_why(exc)}")


def _why(exc: BaseException) -> str:
    """What went wrong, for the worker's log and the start error: no repr, no traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _say(fd: int, text: str) -> None:
    """A start error on a launcher's control socket: the worker reports non-JSON as text."""
    try:  # noqa: SIM105  # contextlib would import collections and functools
        os.write(fd, text.encode(errors="replace")[:2000])
    except OSError:
        pass


def main() -> None:
    sock = _socket.socket(fileno=int(sys.argv[1]))
    loop = _launcher.ChildLoop(sock)
    zygote = _Zygote(sock, loop.fds)
    gc.freeze()  # what exists now is shared by every launcher: no collection touches it
    loop.run(zygote.reap, zygote.receive)


if __name__ == "__main__":
    main()
