"""A worker stops when told, whatever it is doing, and says what it leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from schemas.subjects import WORKERS_BUCKET
from services._kv import open_bucket
from services.executor import ExecutorService
from services.worker import SandboxWorker, WorkerConfig
from tests._processes import worker_process
from tests.conftest import StackFactory

_DRAIN_TIMEOUT_S = 10.0  # the worker's default
_SHUTDOWN_STEPS_S = 20.0  # every other step of a shutdown has a deadline of a few seconds


def _registered(executor: ExecutorService) -> Callable[[str], bool]:
    return lambda worker_id: any(
        info.worker_id == worker_id for info, _ in executor.registered_workers()
    )


async def test_sigterm_ends_a_busy_worker_within_its_drain_timeout_and_its_workspaces_are_lost(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str, tmp_path: Path
) -> None:
    stack = await make_stack(workers=0)
    executor = stack.executors[0]
    async with worker_process(
        nats_url,
        tmp_path / "data",
        f"stop-{uuid.uuid4().hex[:6]}",
        registered=_registered(executor),
    ) as stopping:
        busy, idle = trajectory(), trajectory()
        assert (
            await stack.client.execute(idle, "write_file", {"path": "f", "content": "x"})
        ).success
        assert (await stack.client.execute(busy, "terminal", {"command": "true"})).success
        running = asyncio.create_task(
            stack.client.execute(busy, "terminal", {"command": "sleep 120"}, timeout_s=300)
        )
        await asyncio.sleep(0.5)  # it runs
        # A release in progress must not hold the shutdown up either.
        releasing = asyncio.create_task(stack.client.release(idle, reset_workspace=True))
        stopping.process.terminate()
        started = time.monotonic()
        code = await asyncio.wait_for(stopping.process.wait(), _DRAIN_TIMEOUT_S + _SHUTDOWN_STEPS_S)
        took = time.monotonic() - started
        assert code == 0, code
        assert took < _DRAIN_TIMEOUT_S + _SHUTDOWN_STEPS_S
        # The running call was answered: cancelled when the drain timeout ran out.
        ended = await asyncio.wait_for(running, 30)
        assert not ended.success and ended.metadata["error_kind"] == "infra"
        await releasing
    # The worker is gone, and the trajectory hears so once; its next call gets a new slot.
    await stack.add_worker()
    lost = await stack.client.execute(busy, "terminal", {"command": "echo again"})
    assert lost.metadata.get("workspace_lost") is True, lost
    assert lost.metadata["lost_reason"] == "worker_stopped"
    fresh = await stack.client.execute(busy, "terminal", {"command": "ls -A | wc -l"})
    assert fresh.success and fresh.output.strip() == "0"


async def test_a_worker_whose_start_fails_after_its_probe_leaves_no_process(
    nc: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe has started the launcher zygote (and a sandbox, ended again); a failure after
    it (here: the JetStream buckets cannot be opened) must end what the start made, not leave
    the zygote to the process's end."""

    async def no_bucket(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no JetStream here")

    js = nc.jetstream()
    await open_bucket(js, WORKERS_BUCKET, description="toolbus sandbox workers")
    monkeypatch.setattr("services.worker.open_bucket", no_bucket)
    before = _children()
    worker_id = f"fails-{uuid.uuid4().hex[:6]}"
    config = WorkerConfig(worker_id=worker_id, slots=2, workspace_root=tmp_path)
    with pytest.raises(RuntimeError, match="no JetStream here"):
        async with SandboxWorker(nc, config):
            pass
    assert _children() == before
    # It never registered: its stop wrote nothing for it (not even a removal marker).
    with pytest.raises(NotFoundError):
        await js.get_last_msg(f"KV_{WORKERS_BUCKET}", f"$KV.{WORKERS_BUCKET}.{worker_id}")


def _children() -> list[str]:
    """This process's children, by command line (zombies included)."""
    pid = os.getpid()
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            found.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return sorted(found)
