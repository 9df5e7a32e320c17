"""An image layer (a tar, maybe gzipped) applied onto a root filesystem directory.

Layers apply in order, as a container runtime applies them: an entry replaces what an earlier
layer had at its path; ``.wh.<name>`` removes ``<name>``; ``.wh..wh..opq`` empties its
directory of what earlier layers put there. Nothing of a layer reaches outside the root: every
path is walked from the root one component at a time (``O_NOFOLLOW``), and a symlink met on
the way is resolved as the image sees it (an absolute target from the image's root), never the
host's. Hard links must point inside the root. Device nodes are left out (a sandbox gets a
fresh ``/dev``). Every file is the image owner's (``owner``, the host user an image slot's
uid 0 maps to), or the worker's when it is not root: one uid inside, for now.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_MAX_SYMLINKS = 40  # as the kernel's limit for one lookup
_COPY_CHUNK = 1024 * 1024
_FILE_MODE_BITS = 0o1777  # all but setuid and setgid


class LayerError(Exception):
    """The layer cannot be applied (message: what, for the caller)."""


@contextlib.contextmanager
def _decompressed(blob: Path) -> Iterator[IO[bytes]]:
    with blob.open("rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic.startswith(_ZSTD):
            raise LayerError("zstd-compressed layers are not supported; push the image with gzip")
        if magic.startswith(_GZIP):
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield unzipped  # type: ignore[misc]  # (a GzipFile reads as IO[bytes] does)
        else:
            yield raw


def apply_layer(blob: Path, root: Path, *, owner: tuple[int, int] | None) -> None:
    """Apply the layer in ``blob`` onto ``root``. Blocking."""
    made: set[str] = set()  # paths this layer wrote: an opaque marker keeps them
    modes: list[tuple[str, int]] = []  # directories' modes, set last (one may be read-only)
    with _decompressed(blob) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    path = _clean(member.name)
                    if path is not None:
                        _apply(root, path, member, tar, made, modes, owner)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile) as exc:
            raise LayerError(f"the layer is not a readable tar: {exc}") from None
    for path, mode in reversed(modes):  # children before parents
        with contextlib.suppress(FileNotFoundError):
            directory = _resolve(root, path)
            if stat.S_ISDIR(os.lstat(directory).st_mode):
                os.chmod(directory, mode)


def _clean(name: str) -> str | None:
    """The member's path relative to the root; None for the root itself. ``..`` is refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"the layer has a path that leaves the root: {name!r}")
    return "/".join(parts) or None


def _apply(
    root: Path,
    path: str,
    member: tarfile.TarInfo,
    tar: tarfile.TarFile,
    made: set[str],
    modes: list[tuple[str, int]],
    owner: tuple[int, int] | None,
) -> None:
    parent, base = posixpath.split(path)
    if base == _OPAQUE:
        _empty_except(root, parent, made)
        return
    if base.startswith(_WHITEOUT):
        hidden = base.removeprefix(_WHITEOUT)
        if hidden in ("", ".", ".."):  # ".wh..." would remove the directory above the root
            raise LayerError(f"the layer has a whiteout of no entry: {path!r}")
        _remove(root, posixpath.join(parent, hidden))
        return
    if member.ischr() or member.isblk():
        return  # a fresh /dev in every sandbox
    where = _make_parents(root, parent, owner)
    target = os.path.join(where, base)
    existing = _lstat(target)
    if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
        _remove_path(target, existing)
    if member.isdir():
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            os.mkdir(target, 0o700)
        modes.append((path, member.mode & 0o7777))
    elif member.issym():
        os.symlink(member.linkname, target)
    elif member.islnk():
        source = _clean(member.linkname)
        if source is None:
            raise LayerError(f"the hard link {path!r} points at the root")
        try:
            os.link(_resolve(root, source), target, follow_symlinks=False)
        except OSError as exc:
            raise LayerError(f"the hard link {path!r} -> {source!r}: {exc.strerror}") from None
    elif member.isfifo():
        os.mkfifo(target, member.mode & 0o777)
    elif member.isreg():
        _write_file(target, tar, member)
    else:
        return  # (sparse and other GNU types read as regular; nothing else is meaningful)
    made.add(path)
    if owner is not None:
        os.chown(target, *owner, follow_symlinks=False)
    if not member.isdir() and not member.issym():  # (a file this layer just made: no link)
        # No setuid or setgid: useless inside (no_new_privs), and the cache is on the host.
        os.chmod(target, member.mode & _FILE_MODE_BITS)
    if not member.issym():
        os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)


