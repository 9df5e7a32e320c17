"""Artifact operations on a slot's workspace, run inside the slot's sandbox as the slot's user.

The worker (often root) never touches workspace files itself for these: a hostile background
process in the sandbox could swap a path for a symlink to a host file between a check and its
use. Run here instead, every operation sees only what the slot's own commands see; the checks
below make the outcomes exact (and keep the unsandboxed fallback inside the workspace), while
the sandbox is what bounds any race. Only the standard library is used, like ``_launcher.py``:

    <python> -I -S -B -c <this source> OP ARGUMENTS_JSON

with the workspace as the working directory. ARGUMENTS_JSON is one JSON object and always has
``"root"``: the workspace as this process sees it (``/workspace`` in the sandbox). Each path
argument is relative to root, or absolute; it must resolve (following symlinks, ``..``
included) to root or below, else the operation fails with ``Path escapes the workspace: PATH``.
Paths in results are relative to root and normalized: ``src/a.py``, ``.`` for root itself.

    read     {root, path, max_bytes}
             stdout: the file's first max_bytes bytes.
             summary: path, file_size, bytes, truncated, mime, sha256 (of the bytes written).
    list     {root, path, recursive, max_entries}
             stdout: {"entries": [{"path", "is_dir", "size", "mtime", "is_symlink"?}, ...]}:
             depth first, names sorted in each directory, parents before children, symlinks
             listed and never followed ("is_symlink": true only on them); a file lists itself.
             summary: entry_count, truncated.
    archive  {root, path, format, max_bytes, max_entries}    format: "tar.gz", "tgz" or "tar"
             stdout: a tar stream of the directory at path. Member names are relative to that
             directory (archiving "src" gives "a.py", "sub", "sub/b.bin"; no "." member); a
             regular file is archived alone under its base name. Directories (empty ones too),
             regular files, and symlinks whose target is relative and stays inside the archived
             directory are included; other symlinks, fifos, sockets, devices and unreadable
             files are skipped and counted. The walk stops before the entry that would take the
             member count past max_entries or the file content bytes past max_bytes; the stream
             is still a complete, valid archive.
             summary: entry_count, bytes (file content), truncated, truncated_reason
             ("max_entries (N)", "max_bytes (N)" or null), skipped.
    extract  {root, path, max_bytes, max_entries}
             stdin: a tar stream (plain, gzip, bz2 or xz: detected), unpacked into the
             directory path (created if missing). Refused, naming the member: absolute names,
             names or link targets that leave the destination, anything written through an
             existing symlink that leads outside it, devices and fifos. As tarfile's "data"
             filter: no setuid/setgid/sticky or group/other write bits, no ownership change.
             More than max_entries members or max_bytes file content bytes fails, and what was
             extracted before the limit stays.
             summary: entry_count, bytes, path.

The last line on stderr is the outcome, one JSON object, and nothing else is written there:
``{"ok": true, ...summary}`` with exit code 0, or ``{"ok": false, "error": "..."}`` with exit
code 1; the error is meant for the agent (no traceback, no path the caller did not give).

One file, past the house's 400 lines, because it has to be: the sandbox can import nothing of
toolbus, so the source ``_artifact_process.py`` passes to ``-c`` is the whole program.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import mimetypes
import os
import stat
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterator
from typing import BinaryIO

_CHUNK = 1 << 16
# Measured on source trees and site-packages: level 1 compresses at 100-150 MB/s, level 6 (gzip's
# default) at 35-55 MB/s for archives only 14-21% smaller, level 9 at a third of that again for
# under 1% more. In a cluster the CPU is worth more than those bytes on the wire: level 1.
_GZIP_LEVEL = 1
_FORMATS = {"tar.gz": True, "tgz": True, "tar": False}  # format -> gzip-compressed


class Failure(Exception):
    """The operation cannot be done; the message is the agent's to read."""


