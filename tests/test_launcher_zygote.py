"""The launcher zygote: one process per worker forks each sandbox's launcher into it.

What is checked is what a slot relies on: a launcher holds no privilege in its sandbox, a
zygote that dies is replaced without touching live sandboxes, and a sandbox's end ends its
launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services import _sandbox_process
from services._cgroups import PidsCgroups
from services._sandbox import BwrapOptions, BwrapSandbox, SandboxError, find_bwrap
from services._zygote import LauncherZygote
from tests._sandboxes import bwrap_sandbox, sh
from tests._waits import until

_BOUND_S = 30.0


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _zygote_pid(zygote: LauncherZygote) -> int:
    process = zygote._process
    assert process is not None, "the zygote has not started"
    return process.pid


async def test_commands_hold_no_capability_and_gain_none(tmp_path: Path) -> None:
    """Joined namespaces give the launcher every capability there: all are dropped (bounding
    set included) and no_new_privs is set before any command starts, as bubblewrap does."""
    async with bwrap_sandbox(tmp_path / "ws") as sandbox:
        status = await sh(sandbox, "grep -E '^(Cap[A-Za-z]+|NoNewPrivs):' /proc/self/status")
        fields = dict(line.split(":\t") for line in status.stdout.text.splitlines())
        assert fields == {
            "CapInh": "0000000000000000",
            "CapPrm": "0000000000000000",
            "CapEff": "0000000000000000",
            "CapBnd": "0000000000000000",
            "CapAmb": "0000000000000000",
            "NoNewPrivs": "1",
        }, status


async def test_a_lost_zygote_is_replaced_and_live_sandboxes_keep_serving(tmp_path: Path) -> None:
    zygote = LauncherZygote()
    try:
        async with bwrap_sandbox(tmp_path / "first", zygote=zygote) as first:
            assert (await sh(first, "touch /tmp/mark; echo up")).stdout.text == "up\n"
            lost = _zygote_pid(zygote)
            os.kill(lost, signal.SIGKILL)
            await until(lambda: zygote._process is not None and zygote._process.poll() is not None)
            # Its launcher was a child of the zygote, not of its life: it serves on.
            same = await sh(first, "test -e /tmp/mark && echo same sandbox")
            assert same.stdout.text == "same sandbox\n", same
            async with bwrap_sandbox(tmp_path / "second", zygote=zygote) as second:
                assert (await sh(second, "echo fresh")).stdout.text == "fresh\n"
                assert _zygote_pid(zygote) != lost
    finally:
        await zygote.close()


async def test_a_sandboxs_end_ends_its_launcher(tmp_path: Path) -> None:
    zygote = LauncherZygote()
    try:
        async with bwrap_sandbox(tmp_path / "ws", zygote=zygote) as sandbox:
            assert (await sh(sandbox, "echo up")).stdout.text == "up\n"
            assert len(_children(_zygote_pid(zygote))) == 1  # its launcher
            await asyncio.wait_for(sandbox.reset(), _BOUND_S)
            await until(lambda: _children(_zygote_pid(zygote)) == [])
            # The next command gets a fresh sandbox and a launcher of its own.
            assert (await sh(sandbox, "echo again")).stdout.text == "again\n"
            assert len(_children(_zygote_pid(zygote))) == 1
    finally:
        await zygote.close()


async def test_a_launcher_that_cannot_join_its_sandbox_fails_the_start_with_why(
    tmp_path: Path,
) -> None:
    """A pidfd of a process that has ended: the launcher says why on its socket."""
    zygote = LauncherZygote()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Popen, not asyncio: no child watcher may reap it before its pidfd is open.
    ended = subprocess.Popen(["/bin/sleep", "600"])  # noqa: ASYNC220 - reaped by its own wait
    pidfd = os.pidfd_open(ended.pid)
    try:
        ended.kill()
        ended.wait()
        await zygote.launch(
            theirs, pid1=ended.pid, pidfd=pidfd, owner=None, cgroup=None, rlimits=""
        )
        theirs.close()
        ours.settimeout(_BOUND_S)
        said = await asyncio.to_thread(ours.recv, 65536)
        assert b"could not" in said, said
        assert await asyncio.to_thread(ours.recv, 65536) == b""  # and it is gone
    finally:
        os.close(pidfd)
        ours.close()
        theirs.close()
        await zygote.close()


def _bubblewraps() -> list[int]:
    """This process's children that are (or were: zombies) a bubblewrap."""
    found = []
    for child in _children(os.getpid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == "bwrap":
                found.append(int(child))
    return found


async def test_bubblewrap_is_this_process_child_and_holds_nothing_of_its(tmp_path: Path) -> None:
    """The zygote starts bubblewrap as a child of this process (CLONE_PARENT: it is reaped
    here, and --die-with-parent ties it to this process), with none of its environment."""
    async with bwrap_sandbox(tmp_path / "ws") as sandbox:
        assert (await sh(sandbox, "echo up")).stdout.text == "up\n"
        pid = sandbox.launcher_pid
        assert pid is not None and _bubblewraps() == [pid]
        status = dict(
            line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        assert int(status["PPid"]) == os.getpid()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        # Only what the zygote's interpreter sets for itself (PEP 538's locale coercion).
        assert {name.partition(b"=")[0] for name in environ if name} <= {b"LC_CTYPE"}
    assert _bubblewraps() == []  # ended and reaped


@pytest.mark.parametrize("how", ["cancel", "reset"])
async def test_a_start_given_up_at_any_moment_leaves_nothing_running(
    tmp_path: Path, how: str
) -> None:
    """Whether the start has sent its spawn, waits for bubblewrap's pid, for its namespace's
    pid 1, for its set-up or for its launcher: a start cancelled, or a reset that comes
    meanwhile, ends all it started and reaps bubblewrap, and the next start works. Nothing
    is left in the slot's cgroup (bubblewrap's child outlives a kill of bubblewrap during its
    set-up: it sets --die-with-parent only at its end)."""
    async with _sandbox_in_a_cgroup(tmp_path) as (sandbox, cgroup):
        for delay_ms in (0, 0.2, 0.5, 1, 2, 3, 5, 8, 13, 21, 34):
            start = asyncio.create_task(sandbox.start())
            await asyncio.sleep(delay_ms / 1000)
            if how == "cancel":
                start.cancel()
            else:
                await asyncio.wait_for(sandbox.reset(), _BOUND_S)
            with contextlib.suppress(asyncio.CancelledError, SandboxError):
                await asyncio.wait_for(start, _BOUND_S)
            if start.cancelled() or start.exception() is not None:  # it gave up
                assert _bubblewraps() == [], f"after {delay_ms} ms"
            await asyncio.wait_for(sandbox.reset(), _BOUND_S)
            assert _bubblewraps() == [], f"after {delay_ms} ms"
            # The launcher, killed by the zygote at the stop, may take a moment to go.
            await until(lambda: _members(cgroup) == [], timeout_s=_BOUND_S)
        assert (await sh(sandbox, "echo works")).stdout.text == "works\n"


@pytest.mark.parametrize("what", ["bubblewrap", "cgroup"])
async def test_a_spawn_that_cannot_start_says_why(tmp_path: Path, what: str) -> None:
    """A bubblewrap that is not there, a cgroup that is not there: the start fails with what
    the zygote's child could not do, and leaves nothing behind."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    bwrap, cgroup = find_bwrap(), None
    assert bwrap is not None, "these tests need bubblewrap"
    if what == "bubblewrap":
        bwrap = tmp_path / "no-such-bwrap"
        expected = f"cannot run {bwrap}: No such file"
    else:
        cgroup = tmp_path / "no-such-cgroup"
        expected = f"cannot join the cgroup {cgroup}: No such file"
    zygote = LauncherZygote()
    options = BwrapOptions(bwrap=bwrap, allow_network=False)
    sandbox = BwrapSandbox(workspace, options, zygote=zygote, cgroup=cgroup)
    try:
        with pytest.raises(SandboxError, match=re.escape(expected)):
            await sandbox.start()
        assert _bubblewraps() == []
    finally:
        await sandbox.close()
        await zygote.close()


async def test_a_stop_that_cannot_wait_for_a_slow_start_ends_it_once_it_is_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start given up while its spawn is held up (the zygote stopped here): the stop waits
    its bound, says the slot may not be clean, and ends what the spawn starts once it does;
    a later stop reaps it."""
    monkeypatch.setattr(_sandbox_process, "STOP_TIMEOUT_S", 0.5)
    async with _sandbox_in_a_cgroup(tmp_path) as (sandbox, cgroup):
        zygote = sandbox._zygote
        assert (await sh(sandbox, "echo up")).stdout.text == "up\n"  # the zygote runs
        await asyncio.wait_for(sandbox.reset(), _BOUND_S)
        os.kill(_zygote_pid(zygote), signal.SIGSTOP)
        try:
            start = asyncio.create_task(sandbox.start())
            await until(lambda: sandbox._spawning is not None)  # sent, not yet cloned
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(start, _BOUND_S)
        finally:
            os.kill(_zygote_pid(zygote), signal.SIGCONT)
        # The spawn goes on: its bubblewrap is ended as soon as it is known.
        with pytest.raises(SandboxError, match="did not all end"):
            await asyncio.wait_for(sandbox.close(), _BOUND_S)
        await until(lambda: _members(cgroup) == [])
        await asyncio.wait_for(sandbox.reset(), _BOUND_S)  # reaps it
        assert _bubblewraps() == []
        assert (await sh(sandbox, "echo works")).stdout.text == "works\n"


@contextlib.asynccontextmanager
async def _sandbox_in_a_cgroup(tmp_path: Path) -> AsyncIterator[tuple[BwrapSandbox, Path]]:
    """A sandbox (network off) in a pids cgroup of its own, with its own zygote; the cgroup."""
    cgroups = PidsCgroups.create(f"test-{uuid.uuid4().hex[:8]}").cgroups
    if cgroups is None:
        pytest.fail("no writable pids cgroup here")
    cgroup = cgroups.slot(0, 64)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    bwrap = find_bwrap()
    assert bwrap is not None, "these tests need bubblewrap"
    zygote = LauncherZygote()
    options = BwrapOptions(bwrap=bwrap, allow_network=False)
    sandbox = BwrapSandbox(workspace, options, zygote=zygote, cgroup=cgroup)
    try:
        yield sandbox, cgroup
    finally:
        await sandbox.close()
        await zygote.close()
        await cgroups.remove()


def _members(cgroup: Path) -> list[str]:
    return (cgroup / "cgroup.procs").read_text().split()