def _write_file(target: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    source = tar.extractfile(member)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        if source is not None:
            shutil.copyfileobj(source, out, _COPY_CHUNK)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove_path(path: str, status: os.stat_result) -> None:
    if stat.S_ISDIR(status.st_mode):
        make_tree_writable(path)
        shutil.rmtree(path)
    else:
        os.unlink(path)


def make_tree_writable(directory: str | Path) -> None:
    """Owner rights on the directories of a tree about to go (an image's read-only directory
    keeps its entries). Real directories only: a symlink's target is never touched."""
    for parent, dirnames, _ in os.walk(directory):  # (does not follow symlinks)
        for name in (".", *dirnames):
            path = os.path.join(parent, name)
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    os.chmod(path, 0o700)


def remove_tree(path: Path, *, ignore_errors: bool) -> None:
    """A tree of an image's (a root, an overlay), whatever modes its directories were given."""
    if path.exists():
        make_tree_writable(path)
        shutil.rmtree(path, ignore_errors=ignore_errors)


def _remove(root: Path, path: str) -> None:
    """A whiteout: what earlier layers had at ``path`` goes (nothing there: nothing to do)."""
    parent, base = posixpath.split(path)
    if base in ("", ".", ".."):
        raise LayerError(f"the layer has a whiteout of no entry: {path!r}")
    try:
        where = _resolve(root, parent) if parent else str(root)
    except FileNotFoundError:
        return
    target = os.path.join(where, base)
    existing = _lstat(target)
    if existing is not None:
        _remove_path(target, existing)


def _empty_except(root: Path, directory: str, made: set[str]) -> None:
    """An opaque directory: the entries earlier layers gave it go, this layer's stay."""
    try:
        where = _resolve(root, directory) if directory else str(root)
    except FileNotFoundError:
        return
    for name in os.listdir(where):
        child = posixpath.join(directory, name) if directory else name
        if child not in made:
            _remove_path(os.path.join(where, name), os.lstat(os.path.join(where, name)))


def _make_parents(root: Path, parent: str, owner: tuple[int, int] | None) -> str:
    """The host path of directory ``parent`` in the image, made where missing."""
    return _resolve(root, parent, make=True, owner=owner) if parent else str(root)


def _resolve(
    root: Path, path: str, *, make: bool = False, owner: tuple[int, int] | None = None
) -> str:
    """The host path of ``path`` as the image sees it: symlinks followed inside the root only
    (an absolute target starts at the image's root, ``..`` stops there). Missing components
    are made as directories when ``make``, else FileNotFoundError."""
    resolved: list[str] = []
    pending = [p for p in path.split("/") if p not in ("", ".")]
    followed = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        host = os.path.join(root, *resolved, part)
        try:
            status = os.lstat(host)
        except FileNotFoundError:
            if not make:
                raise
            os.mkdir(host, 0o755)
            if owner is not None:
                os.chown(host, *owner)
            resolved.append(part)
            continue
        if stat.S_ISLNK(status.st_mode):
            followed += 1
            if followed > _MAX_SYMLINKS:
                raise LayerError(f"too many symlinks in {path!r}")
            link = os.readlink(host)
            if link.startswith("/"):
                resolved = []
            pending = [p for p in link.split("/") if p not in ("", ".")] + pending
            continue
        if pending and not stat.S_ISDIR(status.st_mode):
            raise LayerError(f"{'/'.join([*resolved, part])!r} is a file in the image")
        resolved.append(part)
    return os.path.join(root, *resolved)


def ensure_directory(root: Path, path: str, owner: tuple[int, int] | None) -> None:
    """``path`` in the image made a directory where missing (its WorkingDir, as a runtime
    makes it at a container's start). LayerError when a file is in the way."""
    directory = _resolve(root, path, make=True, owner=owner)
    if not os.path.isdir(directory):
        raise LayerError(f"{path!r} is not a directory in the image")


def has_file(root: Path, path: str) -> bool:
    """Whether the image has a file at ``path`` (its symlinks followed inside it)."""
    try:
        return os.path.isfile(_resolve(root, path))
    except (FileNotFoundError, LayerError):
        return False


def tree_bytes(root: Path) -> int:
    """Disk used by a tree (its blocks; hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for parent, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            status = os.lstat(os.path.join(parent, name))
            key = (status.st_dev, status.st_ino)
            if key not in seen:
                seen.add(key)
                total += status.st_blocks * 512
    return total
