"""``read_file`` and ``write_file`` on a workspace, confined by the kernel, not by a check.

The worker (often root) does these itself, on the host, for speed. A path checked first and
opened after could be swapped for a symlink to a host file in between by a process the agent
left running, and root would then write where the agent cannot. So every path is opened with
``openat2(RESOLVE_BENEATH)`` relative to the workspace: the kernel resolves ``..`` and
symlinks and refuses, atomically, anything that would leave the workspace (absolute symlinks
included). Files are opened non-blocking, so a fifo cannot hang the worker, and must be regular
files. Kernels before 5.6 have no openat2: there each component is opened with ``O_NOFOLLOW``
from the workspace down, and symlinks are refused instead of followed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import posixpath
import stat
from collections.abc import Iterator
from pathlib import Path

from ._sandbox import SANDBOX_WORKSPACE

_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_FILE_MODE = 0o644
_DIR_MODE = 0o755


class PathRefused(Exception):
    """The path cannot be used; the message is for the agent."""


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_libc = ctypes.CDLL(None, use_errno=True)
_has_openat2: bool | None = None  # found out on first use


def from_sandbox_path(raw: str) -> str:
    """``/workspace/...``, as commands see the workspace, relative to it; others unchanged."""
    if raw == SANDBOX_WORKSPACE or raw.startswith(SANDBOX_WORKSPACE + "/"):
        return raw[len(SANDBOX_WORKSPACE) :].lstrip("/") or "."
    return raw


def relative_path(raw: str) -> str:
    """The tool's path argument relative to the workspace; ``/workspace/...`` is accepted."""
    if "\x00" in raw:
        raise PathRefused("Path contains a NUL byte")
    relative = from_sandbox_path(raw)
    if relative != raw:
        return relative
    if os.path.isabs(raw):
        raise PathRefused(f"Path {raw!r} is outside the workspace (use a relative path)")
    # Said at once when the words alone leave (the kernel would first miss a name on the way).
    if posixpath.normpath(raw or ".").split("/")[0] == "..":
        raise PathRefused(f"Path {raw!r} is outside the workspace")
    return raw or "."


def open_beneath(root_fd: int, relative: str, flags: int, mode: int = _FILE_MODE) -> int:
    """An fd for ``relative`` under the directory ``root_fd``, never for anything outside it."""
    global _has_openat2
    if _has_openat2 is not False:
        # The kernel wants no mode unless a file may be created.
        how = _OpenHow(
            flags | os.O_CLOEXEC,
            mode if flags & os.O_CREAT else 0,
            _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS,
        )
        fd = _libc.syscall(
            _SYS_OPENAT2, root_fd, relative.encode(), ctypes.byref(how), ctypes.sizeof(how)
        )
        if fd >= 0:
            _has_openat2 = True
            return int(fd)
        code = ctypes.get_errno()
        if code != errno.ENOSYS:
            _has_openat2 = True
            raise OSError(code, os.strerror(code), relative)
        _has_openat2 = False
    return _open_without_symlinks(root_fd, relative, flags, mode)


def _open_without_symlinks(root_fd: int, relative: str, flags: int, mode: int) -> int:
    """The fallback: walk down with O_NOFOLLOW; ``..`` goes back up the directories walked
    down, never above the workspace. As with openat2, a name followed by more (``f.txt/``,
    ``f.txt/..``) must be a directory."""
    parts = relative.split("/")
    directories = [os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)]
    try:
        for index, part in enumerate(parts):
            if part in ("", "."):
                continue
            if part == "..":
                if len(directories) == 1:
                    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), relative)
                os.close(directories.pop())
            elif index == len(parts) - 1:
                return os.open(
                    part, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=directories[-1]
                )
            else:
                directories.append(_open_directory(part, directories[-1]))
        # The path ends with "/", "." or "..": it names the directory reached.
        return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=directories[-1])
    finally:
        for directory in directories:
            os.close(directory)


