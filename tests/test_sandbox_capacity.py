"""What a live sandbox costs the worker, and what its leaner start must still guarantee."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from services._cgroups import PidsCgroups
from services._fd_limits import FDS_MARGIN, FDS_PER_SLOT
from services._sandbox import BwrapOptions, BwrapSandbox, SandboxError, SandboxFactory
from services._sandbox_contract import SandboxLimits
from services._zygote import LauncherZygote
from tests._processes import stop_process
from tests._sandboxes import bwrap_sandbox, sh

_BOUND_S = 30.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


async def test_an_idle_sandbox_holds_two_fds_and_no_thread_in_the_worker(tmp_path: Path) -> None:
    """A worker keeps a thousand idle sandboxes: each holds only its control socket and a
    pidfd of its pid 1 (a stop waits for its namespace to end), and no child-watcher thread;
    nothing of its start (bubblewrap's info pipe and stderr) stays open. (The worker's
    launcher zygote, one socket, is the warm-up's here.)"""
    zygote = LauncherZygote()
    try:
        async with bwrap_sandbox(tmp_path / "warmup", zygote=zygote) as warmup:
            await sh(warmup, "true")  # the event loop's own fds and threads exist from here on
            fds, threads = _open_fds(), _threads()
            async with bwrap_sandbox(tmp_path / "ws", zygote=zygote) as sandbox:
                assert (await sh(sandbox, "echo up")).stdout.text == "up\n"
                for _ in range(3):  # closed transports let go of their pipes on the next turn
                    await asyncio.sleep(0)
                assert _open_fds() - fds == 2
                assert _threads() - threads == 0
            assert _open_fds() == fds
    finally:
        await zygote.close()


async def test_no_command_can_see_end_or_stop_the_launcher(tmp_path: Path) -> None:
    """The launcher is outside the sandbox's pid namespace (its commands are inside): nothing
    in there sees it, and signals to everything a command can see (pid 1 included) leave the
    slot's sandbox (its private /tmp here) and its launcher serving."""
    async with bwrap_sandbox(tmp_path / "ws") as sandbox:
        listing = await sh(sandbox, "touch /tmp/mark; cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        assert "python" not in listing.stdout.text, listing
        assert "sleep 2147483647" in listing.stdout.text, listing  # what pid 1 waits on
        for signal_name in ("KILL", "STOP", "TERM", "INT", "HUP", "SEGV", "CONT"):
            await sh(sandbox, f"kill -{signal_name} 1; kill -{signal_name} -1")
        outcome = await sh(sandbox, "test -e /tmp/mark && echo same sandbox")
        assert outcome.stdout.text == "same sandbox\n", outcome


_COUNT_ZOMBIES = (
    "for i in $(seq 200); do "
    "  n=$(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l); "
    '  [ "$n" = 0 ] && break; sleep 0.05; '
    'done; echo "$n"'
)


async def test_orphans_are_reaped(tmp_path: Path) -> None:
    async with bwrap_sandbox(tmp_path / "ws") as sandbox:
        # Twenty grandchildren that exit at once, orphaned first: pid 1 must collect them.
        orphans = await sh(sandbox, "for i in $(seq 20); do ( (exit 3) & ); done; true")
        assert orphans.exit_code == 0, orphans
        # Bounded: the loop inside waits (10 s at most) until pid 1 has reaped them all.
        assert (await sh(sandbox, _COUNT_ZOMBIES)).stdout.text == "0\n"


async def test_what_bubblewrap_writes_at_a_failed_start_is_the_error(tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: no such thing as a sandbox here' >&2\nexit 1\n")
    fake.chmod(0o755)
    (tmp_path / "ws").mkdir()
    zygote = LauncherZygote()
    options = BwrapOptions(bwrap=fake, allow_network=False)
    sandbox = BwrapSandbox(tmp_path / "ws", options, zygote=zygote)
    try:
        with pytest.raises(SandboxError, match="no such thing as a sandbox here"):
            await asyncio.wait_for(sandbox.run("true"), _BOUND_S)
    finally:
        await sandbox.close()
        await zygote.close()


async def test_a_slot_sandbox_runs_as_its_user_in_its_cgroup(tmp_path: Path) -> None:
    """The slot's user and pids cgroup are set by exec'd helpers, not by a preexec_fn: every
    uid and gid (real, effective, saved, fs) is the slot's, with no supplementary group, and
    the sandbox's processes are in the slot's cgroup."""
    if os.geteuid() != 0:
        pytest.fail("this test checks the root worker's user separation; run the suite as root")
    cgroups = PidsCgroups.create(f"test-{uuid.uuid4().hex[:8]}").cgroups
    if cgroups is None:
        pytest.fail("no writable pids cgroup here")
    base = 2_000_000_000
    factory = SandboxFactory(
        allow_network=False,
        require_sandbox=True,
        limits=SandboxLimits(),
        cgroups=cgroups,
        uid_base=base,
    )
    root = tmp_path / "root"
    root.mkdir()
    for directory in (root, *root.parents):  # the slot's user must pass through to it
        if directory == Path(tempfile.gettempdir()):
            break
        directory.chmod(directory.stat().st_mode | 0o111)
    await factory.probe(root / ".probe")
    assert not factory.reason_not_separate_user
    (root / "slot_3").mkdir()
    sandbox = factory.make(3, root / "slot_3")
    try:
        status = await sh(sandbox, "grep -E '^(Uid|Gid|Groups):' /proc/self/status")
        lines = {line.split(":")[0]: line.split()[1:] for line in status.stdout.text.splitlines()}
        assert lines == {"Uid": [str(base + 3)] * 4, "Gid": [str(base + 3)] * 4, "Groups": []}
        busy = await sandbox.spawn(["/bin/sh", "-c", "echo $$; exec sleep 600"])
        try:
            assert await asyncio.wait_for(busy.stdout.readline(), _BOUND_S)  # it runs
            procs = Path(f"/sys/fs/cgroup/pids/toolbus/{factory_name(cgroups)}/slot_3")
            members = (procs / "cgroup.procs").read_text().split()
            commands = [Path(f"/proc/{p}/cmdline").read_bytes() for p in members]
            # The command (the shell, or the sleep it became), the launcher (a fork of the
            # zygote), the sandbox's pid 1 and its sleep, and bubblewrap.
            assert any(b"sleep 600" in c or b"sleep\x00600" in c for c in commands), commands
            assert any(b"_zygote_main.py" in command for command in commands), commands
        finally:
            busy.close()
    finally:
        await sandbox.close()
        await factory.close()
        await cgroups.remove()


def factory_name(cgroups: PidsCgroups) -> str:
    return cgroups._root.name


async def test_a_worker_raises_its_open_file_limit_and_says_how_many_slots_it_holds(
    nats_url: str, tmp_path: Path
) -> None:
    hard = 600
    slots, spare = 200, 4
    held = (hard - FDS_MARGIN) // FDS_PER_SLOT - spare  # trajectories: the spares come first
    assert held < slots
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "TOOLBUS_NATS_URL": nats_url,
        "TOOLBUS_WORKER_ID": f"fd-limit-{uuid.uuid4().hex[:8]}",
        "TOOLBUS_SLOTS": str(slots),
        "TOOLBUS_SPARE_SLOTS": str(spare),
        "TOOLBUS_DATA_DIR": str(tmp_path),
        "TOOLBUS_MIN_FREE_DISK_MB": "0",
        "TOOLBUS_LOG_LEVEL": "warning",
        "TOOLBUS_LOG_FORMAT": "json",
    }

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services",
        "worker",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=low_limit,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(_BOUND_S):
            while True:
                line = await process.stderr.readline()
                assert line, "the worker exited without the warning"
                record = json.loads(line)
                if "open-file limit" in record.get("event", ""):
                    break
        assert record["slots"] == slots
        assert record["slots_held"] == held
        assert record["nofile_soft"] == hard
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        assert any(
            line.startswith("Max open files") and line.split()[3:5] == [str(hard), str(hard)]
            for line in limits.splitlines()
        ), limits
    finally:
        await stop_process(process)
