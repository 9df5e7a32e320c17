"""A worker killed mid-load is known to be gone within seconds, and each of its trajectories hears
so once (issue 11, item 2).

Failed before: its trajectories were told after 0.35 s, 10 s (a batch it never acknowledged)
or the call's timeout plus 10 s (calls it had acknowledged), and those last without
``workspace_lost``, so the trajectory's next call failed a second time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services._cgroups import PidsCgroups
from services._sandbox import SandboxFactory
from services._sandbox_contract import SandboxLimits
from services._zygote import LauncherZygote
from services.executor import ExecutorService
from services.settings import DEFAULT_HEARTBEAT_S
from tests._processes import registered_with, worker_process
from tests._waits import until
from tests.conftest import StackFactory

# A worker at the default heartbeat (1 s) has a registration that lives 4 s without a beat (the
# least TTL): that, the server's expiry of it and one ping that nobody answers bound how soon a
# death is known (issue 11: within 5 s).
_KNOWN_WITHIN_S = 5.0


async def test_a_killed_workers_trajectories_each_hear_workspace_lost_once_and_move_on(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str, tmp_path: Path
) -> None:
    stack = await make_stack(executors=1, workers=0)
    client, executor = stack.client, stack.executors[0]
    doomed_id = f"doomed-{uuid.uuid4().hex[:6]}"
    async with worker_process(
        nats_url,
        tmp_path / "data",
        doomed_id,
        registered=registered_with(executor),
        slots=2,
        heartbeat_s=DEFAULT_HEARTBEAT_S,
    ) as doomed:
        running, idle = trajectory(), trajectory()
        for tid in (running, idle):
            opened = await client.execute(tid, "terminal", {"command": "echo mine > f"})
            assert opened.success and opened.metadata["worker_id"] == doomed_id, opened.error
        # One call runs (acknowledged, 60 s of timeout), one waits behind it in its slot.
        long_call = asyncio.create_task(
            client.execute(running, "terminal", {"command": "sleep 50"}, timeout_s=60)
        )
        behind = asyncio.create_task(
            client.execute(running, "terminal", {"command": "true"}, timeout_s=60)
        )
        await asyncio.sleep(1.0)
        await stack.add_worker()  # where the trajectories go next
        os.kill(doomed.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await doomed.process.wait()

        heard = await asyncio.wait_for(asyncio.gather(long_call, behind), 30)
        told_after_s = time.monotonic() - killed_at
        for result in heard:
            assert not result.success
            assert result.metadata["error_kind"] == "infra"
            assert result.metadata["workspace_lost"] is True, result
        assert told_after_s < _KNOWN_WITHIN_S, told_after_s

        # The idle trajectory hears it at its next call, once; then it has a new workspace.
        lost = await client.execute(idle, "terminal", {"command": "cat f"})
        assert not lost.success and lost.metadata["workspace_lost"] is True, lost
        for tid in (idle, running):
            fresh = await client.execute(tid, "terminal", {"command": "ls"})
            assert fresh.success, fresh.error
            assert fresh.metadata["worker_id"] != doomed_id
            assert fresh.output == ""  # a new, empty workspace


async def test_a_worker_stalled_past_its_ttl_is_gone_and_comes_back_empty(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str, tmp_path: Path
) -> None:
    # The server expires its registration while it is stopped; an executor settles that (the
    # worker is gone) before the worker can write it back, so the worker, once it runs again,
    # gives its slots up and registers anew: nobody is served from a workspace said lost.
    stack = await make_stack(executors=1, workers=0)
    client, executor = stack.client, stack.executors[0]
    stalled_id = f"stalled-{uuid.uuid4().hex[:6]}"
    async with worker_process(
        nats_url, tmp_path / "data", stalled_id, registered=registered_with(executor), slots=2
    ) as stalled:
        tid = trajectory()
        opened = await client.execute(tid, "terminal", {"command": "echo mine > f"})
        assert opened.success and opened.metadata["worker_id"] == stalled_id, opened.error
        incarnation = _incarnation(executor, stalled_id)
        stalled.pause()
        # Its registration (TTL 4 s) expires and is settled: the worker is gone.
        await until(lambda: _incarnation(executor, stalled_id) != incarnation, 20)
        stalled.resume()
        lost = await client.execute(tid, "terminal", {"command": "cat f"})
        assert not lost.success and lost.metadata["workspace_lost"] is True, lost
        fresh = await client.execute(tid, "terminal", {"command": "ls"})
        assert fresh.success and fresh.output == "", fresh  # a new workspace, on it again
        assert _incarnation(executor, stalled_id) not in (None, incarnation)


def _incarnation(executor: ExecutorService, worker_id: str) -> str | None:
    for info, _ in executor.registered_workers():
        if info.worker_id == worker_id:
            return info.incarnation
    return None


async def test_the_next_worker_on_the_host_cleans_up_what_a_killed_one_left(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str, tmp_path: Path
) -> None:
    stack = await make_stack(executors=1, workers=0)
    client, executor = stack.client, stack.executors[0]
    data_dir = tmp_path / "data"
    dead_id, next_id = f"dead-{uuid.uuid4().hex[:6]}", f"next-{uuid.uuid4().hex[:6]}"
    dead_root = data_dir / "workers" / dead_id
    async with worker_process(
        nats_url, data_dir, dead_id, registered=registered_with(executor), slots=2
    ) as dead:
        wrote = await client.execute(
            trajectory(), "terminal", {"command": "echo x > f; sleep 60 &"}
        )
        assert wrote.success and wrote.metadata["worker_id"] == dead_id, wrote.error
        cgroup = _worker_cgroup(dead.process.pid, dead_id)
        os.kill(dead.process.pid, signal.SIGKILL)
        await dead.process.wait()
    assert (dead_root / "slot_0").exists() or (dead_root / "slot_1").exists()
    async with worker_process(nats_url, data_dir, next_id, registered=registered_with(executor)):
        await until(lambda: not dead_root.exists(), 20)
        assert (data_dir / "workers" / next_id / "slot_0").is_dir()  # its own are untouched
        if cgroup is not None:  # where the worker has pids cgroups of its own
            await until(lambda: not cgroup.exists(), 20)


def _worker_cgroup(pid: int, worker_id: str) -> Path | None:
    """The pids cgroup tree a worker made for its slots, if it made one."""
    v1 = Path("/sys/fs/cgroup/pids/toolbus") / worker_id
    if v1.is_dir():
        return v1
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            own = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            for candidate in (own / f"toolbus-{worker_id}", own.parent / f"toolbus-{worker_id}"):
                if candidate.is_dir():
                    return candidate
    return None


def _members(cgroup: Path) -> set[int]:
    """Pids in the slot cgroups of a worker's cgroup tree."""
    pids: set[int] = set()
    for procs in cgroup.glob("slot_*/cgroup.procs"):
        pids.update(int(pid) for pid in procs.read_text().split())
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_a_worker_started_again_with_its_id_kills_what_its_killed_process_left(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str, tmp_path: Path
) -> None:
    # A worker's sandboxes outlive it when it is killed with SIGKILL (reparented to init, in
    # the slots' cgroups): the next process of the same worker id, which takes its slots and
    # their cgroups over, ends them first.
    stack = await make_stack(executors=1, workers=0)
    client, executor = stack.client, stack.executors[0]
    data_dir, worker_id = tmp_path / "data", f"again-{uuid.uuid4().hex[:6]}"
    async with worker_process(
        nats_url, data_dir, worker_id, registered=registered_with(executor), slots=2
    ) as first:
        cgroup = _worker_cgroup(first.process.pid, worker_id)
        started = await client.execute(trajectory(), "terminal", {"command": "true"})
        assert started.success, started.error
        os.kill(first.process.pid, signal.SIGKILL)
        await first.process.wait()
    if cgroup is None:  # no pids cgroups on this host: nothing holds what is left to find it
        return
    # Whether a sandbox outlives the kill depends on how far its teardown chain got, so one
    # is left for sure: a process in the killed worker's slot cgroup, as its sandboxes are.
    leftover = await asyncio.create_subprocess_exec("sleep", "600")
    (cgroup / "slot_0" / "cgroup.procs").write_text(str(leftover.pid))
    orphans = {pid for pid in _members(cgroup) if _alive(pid)}
    assert leftover.pid in orphans
    try:
        async with worker_process(
            nats_url, data_dir, worker_id, registered=registered_with(executor)
        ):
            await until(lambda: not any(_alive(pid) for pid in orphans), 10)
        assert await leftover.wait() == -signal.SIGKILL
    finally:
        if leftover.returncode is None:
            leftover.kill()
            await leftover.wait()


