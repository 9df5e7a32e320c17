"""One trajectory, one workspace: what every executor and worker agree on, whatever fails.

Each test here failed on the code before the slot state machine and worker-written leases
(shared/issue 9): a slot handed out mid-release, a wipe that left files, an executor that
decided alone that a live worker was gone, a second "expired" for a live workspace, an orphaned
slot after a lost lease race.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from services.exceptions import NoCapacity, NotFound
from services.executor import ExecutorConfig
from tests._processes import registered_with, worker_process
from tests.conftest import StackFactory

NOBODY = 65534


# -- 2. every new trajectory starts in an empty workspace ---------------------------------------
def test_the_wipe_empties_what_the_agent_made_read_only_even_for_a_non_root_worker(
    tmp_path: Path,
) -> None:
    workspace = tmp_path / "slot_0"
    (workspace / "locked" / "deeper").mkdir(parents=True)
    (workspace / "locked" / "deeper" / "answer.txt").write_text("42")
    (workspace / "sealed").mkdir()
    (workspace / "sealed" / "note").write_text("x")
    (workspace / "escape").symlink_to("/etc")  # removed, never followed
    for path in [workspace, *workspace.rglob("*")]:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    (workspace / "locked" / "deeper").chmod(0o555)  # chmod 555 d defeats rmtree
    (workspace / "locked").chmod(0o555)
    (workspace / "sealed").chmod(0o000)
    for directory in (tmp_path, *tmp_path.parents):  # nobody walks to it
        if directory == Path(tempfile.gettempdir()):
            break
        directory.chmod(directory.stat().st_mode | 0o111)
    # The worker's own user, not root: root passes every permission check.
    code = (
        "import os, pathlib; from services._slot_cleanup import wipe_workspace; "
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY}); "
        f"wipe_workspace(pathlib.Path({str(workspace)!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert list(workspace.iterdir()) == []
    assert Path("/etc/passwd").exists()


async def test_a_slot_whose_wipe_fails_is_taken_out_of_service_not_handed_out(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=2, executor_config=ExecutorConfig(acquire_timeout_s=1))
    worker = stack.workers[0]
    first = trajectory()
    wrote = await stack.client.execute(first, "write_file", {"path": "stuck.txt", "content": "1"})
    stuck = worker.workspace_of(wrote.metadata["slot"]) / "stuck.txt"
    # An immutable file: even root cannot remove it, so the wipe fails.
    if await _chattr("+i", stuck) != 0:
        pytest.skip("chattr +i is not possible here (needs root on ext2/3/4, xfs or btrfs)")
    try:
        await stack.client.release(first, reset_workspace=True)
        await worker.wait_settled()
        assert worker.slot_states()["out_of_service"] == 1
        assert worker.slots_free == 1
        # Two new trajectories: one gets the clean slot, the other waits, then 503.
        second, third = trajectory(), trajectory()
        seen = await stack.client.execute(second, "terminal", {"command": "ls -A | wc -l"})
        assert seen.success and seen.output.strip() == "0"
        assert seen.metadata["slot"] != wrote.metadata["slot"]
        with pytest.raises(NoCapacity):
            await stack.client.execute(third, "terminal", {"command": "ls -A"})
        status = await stack.client.status()
        assert status.pool.slots_by_state["out_of_service"] == 1
    finally:
        assert await _chattr("-i", stuck) == 0


async def _chattr(flag: str, path: Path) -> int:
    process = await asyncio.create_subprocess_exec(
        "chattr", flag, str(path), stderr=asyncio.subprocess.DEVNULL
    )
    return await process.wait()


# -- 1, 10. releases and acquisitions racing from two executors ---------------------------------
async def test_racing_first_calls_and_releases_through_two_executors_leave_no_slot_behind(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(
        executors=2, workers=2, slots=6, executor_config=ExecutorConfig(acquire_timeout_s=60)
    )
    first, second = stack.executors

    async def release_soon(tid: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        with contextlib.suppress(NotFound):
            await stack.client.release(tid, reset_workspace=True)

    async def storm(tid: str, delay_s: float) -> None:
        # The same new trajectory from both executors at once, and a release racing them.
        await asyncio.gather(
            first.execute(tid, "terminal", {"command": "echo a"}, timeout_s=10, uniq_id=None),
            second.execute(tid, "terminal", {"command": "echo b"}, timeout_s=10, uniq_id=None),
            release_soon(tid, delay_s),
        )
        await release_soon(tid, 0)  # whatever the race left

    for round_ in range(4):
        await asyncio.gather(*(storm(trajectory(), i * 0.002) for i in range(12)))
        # Every slot taken in the race was given back: none is held without a lease.
        await asyncio.gather(*(worker.wait_settled() for worker in stack.workers))
        assert [worker.slots_free for worker in stack.workers] == [6, 6], round_


# -- 3. a worker that stalls is not dropped by one executor's clock -----------------------------
async def test_a_stalled_worker_keeps_its_trajectories_and_two_executors_agree_on_one_workspace(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str, tmp_path: Path
) -> None:
    stack = await make_stack(executors=2, workers=0)
    first, second = stack.executors
    async with worker_process(
        nats_url,
        tmp_path / "data",
        f"stall-{uuid.uuid4().hex[:6]}",
        registered=registered_with(first),
    ) as stalling:
        tid = trajectory()
        wrote = await first.execute(
            tid, "write_file", {"path": "mine.txt", "content": tid}, timeout_s=10, uniq_id=None
        )
        assert wrote.success and wrote.metadata["worker_id"] == stalling.worker_id
        # Both executors know the lease now.
        assert (await second.execute(tid, "read_file", {"path": "mine.txt"}, timeout_s=10,
                                     uniq_id=None)).output == tid  # fmt: skip
        # Another worker comes up, where a new slot would go.
        await stack.add_worker()
        # The worker stalls for 3 s: more than three of its heartbeats, less than its
        # registration's TTL. A call during the stall waits; nobody moves the trajectory.
        stalling.pause()
        await asyncio.sleep(2.0)
        during = asyncio.create_task(
            first.execute(tid, "terminal", {"command": "cat mine.txt"}, timeout_s=10, uniq_id=None)
        )
        await asyncio.sleep(1.0)
        stalling.resume()
        results = [await during]
        for executor in (first, second, first, second):
            results.append(
                await executor.execute(
                    tid, "terminal", {"command": "cat mine.txt"}, timeout_s=10, uniq_id=None
                )
            )
        assert [r.output for r in results] == [tid] * 5, [r.error for r in results]
        places = {(r.metadata["worker_id"], r.metadata["slot"]) for r in results}
        assert places == {(stalling.worker_id, wrote.metadata["slot"])}


# -- 4. heartbeats go on while big workspaces are wiped -----------------------------------------
async def test_heartbeats_go_on_while_an_expired_slot_with_a_big_tree_is_wiped(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=2, worker_options={"slot_idle_timeout_s": 1.0})
    big, busy = trajectory(), trajectory()
    made = await stack.client.execute(
        big,
        "terminal",
        {"command": "python3 -c \"import os\nfor d in range(300):\n os.mkdir(f'd{d}')\n"
         " for f in range(500): open(f'd{d}/{f}', 'w').close()\""},
        timeout_s=120,
    )  # fmt: skip
    assert made.success, made.error
    assert (await stack.client.execute(busy, "write_file", {"path": "f", "content": "x"})).success
    # The big slot expires now; its wipe (150,000 files) takes seconds, and the worker's
    # registration must be refreshed meanwhile, or every executor would drop it.
    for _ in range(25):
        read = await stack.client.execute(busy, "read_file", {"path": "f"})
        assert read.success and read.output == "x", read.error
        await asyncio.sleep(0.2)
    await stack.workers[0].wait_settled()
    assert stack.workers[0].slot_states()["out_of_service"] == 0  # the big wipe worked


# -- 5. "expired" is said once, and a cached lease never says it again --------------------------
async def test_after_an_expiry_another_executors_cached_lease_finds_the_live_workspace(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(
        executors=2, workers=2, slots=2, worker_options={"slot_idle_timeout_s": 1.0}
    )
    first, second = stack.executors
    tid = trajectory()
    one = await first.execute(tid, "write_file", {"path": "a", "content": "1"}, timeout_s=10,
                              uniq_id=None)  # fmt: skip
    assert (await second.execute(tid, "read_file", {"path": "a"}, timeout_s=10,
                                 uniq_id=None)).success  # fmt: skip
    old_worker = one.metadata["worker_id"]
    other = next(w.worker_id for w in stack.workers if w.worker_id != old_worker)
    await asyncio.sleep(2.5)  # the slot expires on its worker
    expired = await first.execute(tid, "read_file", {"path": "a"}, timeout_s=10, uniq_id=None)
    assert expired.metadata.get("expired") is True, expired
    # The trajectory moves to the other worker, through the first executor.
    first._registry.note_full(old_worker)
    moved = await first.execute(tid, "write_file", {"path": "b", "content": "2"}, timeout_s=10,
                                uniq_id=None)  # fmt: skip
    assert moved.success and moved.metadata["worker_id"] == other
    # The second executor still has the old lease cached: it must find the new workspace.
    again = await second.execute(tid, "read_file", {"path": "b"}, timeout_s=10, uniq_id=None)
    assert again.success and again.output == "2", again
    assert again.metadata["worker_id"] == other


async def test_status_counts_the_slots_by_state(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=3)
    await stack.client.execute(trajectory(), "terminal", {"command": "true"})
    status = await stack.client.status()
    assert status.pool.slots_by_state == {"free": 2, "acquired": 1, "out_of_service": 0}
    assert json.loads(status.model_dump_json())["pool"]["total_slots"] == 3
