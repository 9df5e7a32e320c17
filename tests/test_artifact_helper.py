"""The in-sandbox artifact helper, run as the worker runs it: ``python -I -S -B -c SOURCE OP ARGS``.

Each test builds a workspace (and a host directory outside it, standing for the host's files),
runs one operation in a subprocess and checks stdout, the one-line JSON outcome on stderr and
what happened on disk. The last test runs the helper inside a real bubblewrap sandbox.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import services
from services._artifact_helper import _Exactly
from services._sandbox import (
    _SANDBOX_PYTHON_PREFIX,
    SANDBOX_WORKSPACE,
    BwrapOptions,
    _sandbox_python,
    bwrap_argv,
    find_bwrap,
)

SOURCE = (Path(services.__file__).parent / "_artifact_helper.py").read_text()
BINARY = bytes(range(256)) * 400 + os.urandom(50_000)  # more than one read chunk


@dataclass
class Outcome:
    code: int
    stdout: bytes
    result: dict[str, Any]  # the JSON line on stderr

    @property
    def error(self) -> str:
        assert not self.result["ok"], self.result
        return str(self.result["error"])


def _outcome(done: subprocess.CompletedProcess[bytes]) -> Outcome:
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, done.stderr  # the outcome and nothing else
    result = json.loads(lines[0])
    assert done.returncode == (0 if result["ok"] else 1), result
    return Outcome(done.returncode, done.stdout, result)


def helper(workspace: Path, op: str, stdin: bytes | None = None, /, **args: Any) -> Outcome:
    argv = [sys.executable, "-I", "-S", "-B", "-c", SOURCE, op]
    argv.append(json.dumps({"root": str(workspace), **args}))
    done = subprocess.run(
        argv,
        cwd=workspace,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return _outcome(done)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory next to the workspace, with a secret in it."""
    directory = tmp_path / "host"
    directory.mkdir()
    (directory / "secret").write_text("host secret\n")
    return directory


@pytest.fixture
def ws(tmp_path: Path, outside: Path) -> Path:
    """A workspace: src/ with text, binary, nested, empty, linked and special entries."""
    workspace = tmp_path / "ws"
    (workspace / "src" / "sub" / "deeper").mkdir(parents=True)
    (workspace / "src" / "empty").mkdir()
    (workspace / "src" / "a.py").write_text("print('hello')\n")
    (workspace / "src" / "sub" / "b.bin").write_bytes(BINARY)
    (workspace / "src" / "sub" / "deeper" / "c.txt").write_text("deep\n")
    (workspace / "src" / "link").symlink_to("sub/b.bin")  # stays inside src
    (workspace / "src" / "out").symlink_to(Path("..") / ".." / "host" / "secret")
    (workspace / "src" / "abs").symlink_to("/etc/passwd")
    (workspace / "src" / "up").symlink_to("..")  # inside the workspace, not inside src
    os.mkfifo(workspace / "src" / "fifo")
    (workspace / "link_out").symlink_to(outside / "secret")
    (workspace / "dir_out").symlink_to(outside)
    (workspace / "dir_in").symlink_to("src")
    return workspace


SRC_MEMBERS = {"a.py", "empty", "link", "sub", "sub/b.bin", "sub/deeper", "sub/deeper/c.txt"}
SRC_BYTES = len("print('hello')\n") + len(BINARY) + len("deep\n")
SRC_SKIPPED = 4  # out, abs, up, fifo


