"""The launcher zygote: one process per worker forks each sandbox's launcher into it.

What is checked is what a slot relies on: a launcher holds no privilege in its sandbox, a
zygote that dies is replaced without touching live sandboxes, and a sandbox's end ends its
launcher.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path

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