async def test_the_start_probe_sandbox_runs_in_a_cgroup_of_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker killed while bubblewrap sets its probe sandbox up leaves bubblewrap's child
    # waiting for ever for its dead parent (seen after a CI run: a probe's bwrap, reparented to
    # init). Only a cgroup of the worker's holds it for the next start to kill, as a slot's.
    cgroups = PidsCgroups.create(f"probe-{uuid.uuid4().hex[:6]}").cgroups
    if cgroups is None:
        pytest.skip("no writable pids cgroup hierarchy here")
    factory = SandboxFactory(
        allow_network=False, require_sandbox=True, limits=SandboxLimits(), cgroups=cgroups
    )
    spawned_in: list[Path | None] = []
    spawn = LauncherZygote.spawn

    async def spawn_noted(self: LauncherZygote, argv: list[str], **options: Any) -> None:
        spawned_in.append(options["cgroup"])
        await spawn(self, argv, **options)

    monkeypatch.setattr(LauncherZygote, "spawn", spawn_noted)
    try:
        await factory.probe(tmp_path / ".probe")
        assert factory.sandboxed, factory.reason_unsandboxed
        assert spawned_in, "the probe started no sandbox"
        for cgroup in spawned_in:
            assert cgroup is not None and cgroup.name.startswith("slot_"), cgroup
    finally:
        await factory.close()
        await cgroups.remove()
