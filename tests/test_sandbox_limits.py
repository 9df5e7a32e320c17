"""Resource limits: each runaway command is stopped, and the service serves the next call."""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Callable
from pathlib import Path

import pytest

from services._process import MAX_COMMAND_BYTES
from services._sandbox import SandboxLimits
from services.exceptions import PayloadTooLarge
from tests._sandboxes import bwrap_sandbox, sh
from tests.conftest import StackFactory
from tests.test_sandbox_security import _still_serving

TIGHT = SandboxLimits(max_processes=64, max_memory_mb=256, max_cpu_s=1, max_file_mb=1, max_tmp_mb=1)


async def test_a_fork_bomb_is_contained_and_the_worker_lives_on(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(worker_options={"limits": TIGHT})
    worker = stack.workers[0]
    if worker.process_limit.startswith("none"):
        pytest.fail(
            "no writable pids cgroup and running as root: a fork bomb would not be contained "
            f"here ({worker.process_limit}); refusing to run it"
        )
    tid = trajectory()
    bomb = await stack.client.execute(
        tid, "terminal", {"command": "bomb() { bomb | bomb & }; bomb; sleep 5"}, timeout_s=3
    )
    assert not bomb.success
    assert bomb.metadata["status"] == "timeout"
    slot = bomb.metadata["slot"]  # whichever it got (a warm slot goes first)
    cgroup = Path("/sys/fs/cgroup/pids/toolbus") / worker.worker_id / f"slot_{slot}"
    if cgroup.exists():
        peak = int((cgroup / "pids.peak").read_text())
        assert peak <= 64  # never more than max_processes at once
        # bubblewrap, the sandbox's pid 1 and its sleep, the launcher
        assert int((cgroup / "pids.current").read_text()) <= 4
    await _still_serving(stack.client, tid)


async def test_without_a_cgroup_the_slots_user_limit_contains_a_fork_bomb(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(worker_options={"limits": TIGHT, "pids_cgroup": False})
    worker = stack.workers[0]
    if worker.process_limit.startswith("none"):
        pytest.fail(f"a root worker without sandbox users has no process limit here: {worker}")
    assert worker.process_limit.startswith("RLIMIT_NPROC")
    tid = trajectory()
    # A subshell starts 200 background sleeps (bash exits when a fork fails for good); then
    # count what runs with builtins only: the sandbox's /proc shows only its own processes.
    spawn = (
        "(for i in $(seq 200); do sleep 5 >/dev/null & done) 2>/dev/null; "
        "n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo running $n"
    )
    result = await stack.client.execute(tid, "terminal", {"command": spawn}, timeout_s=20)
    assert "running" in result.output, result
    assert 32 < int(result.output.split()[-1]) <= 64
    await stack.client.release(tid, reset_workspace=True)  # ends the sleeps
    await _still_serving(stack.client, trajectory())


async def test_a_big_file_stops_at_the_file_size_limit(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(worker_options={"limits": TIGHT})
    tid = trajectory()
    result = await stack.client.execute(
        tid, "terminal", {"command": "head -c 20000000 /dev/zero > big"}
    )
    assert not result.success
    assert "File too large" in result.output
    size = await stack.client.execute(tid, "terminal", {"command": "stat -c %s big"})
    assert int(size.output) <= 1024 * 1024
    await _still_serving(stack.client, tid)


async def test_the_private_tmp_is_bounded(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(worker_options={"limits": TIGHT})
    tid = trajectory()
    result = await stack.client.execute(
        tid, "terminal", {"command": "for i in 1 2 3; do head -c 900000 /dev/zero > /tmp/$i; done"}
    )
    assert not result.success
    assert "No space left on device" in result.output
    await _still_serving(stack.client, tid)


async def test_memory_and_cpu_limits_apply_to_each_process(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(worker_options={"limits": TIGHT})
    tid = trajectory()
    memory = await stack.client.execute(
        tid, "terminal", {"command": "python3 -c 'x = bytearray(512 * 1024 * 1024)'"}
    )
    assert not memory.success
    assert "MemoryError" in memory.output
    spin = await stack.client.execute(
        tid, "terminal", {"command": "while :; do :; done"}, timeout_s=20
    )
    assert not spin.success
    assert spin.metadata["status"] == "exit"  # SIGXCPU after 1 CPU second, not the timeout
    assert spin.metadata["exit_code"] == -24
    assert spin.metadata["signal"] == "SIGXCPU"
    assert spin.error == "Exit code: -24 (killed by SIGXCPU: CPU time limit)"
    assert spin.metadata["duration_s"] < 10
    await _still_serving(stack.client, tid)


async def test_a_disk_filling_loop_is_stopped(
    make_stack: StackFactory, trajectory: Callable[[], str], tmp_path: Path
) -> None:
    stat = os.statvfs(tmp_path)
    free_mb = stat.f_bavail * stat.f_frsize // (1024 * 1024)
    # Leave this loop 200 MiB of room before the guard's floor, wherever the tests run.
    stack = await make_stack(worker_options={"min_free_disk_mb": max(free_mb - 200, 0)})
    tid = trajectory()
    fill = "for i in $(seq 1 2000); do head -c 1000000 /dev/zero > f$i; done; echo finished"
    result = await stack.client.execute(tid, "terminal", {"command": fill}, timeout_s=120)
    assert not result.success
    assert result.metadata["status"] == "disk_full"
    assert result.metadata["error_kind"] == "disk_limit"
    assert "finished" not in result.output
    await stack.client.release(tid, reset_workspace=True)  # gives the space back
    await _still_serving(stack.client, trajectory())

    # The same loop in the persistent shell: the shell is stopped and replaced.
    tid = trajectory()
    result = await stack.client.execute(tid, "terminal_stateful", {"command": fill}, timeout_s=120)
    assert not result.success
    assert result.metadata["status"] == "disk_full"
    assert result.metadata["shell_restarted"] is True
    assert "stopped with its shell" in (result.error or "")
    await stack.client.release(tid, reset_workspace=True)
    await _still_serving(stack.client, trajectory())


async def test_a_sandbox_starts_and_runs_when_the_worker_holds_over_1024_fds(
    tmp_path: Path,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.fail(f"RLIMIT_NOFILE's hard limit is {hard}: this test needs 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        async with bwrap_sandbox(tmp_path / "ws") as sandbox:
            outcome = await sh(sandbox, "echo fine")
            assert outcome.exit_code == 0, outcome
            assert outcome.stdout.text == "fine\n"
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _command_of(size: int) -> str:
    """``echo ok`` and a comment of two-byte characters: ``size`` bytes of UTF-8 in all."""
    head = "echo ok #"
    padding = size - len(head)
    return head + "é" * (padding // 2) + "a" * (padding % 2)


async def test_commands_up_to_the_argv_limit_run_and_longer_ones_are_refused(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    longest = _command_of(MAX_COMMAND_BYTES)
    assert len(longest.encode()) == MAX_COMMAND_BYTES
    ran = await stack.client.execute(tid, "terminal", {"command": longest})
    assert ran.success, ran.error
    assert ran.output == "ok\n"
    # Too large to run: the executor answers 413, as for a body it cannot read ...
    with pytest.raises(PayloadTooLarge) as refused_early:
        await stack.client.execute(tid, "terminal", {"command": _command_of(MAX_COMMAND_BYTES + 1)})
    assert f"{MAX_COMMAND_BYTES + 1} bytes" in refused_early.value.message
    assert f"at most {MAX_COMMAND_BYTES} bytes" in refused_early.value.message
    # ... and a worker sent one anyway refuses it as invalid arguments.
    refused = await stack.executors[0].execute(
        tid, "terminal", {"command": _command_of(MAX_COMMAND_BYTES + 1)}, timeout_s=10, uniq_id=None
    )
    assert not refused.success
    assert refused.metadata["error_kind"] == "invalid_arguments"
    assert f"{MAX_COMMAND_BYTES + 1} bytes" in refused.error
    assert f"at most {MAX_COMMAND_BYTES} bytes" in refused.error
    # The persistent shell takes its command on stdin, not argv: no such limit there.
    stateful = await stack.client.execute(
        tid, "terminal_stateful", {"command": _command_of(200_000)}
    )
    assert stateful.success, stateful.error
    assert stateful.output == "ok\n"
    await _still_serving(stack.client, tid)


async def test_a_run_message_of_megabytes_reaches_the_launcher(tmp_path: Path) -> None:
    async with bwrap_sandbox(tmp_path / "ws") as sandbox:
        # 12 arguments of 100 000 characters that JSON writes as six bytes each: 7 MB.
        argv = ["/bin/sh", "-c", 'echo "$#" "${#1}"', "x", *(["\x01" * 100_000] * 12)]
        command = await sandbox.spawn(argv)
        try:
            assert await asyncio.wait_for(command.wait(), 20) == 0
            assert await command.stdout.read() == b"12 100000\n"
        finally:
            command.close()
        assert (await sh(sandbox, "echo still")).stdout.text == "still\n"
