"""read_file / write_file confinement: the kernel (openat2 RESOLVE_BENEATH) refuses every way out,
and the fallback for kernels without openat2 refuses symlinks altogether."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from services import _files as files
from tests.conftest import StackFactory
from tests.test_sandbox_security import _still_serving


@pytest.fixture(params=["openat2", "fallback"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(files, "_has_openat2", None if request.param == "openat2" else False)
    return str(request.param)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "file.txt").write_text("inside")
    (tmp_path / "secret").write_text("host secret")
    os.symlink(tmp_path / "secret", root / "absolute-out")
    os.symlink("../secret", root / "relative-out")
    os.symlink("sub/file.txt", root / "inside-link")
    os.mkfifo(root / "fifo")
    return root


def test_reads_stay_inside(workspace: Path, resolution: str) -> None:
    assert files.read_head(workspace, "sub/file.txt", 100) == (6, b"inside")
    assert files.read_head(workspace, "/workspace/sub/../sub/file.txt", 3) == (6, b"ins")
    for path in ("absolute-out", "relative-out", "../secret", "sub/../../secret", "/etc/passwd"):
        with pytest.raises(files.PathRefused) as refused:
            files.read_head(workspace, path, 100)
        assert "outside the workspace" in str(refused.value) or "symlink" in str(refused.value)
    if resolution == "openat2":
        assert files.read_head(workspace, "inside-link", 100) == (6, b"inside")
    else:
        with pytest.raises(files.PathRefused, match="symlink"):
            files.read_head(workspace, "inside-link", 100)


def test_fifos_and_directories_are_refused_without_blocking(
    workspace: Path, resolution: str
) -> None:
    with pytest.raises(files.PathRefused, match="fifo is not a regular file"):
        files.read_head(workspace, "fifo", 100)
    with pytest.raises(files.PathRefused, match="fifo is not a regular file"):
        files.write(workspace, "fifo", b"x", None)
    with pytest.raises(files.PathRefused, match="sub is a directory"):
        files.read_head(workspace, "sub", 100)
    with pytest.raises(files.PathRefused, match="No such file: nope"):
        files.read_head(workspace, "nope", 100)


@pytest.mark.parametrize(
    "path", ["sub/file.txt/", "sub/file.txt/.", "sub/file.txt/..", "sub/file.txt/x", "inside-link/"]
)
def test_a_file_followed_by_a_slash_is_not_a_directory(
    workspace: Path, resolution: str, path: str
) -> None:
    """As the kernel has it (cat f.txt/: Not a directory), with or without openat2."""
    if resolution == "fallback" and path.startswith("inside-link"):
        with pytest.raises(files.PathRefused, match="symlink"):  # never followed there
            files.read_head(workspace, path, 100)
        return
    with pytest.raises(files.PathRefused) as refused:
        files.read_head(workspace, path, 100)
    assert str(refused.value) == f"Not a directory: {path}"
    assert files.read_head(workspace, "sub/./file.txt", 100) == (6, b"inside")
    with pytest.raises(files.PathRefused, match="sub/ is a directory"):
        files.read_head(workspace, "sub/", 100)


def test_writes_stay_inside_and_make_parents(workspace: Path, resolution: str) -> None:
    files.write(workspace, "new/deeper/f.txt", b"hello", None)
    assert (workspace / "new" / "deeper" / "f.txt").read_bytes() == b"hello"
    files.write(workspace, "sub/file.txt", b"x", None)  # truncates what was there
    assert (workspace / "sub" / "file.txt").read_bytes() == b"x"
    for path in ("absolute-out", "relative-out", "../x", "relative-out/x"):
        with pytest.raises(files.PathRefused):
            files.write(workspace, path, b"pwned", None)
    assert (workspace.parent / "secret").read_text() == "host secret"
    assert not (workspace.parent / "x").exists()


async def test_a_symlink_swapped_in_during_writes_never_reaches_the_host(
    make_stack: StackFactory, trajectory: Callable[[], str], tmp_path: Path
) -> None:
    """The race the kernel check closes: a background process flips a name between a file
    and a symlink to a host file while the worker (root) writes to that name."""
    stack = await make_stack()
    tid = trajectory()
    target = tmp_path / "host-file"
    target.write_text("host")
    target.chmod(0o666)  # the sandbox user could not write it itself either way
    flip = (
        f"(while :; do ln -sfn {target} flip; rm -f flip; touch flip; done) "
        ">/dev/null 2>&1 & echo started"
    )
    assert (await stack.client.execute(tid, "terminal", {"command": flip})).success
    for _ in range(300):
        await stack.client.execute(tid, "write_file", {"path": "flip", "content": "pwned"})
    assert target.read_text() == "host"
    await stack.client.release(tid, reset_workspace=True)
    await _still_serving(stack.client, trajectory())


async def test_a_fifo_does_not_hang_the_worker(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    assert (await stack.client.execute(tid, "terminal", {"command": "mkfifo p"})).success
    read = await stack.client.execute(tid, "read_file", {"path": "p"}, timeout_s=5)
    assert not read.success and "not a regular file" in (read.error or "")
    await _still_serving(stack.client, tid)