def _open_directory(name: str, parent: int) -> int:
    """An O_PATH fd of the directory ``name`` in ``parent``; a symlink there is refused."""
    try:
        return os.open(
            name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
        )
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


@contextlib.contextmanager
def _workspace_fd(workspace: Path) -> Iterator[int]:
    fd = os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _refusal(exc: OSError, raw: str) -> PathRefused:
    """What the agent reads for an OSError of its path (no host paths in it)."""
    if exc.errno == errno.EXDEV:
        return PathRefused(f"Path {raw!r} is outside the workspace")
    if exc.errno == errno.ELOOP:
        return PathRefused(
            f"Path {raw!r} goes through a symlink that cannot be followed here "
            "(one that leaves the workspace, or a loop)"
        )
    if exc.errno == errno.ENOENT:
        return PathRefused(f"No such file: {raw}")
    if exc.errno == errno.ENOTDIR:  # a file followed by "/" (f.txt/, f.txt/x)
        return PathRefused(f"Not a directory: {raw}")
    if exc.errno == errno.EISDIR:
        return PathRefused(f"{raw} is a directory")
    if exc.errno == errno.ENXIO:  # a fifo without a reader, a socket
        return PathRefused(f"{raw} is not a regular file")
    return PathRefused(f"{raw}: {exc.strerror or type(exc).__name__}")


def _regular(fd: int, raw: str) -> os.stat_result:
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise PathRefused(f"{raw} is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise PathRefused(f"{raw} is not a regular file")
    return info


def read_head(workspace: Path, raw: str, max_bytes: int) -> tuple[int, bytes]:
    """The file's size and its first ``max_bytes`` bytes."""
    relative = relative_path(raw)
    with _workspace_fd(workspace) as root:
        try:
            fd = open_beneath(root, relative, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise _refusal(exc, raw) from None
        try:
            info = _regular(fd, raw)
            os.set_blocking(fd, True)
            chunks: list[bytes] = []
            wanted = max_bytes
            while wanted > 0 and (chunk := os.read(fd, min(wanted, 1 << 20))):
                chunks.append(chunk)
                wanted -= len(chunk)
            return info.st_size, b"".join(chunks)
        finally:
            os.close(fd)


def write(workspace: Path, raw: str, data: bytes, owner: tuple[int, int] | None) -> None:
    """Write ``data`` to the file (created, parents too), owned by ``owner`` when given."""
    relative = relative_path(raw)
    parent, _, name = relative.rpartition("/")
    if name in ("", ".", ".."):
        raise PathRefused(f"{raw} is a directory")
    with _workspace_fd(workspace) as root:
        try:
            if parent:
                _make_directories(root, parent, owner)
            fd = open_beneath(root, relative, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, _FILE_MODE)
        except OSError as exc:
            raise _refusal(exc, raw) from None
        try:
            info = _regular(fd, raw)
            os.set_blocking(fd, True)
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if owner is not None and (info.st_uid, info.st_gid) != owner:
                os.fchown(fd, *owner)  # the sandbox's user must be able to change it
        finally:
            os.close(fd)


def _make_directories(root: int, parent: str, owner: tuple[int, int] | None) -> None:
    """``mkdir -p`` of ``parent`` under ``root``, each step confined like the open."""
    done = ""
    for part in parent.split("/"):
        if part in ("", "."):
            continue
        step = f"{done}/{part}" if done else part
        try:
            os.close(open_beneath(root, step, os.O_PATH | os.O_DIRECTORY))
        except FileNotFoundError:
            base = open_beneath(root, done or ".", os.O_PATH | os.O_DIRECTORY)
            try:
                os.mkdir(part, _DIR_MODE, dir_fd=base)
                if owner is not None:
                    os.chown(part, *owner, dir_fd=base, follow_symlinks=False)
            except FileExistsError:
                pass  # made meanwhile; the next step's open checks what it is
            finally:
                os.close(base)
        done = step