def _tar(*members: tuple[tarfile.TarInfo, bytes | None], compress: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as tar:
        for member, data in members:
            if data is not None:
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, linkname
    return member


def _tree(directory: Path) -> dict[str, bytes | str | None]:
    """Everything under a directory: file contents, symlink targets, None for directories and
    special files (never opened: a fifo would block)."""
    found: dict[str, bytes | str | None] = {}
    for path in directory.rglob("*"):
        name = str(path.relative_to(directory))
        if path.is_symlink():
            found[name] = os.readlink(path)
        elif path.is_file():
            found[name] = path.read_bytes()
        else:
            found[name] = None
    return found


# -- read -----------------------------------------------------------------------------------------
def test_read_a_small_text_file(ws: Path) -> None:
    outcome = helper(ws, "read", path="src/a.py", max_bytes=1000)
    assert outcome.stdout == b"print('hello')\n"
    assert outcome.result == {
        "ok": True,
        "path": "src/a.py",
        "file_size": 15,
        "bytes": 15,
        "truncated": False,
        "mime": "text/x-python",
        "sha256": hashlib.sha256(b"print('hello')\n").hexdigest(),
    }


def test_read_normalizes_the_path_and_takes_absolute_paths_inside(ws: Path) -> None:
    for given in ("./src/sub/../a.py", str(ws / "src" / "a.py"), "dir_in/a.py"):
        outcome = helper(ws, "read", path=given, max_bytes=1000)
        assert outcome.result["path"] == "src/a.py", given
        assert outcome.stdout == b"print('hello')\n"


def test_read_truncates_and_hashes_what_it_wrote(ws: Path) -> None:
    outcome = helper(ws, "read", path="src/sub/b.bin", max_bytes=70_000)
    assert outcome.stdout == BINARY[:70_000]
    assert outcome.result["file_size"] == len(BINARY)
    assert outcome.result["bytes"] == 70_000
    assert outcome.result["truncated"] is True
    assert outcome.result["sha256"] == hashlib.sha256(BINARY[:70_000]).hexdigest()
    assert outcome.result["mime"] == "application/octet-stream"


def test_read_a_whole_binary_file(ws: Path) -> None:
    outcome = helper(ws, "read", path="src/link", max_bytes=10**9)
    assert outcome.stdout == BINARY
    assert outcome.result["path"] == "src/sub/b.bin"  # the symlink resolved
    assert outcome.result["truncated"] is False
    assert outcome.result["sha256"] == hashlib.sha256(BINARY).hexdigest()


def test_read_refuses_directories_missing_files_and_fifos(ws: Path) -> None:
    assert helper(ws, "read", path="src", max_bytes=10).error == "src is a directory"
    assert helper(ws, "read", path=".", max_bytes=10).error == ". is a directory"
    assert helper(ws, "read", path="nope.txt", max_bytes=10).error == "No such file: nope.txt"
    # A file followed by a slash, as the kernel (and read_file) has it: not a directory.
    for given in ("src/a.py/", "src/a.py/.", "src/a.py/..", "src/a.py/x", "src/a.py/../a.py"):
        assert helper(ws, "read", path=given, max_bytes=10).error == f"Not a directory: {given}"
    assert helper(ws, "list", path="src/a.py/", max_entries=5).error == (
        "Not a directory: src/a.py/"
    )
    # A fifo is never opened (it would block): refused at once, not after the subprocess timeout.
    fifo = helper(ws, "read", path="src/fifo", max_bytes=10)
    assert fifo.error == "src/fifo is not a regular file"
    assert fifo.stdout == b""


@pytest.mark.parametrize(
    "given",
    ["../host/secret", "src/../../host/secret", "link_out", "dir_out/secret", "src/out", "/etc"],
)
def test_read_refuses_paths_that_escape_the_workspace(ws: Path, outside: Path, given: str) -> None:
    outcome = helper(ws, "read", path=given, max_bytes=1000)
    assert outcome.error == f"Path escapes the workspace: {given}"
    assert outcome.stdout == b""


def test_read_refuses_an_absolute_host_path(ws: Path, outside: Path) -> None:
    given = str(outside / "secret")
    outcome = helper(ws, "read", path=given, max_bytes=1000)
    assert outcome.error == f"Path escapes the workspace: {given}"
    assert b"secret" not in outcome.stdout


def test_bad_requests_are_reported_not_raised(ws: Path) -> None:
    assert helper(ws, "frobnicate").error == "Unknown operation: frobnicate"
    assert helper(ws, "read", path="src/a.py").error == "Invalid arguments: 'max_bytes' is required"
    negative = helper(ws, "read", path="src/a.py", max_bytes=-1)
    assert negative.error == "Invalid arguments: 'max_bytes' must be a non-negative integer"
    assert helper(ws, "list", path=3, max_entries=1).error == (
        "Invalid arguments: 'path' must be a string"
    )


def test_a_reader_that_goes_away_gets_a_clean_failure(ws: Path) -> None:
    argv = [sys.executable, "-I", "-S", "-B", "-c", SOURCE, "read"]
    argv.append(json.dumps({"root": str(ws), "path": "src/sub/b.bin", "max_bytes": 10**9}))
    with subprocess.Popen(
        argv, cwd=ws, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # the file is larger than a pipe's buffer: writing must fail
        stderr = process.stderr.read()
        code = process.wait(timeout=30)
    outcome = _outcome(subprocess.CompletedProcess(argv, code, b"", stderr))
    assert outcome.error == "internal error: BrokenPipeError: Broken pipe"


# -- list -----------------------------------------------------------------------------------------
ALL_ENTRIES = [
    "dir_in",
    "dir_out",
    "link_out",
    "src",
    "src/a.py",
    "src/abs",
    "src/empty",
    "src/fifo",
    "src/link",
    "src/out",
    "src/sub",
    "src/sub/b.bin",
    "src/sub/deeper",
    "src/sub/deeper/c.txt",
    "src/up",
]


def _entries(outcome: Outcome) -> list[dict[str, Any]]:
    listing = json.loads(outcome.stdout)
    assert set(listing) == {"entries"}
    entries: list[dict[str, Any]] = listing["entries"]
    assert outcome.result["entry_count"] == len(entries)
    return entries


def test_list_recursively_sorted_without_following_symlinks(ws: Path) -> None:
    outcome = helper(ws, "list", path=".", recursive=True, max_entries=100)
    entries = _entries(outcome)
    assert [entry["path"] for entry in entries] == ALL_ENTRIES  # dir_in/ is not descended
    assert outcome.result["truncated"] is False
    by_path = {entry["path"]: entry for entry in entries}
    assert by_path["src/sub/b.bin"]["size"] == len(BINARY)
    assert by_path["src/sub/b.bin"]["is_dir"] is False
    assert by_path["src/sub"]["is_dir"] is True
    assert by_path["src/sub/deeper/c.txt"]["mtime"] == (ws / "src/sub/deeper/c.txt").stat().st_mtime
    symlinks = {path for path, entry in by_path.items() if entry.get("is_symlink")}
    assert symlinks == {"dir_in", "dir_out", "link_out", "src/abs", "src/link", "src/out", "src/up"}
    assert by_path["dir_in"]["is_dir"] is False


def test_list_one_level_of_a_subdirectory_or_a_single_file(ws: Path) -> None:
    entries = _entries(helper(ws, "list", path="src/sub", recursive=False, max_entries=100))
    assert [entry["path"] for entry in entries] == ["src/sub/b.bin", "src/sub/deeper"]
    entries = _entries(helper(ws, "list", path="src/a.py", recursive=True, max_entries=100))
    assert [(entry["path"], entry["size"]) for entry in entries] == [("src/a.py", 15)]
    # A symlink to a directory inside is listed through its real path.
    entries = _entries(helper(ws, "list", path="dir_in/sub", recursive=False, max_entries=100))
    assert [entry["path"] for entry in entries] == ["src/sub/b.bin", "src/sub/deeper"]


def test_list_stops_at_max_entries(ws: Path) -> None:
    outcome = helper(ws, "list", path=".", recursive=True, max_entries=5)
    assert [entry["path"] for entry in _entries(outcome)] == ALL_ENTRIES[:5]
    assert outcome.result["truncated"] is True
    exact = helper(ws, "list", path=".", recursive=True, max_entries=len(ALL_ENTRIES))
    assert exact.result["truncated"] is False
    assert helper(ws, "list", path="dir_out", max_entries=5).error == (
        "Path escapes the workspace: dir_out"
    )
    assert helper(ws, "list", path="gone", max_entries=5).error == (
        "No such file or directory: gone"
    )


# -- archive --------------------------------------------------------------------------------------
def _archive(ws: Path, **args: Any) -> tuple[Outcome, dict[str, tarfile.TarInfo], dict[str, bytes]]:
    outcome = helper(ws, "archive", **{"path": "src", "format": "tar.gz", **args})
    assert outcome.result["ok"], outcome.result
    members: dict[str, tarfile.TarInfo] = {}
    contents: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(outcome.stdout), mode="r:*") as tar:
        for member in tar:  # reads the whole stream: a truncated archive would raise here
            members[member.name] = member
            if member.isreg():
                extracted = tar.extractfile(member)
                assert extracted is not None
                contents[member.name] = extracted.read()
    return outcome, members, contents


def test_archive_a_tree_file_by_file(ws: Path) -> None:
    outcome, members, contents = _archive(ws, max_bytes=10**8, max_entries=1000)
    assert outcome.stdout[:2] == b"\x1f\x8b"
    gzip.decompress(outcome.stdout)  # a complete gzip stream, trailer included
    assert set(members) == SRC_MEMBERS
    assert members["empty"].isdir() and members["sub/deeper"].isdir()
    assert members["link"].issym() and members["link"].linkname == "sub/b.bin"
    for name, data in contents.items():
        assert data == (ws / "src" / name).read_bytes(), name
    assert set(contents) == {"a.py", "sub/b.bin", "sub/deeper/c.txt"}
    assert members["a.py"].mode == (ws / "src" / "a.py").stat().st_mode & 0o777
    assert outcome.result == {
        "ok": True,
        "entry_count": len(SRC_MEMBERS),
        "bytes": SRC_BYTES,
        "truncated": False,
        "truncated_reason": None,
        "skipped": SRC_SKIPPED,
    }


def test_archive_plain_tar_of_a_single_file(ws: Path) -> None:
    outcome, _, contents = _archive(ws, path="src/a.py", format="tar", max_bytes=100, max_entries=9)
    assert outcome.stdout[257:262] == b"ustar"  # an uncompressed tar header
    assert contents == {"a.py": b"print('hello')\n"}
    assert outcome.result["entry_count"] == 1


def test_archive_truncated_by_max_entries_is_still_a_valid_archive(ws: Path) -> None:
    outcome, members, _ = _archive(ws, format="tgz", max_bytes=10**8, max_entries=3)
    assert list(members) == ["a.py", "empty", "link"]  # walk order: names sorted, depth first
    assert outcome.result["truncated"] is True
    assert outcome.result["truncated_reason"] == "max_entries (3)"
    assert outcome.result["entry_count"] == 3
    gzip.decompress(outcome.stdout)


def test_archive_truncated_by_max_bytes_stops_before_the_big_file(ws: Path) -> None:
    outcome, members, contents = _archive(ws, max_bytes=1000, max_entries=1000)
    assert list(members) == ["a.py", "empty", "link", "sub"]
    assert contents == {"a.py": b"print('hello')\n"}
    assert outcome.result["truncated_reason"] == "max_bytes (1000)"
    assert outcome.result["bytes"] == 15
    gzip.decompress(outcome.stdout)


def test_archive_entries_have_the_size_recorded_even_if_the_file_changes() -> None:
    """A file that grows or shrinks while archived (tarfile alone would raise on a short read,
    leaving a broken stream) gives exactly the bytes its header announced."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as tar:
        for name, now in (("grew", b"g" * 30), ("shrank", b"s" * 4)):
            member = tarfile.TarInfo(name)
            member.size = 10  # as recorded when the file was opened
            tar.addfile(member, _Exactly(io.BytesIO(now), member.size))
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r|") as tar:
        contents = {}
        for member in tar:
            extracted = tar.extractfile(member)
            assert extracted is not None
            contents[member.name] = extracted.read()
    assert contents == {"grew": b"g" * 10, "shrank": b"s" * 4 + bytes(6)}


def test_archive_refusals(ws: Path) -> None:
    base = {"max_bytes": 10, "max_entries": 10}
    assert helper(ws, "archive", path="src", format="zip", **base).error == (
        "Unsupported archive format: zip (use tar.gz, tgz or tar)"
    )
    assert helper(ws, "archive", path="dir_out", format="tar", **base).error == (
        "Path escapes the workspace: dir_out"
    )
    assert helper(ws, "archive", path="src/fifo", format="tar", **base).error == (
        "src/fifo is neither a directory nor a regular file"
    )


# -- extract --------------------------------------------------------------------------------------
def test_extract_round_trips_an_archive(ws: Path) -> None:
    packed = helper(ws, "archive", path="src", format="tar.gz", max_bytes=10**8, max_entries=99)
    outcome = helper(
        ws, "extract", packed.stdout, path="copy/here", max_bytes=10**8, max_entries=99
    )
    assert outcome.result == {
        "ok": True,
        "entry_count": len(SRC_MEMBERS),
        "bytes": SRC_BYTES,
        "path": "copy/here",
    }
    expected = {name: value for name, value in _tree(ws / "src").items() if name in SRC_MEMBERS}
    assert _tree(ws / "copy" / "here") == expected
    # Extracting again over the same files replaces them.
    again = helper(ws, "extract", packed.stdout, path="copy/here", max_bytes=10**8, max_entries=99)
    assert again.result["ok"]
    assert _tree(ws / "copy" / "here") == expected


def test_extract_applies_the_data_filter_to_modes_and_owners(ws: Path) -> None:
    setuid, private, script = _member("setuid"), _member("private"), _member("bin/script")
    setuid.mode, private.mode, script.mode = 0o6777, 0o400, 0o750
    setuid.uid = private.uid = 12345
    upload = _tar((setuid, b"s"), (private, b"p"), (script, b"x"), compress=False)
    outcome = helper(ws, "extract", upload, path="up", max_bytes=100, max_entries=10)
    assert outcome.result["entry_count"] == 3
    modes = {name: (ws / "up" / name).stat().st_mode & 0o7777 for name in ("setuid", "private")}
    assert modes == {"setuid": 0o755, "private": 0o600}
    assert (ws / "up" / "bin" / "script").stat().st_mode & 0o7777 == 0o750
    assert (ws / "up" / "setuid").stat().st_uid == os.getuid()


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("/abs/x"), "its path is absolute"),
        (_member("../x"), "its path leaves the destination"),
        (_member("a/../../x"), "its path leaves the destination"),
        (_member("l", tarfile.SYMTYPE, "../../host"), "symlink target '../../host' leaves"),
        (_member("d/l", tarfile.SYMTYPE, "../.."), "symlink target '../..' leaves"),
        (_member("l", tarfile.SYMTYPE, "/etc"), "symlink target '/etc' is absolute"),
        (
            _member("h", tarfile.LNKTYPE, "../host/secret"),
            "hard link target '../host/secret' leaves",
        ),
        (
            _member("h", tarfile.LNKTYPE, "/etc/passwd"),
            "hard link target '/etc/passwd' is absolute",
        ),
        (_member("null", tarfile.CHRTYPE), "devices are not allowed"),
        (_member("disk", tarfile.BLKTYPE), "devices are not allowed"),
        (_member("pipe", tarfile.FIFOTYPE), "fifos are not allowed"),
    ],
)
def test_extract_refuses_members_that_leave_or_are_special(
    ws: Path, outside: Path, member: tarfile.TarInfo, reason: str
) -> None:
    before = _tree(outside)
    upload = _tar((_member("first"), b"1"), (member, None))
    outcome = helper(ws, "extract", upload, path="up", max_bytes=100, max_entries=10)
    assert outcome.error.startswith(f"Refusing archive member {member.name!r}: {reason}")
    assert outcome.error.endswith("(1 entry was extracted)")
    assert (ws / "up" / "first").read_bytes() == b"1"
    assert _tree(ws / "up") == {"first": b"1"}
    assert _tree(outside) == before


def test_extract_never_writes_through_an_existing_symlink_to_outside(
    ws: Path, outside: Path
) -> None:
    (ws / "up").mkdir()
    (ws / "up" / "evil").symlink_to(outside)
    before = _tree(outside)
    for name in ("evil/x", "evil/sub/x", "evil/secret"):
        outcome = helper(
            ws, "extract", _tar((_member(name), b"pwned")), max_bytes=99, max_entries=9, path="up"
        )
        assert outcome.error == (
            f"Refusing archive member {name!r}: a symlink on its path leads outside the "
            "destination (0 entries were extracted)"
        )
    directory = helper(
        ws,
        "extract",
        _tar((_member("evil", tarfile.DIRTYPE), None)),
        path="up",
        max_bytes=9,
        max_entries=9,
    )
    assert "a symlink on its path leads outside" in directory.error
    assert _tree(outside) == before
    # A file member of that name replaces the symlink itself, never its target.
    replaced = helper(
        ws, "extract", _tar((_member("evil"), b"mine")), path="up", max_bytes=9, max_entries=9
    )
    assert replaced.result["ok"]
    assert not (ws / "up" / "evil").is_symlink()
    assert (ws / "up" / "evil").read_bytes() == b"mine"
    assert _tree(outside) == before


def test_extract_follows_links_that_stay_inside(ws: Path) -> None:
    upload = _tar(
        (_member("real", tarfile.DIRTYPE), None),
        (_member("alias", tarfile.SYMTYPE, "real"), None),
        (_member("alias/file"), b"through the alias"),
        (_member("hard", tarfile.LNKTYPE, "real/file"), None),
        (_member("./", tarfile.DIRTYPE), None),  # the destination itself: nothing to do
    )
    outcome = helper(ws, "extract", upload, path="up", max_bytes=100, max_entries=10)
    assert outcome.result == {"ok": True, "entry_count": 4, "bytes": 17, "path": "up"}
    assert (ws / "up" / "real" / "file").read_bytes() == b"through the alias"
    assert (ws / "up" / "hard").stat().st_ino == (ws / "up" / "real" / "file").stat().st_ino


def test_extract_limits(ws: Path) -> None:
    upload = _tar(*((_member(f"f{i}"), b"x" * 100) for i in range(3)))
    too_many = helper(ws, "extract", upload, path="a", max_bytes=1000, max_entries=2)
    assert too_many.error == "Upload exceeds max_entries (2) (2 entries were extracted, 200 bytes)"
    too_big = helper(ws, "extract", upload, path="b", max_bytes=150, max_entries=10)
    assert too_big.error == "Upload exceeds max_bytes (150) (1 entry was extracted, 100 bytes)"
    assert sorted(os.listdir(ws / "b")) == ["f0"]
    exact = helper(ws, "extract", upload, path="c", max_bytes=300, max_entries=3)
    assert exact.result["ok"] and exact.result["bytes"] == 300


def test_extract_refuses_bad_destinations_and_bad_uploads(ws: Path, outside: Path) -> None:
    upload = _tar((_member("x"), b"x"))
    assert helper(ws, "extract", upload, path="../host", max_bytes=9, max_entries=9).error == (
        "Path escapes the workspace: ../host"
    )
    assert helper(ws, "extract", upload, path="dir_out/new", max_bytes=9, max_entries=9).error == (
        "Path escapes the workspace: dir_out/new"
    )
    assert not (outside / "new").exists()
    assert helper(ws, "extract", upload, path="src/a.py", max_bytes=9, max_entries=9).error == (
        "src/a.py is not a directory"
    )
    garbage = helper(ws, "extract", b"not a tar at all" * 100, path="g", max_bytes=9, max_entries=9)
    assert garbage.error.startswith("The upload is not a valid tar archive: ")
    cut = helper(
        ws,
        "extract",
        _tar((_member("big"), BINARY))[:5000],
        path="g",
        max_bytes=10**6,
        max_entries=9,
    )
    assert cut.error.startswith("Cannot extract archive member 'big': ")


# -- in a real sandbox ----------------------------------------------------------------------------
def test_inside_bubblewrap_the_workspace_is_the_root(ws: Path, outside: Path) -> None:
    bwrap = find_bwrap()
    assert bwrap is not None, "bubblewrap is a test prerequisite"
    python = _sandbox_python()

    def in_sandbox(op: str, stdin: bytes | None = None, **args: Any) -> Outcome:
        command = [python.executable, "-I", "-S", "-B", "-c", SOURCE, op]
        command.append(json.dumps({"root": SANDBOX_WORKSPACE, **args}))
        argv = bwrap_argv(BwrapOptions(bwrap=bwrap, allow_network=False), ws, command)
        if python.prefix is not None:  # an interpreter outside /usr, as the real sandbox binds it
            argv[1:1] = ["--ro-bind", python.prefix, _SANDBOX_PYTHON_PREFIX]
        done = subprocess.run(
            argv,
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            timeout=30,
            check=False,
        )
        return _outcome(done)

    read = in_sandbox("read", path="/workspace/src/a.py", max_bytes=100)
    assert read.stdout == b"print('hello')\n"
    assert read.result["path"] == "src/a.py"
    for given in (str(outside / "secret"), "link_out", "../etc/passwd", "/etc/passwd"):
        escape = in_sandbox("read", path=given, max_bytes=100)
        assert escape.error == f"Path escapes the workspace: {given}"
        assert escape.stdout == b""
    packed = in_sandbox("archive", path="src", format="tgz", max_bytes=10**8, max_entries=99)
    assert packed.result["entry_count"] == len(SRC_MEMBERS)
    unpacked = in_sandbox("extract", packed.stdout, path="copy", max_bytes=10**8, max_entries=99)
    assert unpacked.result["ok"], unpacked.result
    assert (ws / "copy" / "sub" / "b.bin").read_bytes() == BINARY  # on the host's workspace