# -- arguments and paths --------------------------------------------------------------------------
class Arguments:
    """The operation's JSON arguments, read with their expected types."""

    def __init__(self, raw: str) -> None:
        try:
            values = json.loads(raw)
        except ValueError:
            raise Failure("Invalid arguments: not JSON") from None
        if not isinstance(values, dict):
            raise Failure("Invalid arguments: expected a JSON object")
        self._values: dict[str, object] = values

    def _get(self, key: str, default: object) -> object:
        value = self._values.get(key, default)
        if value is None:
            raise Failure(f"Invalid arguments: {key!r} is required")
        return value

    def text(self, key: str, default: str | None = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise Failure(f"Invalid arguments: {key!r} must be a string")
        return value

    def count(self, key: str) -> int:
        value = self._get(key, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise Failure(f"Invalid arguments: {key!r} must be a non-negative integer")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise Failure(f"Invalid arguments: {key!r} must be true or false")
        return value


def _inside(path: str, base: str) -> bool:
    """Whether the absolute, normalized path is base or below it."""
    return os.path.commonpath([path, base]) == base


class Workspace:
    """The workspace root and the paths given relative to it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def resolve(self, given: str) -> str:
        """The real absolute path of a path argument, which must stay in the workspace."""
        if "\0" in given:
            raise Failure(f"Invalid path: {given!r}")
        joined = os.path.join(self.root, given)
        real = os.path.realpath(joined)
        if not _inside(real, self.root):
            raise Failure(f"Path escapes the workspace: {given}")
        # realpath reads "f.txt/" (or "f.txt/..") as if f.txt were a directory; the kernel,
        # and read_file, do not. Asked of the kernel only: this process sees no more than
        # the agent's own commands do.
        try:
            os.lstat(joined)
        except NotADirectoryError:
            raise Failure(f"Not a directory: {given}") from None
        except OSError:
            pass  # missing, or unreadable: the operation says so in its own words
        return real

    def relative(self, real: str) -> str:
        return os.path.relpath(real, self.root)


def _os_failure(exc: OSError, given: str, missing: str = "No such file or directory") -> Failure:
    """An OSError as the agent should read it: about the path it gave, no host paths."""
    if isinstance(exc, NotADirectoryError):
        return Failure(f"Not a directory: {given}")
    if isinstance(exc, FileNotFoundError):
        return Failure(f"{missing}: {given}")
    return Failure(f"{given}: {exc.strerror or type(exc).__name__}")


def _lstat(real: str, given: str, missing: str = "No such file or directory") -> os.stat_result:
    try:
        return os.lstat(real)
    except OSError as exc:
        raise _os_failure(exc, given, missing) from None


class _NotRegular(OSError):
    """Opened something that is neither a regular file nor a directory."""


def _open_regular(real: str) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without following a symlink or blocking on a fifo."""
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IsADirectoryError if stat.S_ISDIR(info.st_mode) else _NotRegular
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _walk(
    top: str, recursive: bool, unreadable: Callable[[], None] = lambda: None
) -> Iterator[tuple[str, os.stat_result]]:
    """Everything under top (not top itself): depth first, each directory's names sorted,
    parents before children. Symlinks are not followed; a directory that cannot be read is
    still yielded, and ``unreadable`` is called instead of walking it."""

    def children(directory: str) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as entries:
                return iter(sorted(entries, key=lambda entry: entry.name))
        except OSError:
            unreadable()
            return iter(())

    pending = [children(top)]  # a stack rather than recursion: trees can be deep
    while pending:
        entry = next(pending[-1], None)
        if entry is None:
            pending.pop()
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:  # gone since the directory was read
            continue
        yield entry.path, info
        if recursive and stat.S_ISDIR(info.st_mode):
            pending.append(children(entry.path))


# -- read -----------------------------------------------------------------------------------------
def read(workspace: Workspace, args: Arguments, out: BinaryIO) -> dict[str, object]:
    given = args.text("path")
    max_bytes = args.count("max_bytes")
    real = workspace.resolve(given)
    info = _lstat(real, given, "No such file")
    if stat.S_ISDIR(info.st_mode):
        raise Failure(f"{given} is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise Failure(f"{given} is not a regular file")
    try:
        fd, info = _open_regular(real)
    except IsADirectoryError:
        raise Failure(f"{given} is a directory") from None
    except _NotRegular:
        raise Failure(f"{given} is not a regular file") from None
    except OSError as exc:
        raise _os_failure(exc, given, "No such file") from None
    digest = hashlib.sha256()
    written = 0
    with open(fd, "rb", buffering=0) as source:
        while written < max_bytes:
            chunk = source.read(min(_CHUNK, max_bytes - written))
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            written += len(chunk)
    return {
        "path": workspace.relative(real),
        "file_size": info.st_size,
        "bytes": written,
        "truncated": info.st_size > written,
        "mime": mimetypes.guess_type(real)[0] or "application/octet-stream",
        "sha256": digest.hexdigest(),
    }


# -- list -----------------------------------------------------------------------------------------
def list_(workspace: Workspace, args: Arguments, out: BinaryIO) -> dict[str, object]:
    given = args.text("path", ".")
    recursive = args.flag("recursive", False)
    max_entries = args.count("max_entries")
    real = workspace.resolve(given)
    info = _lstat(real, given)
    found = _walk(real, recursive) if stat.S_ISDIR(info.st_mode) else iter([(real, info)])
    entries: list[dict[str, object]] = []
    truncated = False
    for path, entry_info in found:
        if len(entries) == max_entries:
            truncated = True
            break
        is_dir = stat.S_ISDIR(entry_info.st_mode)
        entry: dict[str, object] = {
            "path": workspace.relative(path),
            "is_dir": is_dir,
            "size": 0 if is_dir else entry_info.st_size,
            "mtime": entry_info.st_mtime,
        }
        if stat.S_ISLNK(entry_info.st_mode):
            entry["is_symlink"] = True
        entries.append(entry)
    out.write(json.dumps({"entries": entries}).encode())
    return {"entry_count": len(entries), "truncated": truncated}


# -- archive --------------------------------------------------------------------------------------
class _Exactly:
    """Exactly ``size`` bytes of an open file, as its tar header promised: a file that grows
    meanwhile is cut there, one that shrinks is padded with zeros."""

    def __init__(self, source: BinaryIO, size: int) -> None:
        self._source = source
        self._left = size

    def read(self, size: int = -1) -> bytes:
        wanted = self._left if size < 0 else min(size, self._left)
        data = self._source.read(wanted)  # buffered: short only at the end of the file
        data += bytes(wanted - len(data))
        self._left -= wanted
        return data


def _archive_member(
    path: str, info: os.stat_result, base: str, top: str
) -> tuple[tarfile.TarInfo, BinaryIO | None] | None:
    """The tar member of a walked entry (named relative to base), with the open content of a
    regular file; None for what is skipped: a symlink that is absolute or leads out of top, a
    special file, a file that cannot be read (or is no longer what the walk saw)."""
    member = tarfile.TarInfo(os.path.relpath(path, base))
    member.mode = info.st_mode & 0o777
    member.mtime = max(0, int(info.st_mtime))
    if stat.S_ISDIR(info.st_mode):
        member.type = tarfile.DIRTYPE
        return member, None
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            return None
        lands = os.path.realpath(os.path.join(os.path.dirname(path), target))
        if os.path.isabs(target) or not _inside(lands, top):
            return None
        member.type, member.linkname = tarfile.SYMTYPE, target
        return member, None
    if stat.S_ISREG(info.st_mode):
        try:
            fd, info = _open_regular(path)
        except OSError:
            return None
        member.size = info.st_size
        return member, open(fd, "rb")
    return None


def archive(workspace: Workspace, args: Arguments, out: BinaryIO) -> dict[str, object]:
    given = args.text("path", ".")
    kind = args.text("format", "tar.gz")
    max_bytes = args.count("max_bytes")
    max_entries = args.count("max_entries")
    if kind not in _FORMATS:
        raise Failure(f"Unsupported archive format: {kind} (use tar.gz, tgz or tar)")
    top = workspace.resolve(given)
    info = _lstat(top, given)
    if stat.S_ISDIR(info.st_mode):
        base = top
    elif stat.S_ISREG(info.st_mode):
        base = os.path.dirname(top)
    else:
        raise Failure(f"{given} is neither a directory nor a regular file")
    skipped = 0

    def skip() -> None:
        nonlocal skipped
        skipped += 1

    found = _walk(top, True, skip) if base == top else iter([(top, info)])
    count = total = 0
    reason: str | None = None
    compressor = (
        gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=_GZIP_LEVEL, mtime=0)
        if _FORMATS[kind]
        else None
    )
    with tarfile.open(fileobj=compressor or out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path, entry_info in found:
            prepared = _archive_member(path, entry_info, base, top)
            if prepared is None:
                skipped += 1
                continue
            member, content = prepared
            try:
                if count + 1 > max_entries:
                    reason = f"max_entries ({max_entries})"
                elif total + member.size > max_bytes:
                    reason = f"max_bytes ({max_bytes})"
                if reason is not None:
                    break
                tar.addfile(member, _Exactly(content, member.size) if content else None)
            finally:
                if content is not None:
                    content.close()
            count += 1
            total += member.size
    if compressor is not None:
        compressor.close()  # writes the gzip trailer; ``out`` stays open
    return {
        "entry_count": count,
        "bytes": total,
        "truncated": reason is not None,
        "truncated_reason": reason,
        "skipped": skipped,
    }


# -- extract --------------------------------------------------------------------------------------
class _Extraction:
    """Unpacks tar members one by one into a destination directory, within limits."""

    def __init__(self, destination: str, max_bytes: int, max_entries: int) -> None:
        self.destination = destination
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.count = 0
        self.total = 0

    def so_far(self) -> str:
        return f"{self.count} {'entry was' if self.count == 1 else 'entries were'} extracted"

    def refuse(self, member: tarfile.TarInfo, reason: str) -> Failure:
        return Failure(f"Refusing archive member {member.name!r}: {reason} ({self.so_far()})")

    def over_limit(self, limit: str) -> Failure:
        return Failure(f"Upload exceeds {limit} ({self.so_far()}, {self.total} bytes)")

    def _relative(self, member: tarfile.TarInfo, name: str, what: str) -> str:
        """A member name or hard link target, normalized; it must stay in the destination."""
        if os.path.isabs(name):
            raise self.refuse(member, f"{what} is absolute")
        normalized = os.path.normpath(name)
        if normalized == ".." or normalized.startswith("../"):
            raise self.refuse(member, f"{what} leaves the destination")
        return normalized

    def _checked(self, member: tarfile.TarInfo, path: str) -> str:
        """The real path, which must be in the destination (no symlink leading out)."""
        real = os.path.realpath(path)
        if not _inside(real, self.destination):
            raise self.refuse(member, "a symlink on its path leads outside the destination")
        return real

    def _make_room(self, member: tarfile.TarInfo, target: str) -> None:
        """Clear the way for a new file or link: replace a file or symlink (never followed)."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(target).st_mode):
                raise self.refuse(member, "a directory is in the way")
            os.unlink(target)

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = self._relative(member, member.name, "its path")
        if name == ".":
            if member.isdir():
                return  # the destination itself
            raise self.refuse(member, "it would replace the destination")
        if member.ischr() or member.isblk():
            raise self.refuse(member, "devices are not allowed")
        if member.isfifo():
            raise self.refuse(member, "fifos are not allowed")
        if not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
            raise self.refuse(member, f"unsupported member type {member.type!r}")
        if self.count + 1 > self.max_entries:
            raise self.over_limit(f"max_entries ({self.max_entries})")
        if member.isreg() and self.total + member.size > self.max_bytes:
            raise self.over_limit(f"max_bytes ({self.max_bytes})")
        path = os.path.join(self.destination, name)
        # Everything is checked before anything is created, the parent included: an existing
        # symlink on the way could lead out. The parent is checked again once it exists.
        parent = self._checked(member, os.path.dirname(path))
        link_source = self._link_source(member) if member.islnk() else ""
        if member.issym():
            self._check_symlink(member, parent)
        os.makedirs(parent, exist_ok=True)
        parent = self._checked(member, parent)
        target = os.path.join(parent, os.path.basename(path))
        if member.isdir():
            if not os.path.isdir(self._checked(member, target)):
                self._make_room(member, target)
                os.mkdir(target)
        elif member.issym():
            self._make_room(member, target)
            os.symlink(member.linkname, target)
        elif member.islnk():
            self._make_room(member, target)
            os.link(link_source, target, follow_symlinks=False)
        else:
            self._write(tar, member, target)
            self.total += member.size
        self.count += 1

    def _check_symlink(self, member: tarfile.TarInfo, parent: str) -> None:
        what = f"symlink target {member.linkname!r}"
        if os.path.isabs(member.linkname):
            raise self.refuse(member, f"{what} is absolute")
        if not _inside(os.path.realpath(os.path.join(parent, member.linkname)), self.destination):
            raise self.refuse(member, f"{what} leaves the destination")

    def _link_source(self, member: tarfile.TarInfo) -> str:
        """The file a hard link member links to: one already in the destination."""
        what = f"hard link target {member.linkname!r}"
        linked = self._relative(member, member.linkname, what)  # relative to the destination
        source = os.path.realpath(os.path.join(self.destination, linked))
        if not _inside(source, self.destination):
            raise self.refuse(member, f"{what} leaves the destination")
        if not os.path.isfile(source):
            raise self.refuse(member, f"{what} is not a file in the destination")
        return source

    def _write(self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
        # As tarfile's data filter: no special bits, no group/other write, the owner can read
        # and write, executable bits only when the owner's is set.
        mode = member.mode & 0o755 | 0o600
        if not mode & 0o100:
            mode &= ~0o111
        self._make_room(member, target)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        source = tar.extractfile(member)
        assert source is not None  # a regular file
        with open(os.open(target, flags, 0o600), "wb") as sink:
            left = member.size
            while left:
                chunk = source.read(min(_CHUNK, left))
                if not chunk:
                    raise tarfile.ReadError("unexpected end of data")
                sink.write(chunk)
                left -= len(chunk)
            sink.flush()
            os.fchmod(sink.fileno(), mode)
            with contextlib.suppress(OverflowError, ValueError, OSError):  # an odd mtime
                os.utime(sink.fileno(), (member.mtime, member.mtime))


def extract(workspace: Workspace, args: Arguments, source: BinaryIO) -> dict[str, object]:
    given = args.text("path", ".")
    max_bytes = args.count("max_bytes")
    max_entries = args.count("max_entries")
    destination = workspace.resolve(given)
    try:
        os.makedirs(destination, exist_ok=True)
    except FileExistsError:
        raise Failure(f"{given} is not a directory") from None
    except OSError as exc:
        raise _os_failure(exc, given) from None
    destination = workspace.resolve(given)  # again: it now exists, whatever it resolves to
    if not os.path.isdir(destination):
        raise Failure(f"{given} is not a directory")
    extraction = _Extraction(destination, max_bytes, max_entries)
    current: tarfile.TarInfo | None = None  # the member being extracted
    try:
        with tarfile.open(fileobj=source, mode="r|*") as tar:
            for current in tar:
                extraction.add(tar, current)
                current = None
    except (tarfile.TarError, EOFError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        what = "The upload is not a valid tar archive"
        if current is not None:
            what = f"Cannot extract archive member {current.name!r}"
        raise Failure(f"{what}: {detail or type(exc).__name__} ({extraction.so_far()})") from None
    return {
        "entry_count": extraction.count,
        "bytes": extraction.total,
        "path": workspace.relative(destination),
    }


# -- main -----------------------------------------------------------------------------------------
def _run(argv: list[str]) -> dict[str, object]:
    if len(argv) != 3:
        raise Failure("Usage: OP ARGUMENTS_JSON")
    op, args = argv[1], Arguments(argv[2])
    workspace = Workspace(args.text("root"))
    out = sys.stdout.buffer
    if op == "read":
        summary = read(workspace, args, out)
    elif op == "list":
        summary = list_(workspace, args, out)
    elif op == "archive":
        summary = archive(workspace, args, out)
    elif op == "extract":
        summary = extract(workspace, args, sys.stdin.buffer)
    else:
        raise Failure(f"Unknown operation: {op}")
    out.flush()
    return summary


def main(argv: list[str]) -> int:
    warnings.simplefilter("ignore")  # nothing but the outcome may reach stderr
    try:
        outcome: dict[str, object] = {"ok": True, **_run(argv)}
    except Failure as exc:
        outcome = {"ok": False, "error": str(exc)}
    except Exception as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        outcome = {"ok": False, "error": f"internal error: {type(exc).__name__}: {detail}"}
    try:
        sys.stdout.flush()
    except OSError:  # the reader went away: drop what is left, so exit stays quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.stderr.write(json.dumps(outcome) + "\n")
    sys.stderr.flush()
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
