"""Autoscaling (issue 11, item 6): one leader among the executors (a KV lease); workers started
for the slots held and waited for; a scale-down drains the backend's choice and stops it only
once it is drained, never a worker a trajectory still holds. The local backend with real worker
processes; the Nomad backend against the SIMULATOR in ``tests/nomad_simulator.py`` (its
allocations' workers played by in-process workers with the allocations' ids, as
``TOOLBUS_WORKER_ID=${NOMAD_ALLOC_ID}`` makes them in a container), and against a real agent
when ``NOMAD_ADDR`` is set."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from backends.local import LocalWorkers
from backends.nomad import NomadConfig, NomadWorkers
from backends.scaling import LocalPool, NomadPool
from schemas.internal import DrainState
from schemas.subjects import SCALER_BUCKET, Subjects
from services._autoscaler import Autoscaler, WorkerPool
from services._cli_services import run_serve
from services._cli_settings import worker_uid_range
from services._kv import KvBucket, open_bucket
from services._leadership import Leadership
from services._scale_policy import ScalePolicy
from services.client import ToolbusClient
from services.exceptions import ToolbusError
from services.executor import ExecutorService
from services.settings import Settings
from services.worker import SandboxWorker, WorkerConfig
from tests._waits import until
from tests.conftest import StackFactory

from .nomad_simulator import NomadSimulator

SLOTS = 2


# -- the leader ---------------------------------------------------------------------------------
async def test_one_leader_at_a_time_and_another_takes_over_when_it_goes(nc: Client) -> None:
    js = nc.jetstream()
    await open_bucket(js, SCALER_BUCKET, description="toolbus autoscaler leader lease")
    key = f"test-{uuid.uuid4().hex[:8]}"
    first, second = (
        Leadership(KvBucket(js, SCALER_BUCKET), key=key, holder=name, ttl_s=2.0)
        for name in ("first", "second")
    )
    assert await first.step() and not await second.step()
    assert await first.step() and not await second.step()  # renewed: still the one
    await first.resign()  # a stop hands over at once
    assert not first.is_leader and await second.step()
    # A leader that dies (no renewal, no resign) is replaced once its lease expired.
    assert not await first.step()
    await until(lambda: not second.is_leader, 5)  # its own clock says so first
    for _ in range(50):
        if await first.step():
            break
        await asyncio.sleep(0.1)
    assert first.is_leader
    assert not await second.step()  # the old leader finds it taken
    await first.resign()


# -- helpers ------------------------------------------------------------------------------------
def _policy(**overrides: float) -> ScalePolicy:
    options = {"min_workers": 1, "max_workers": 3, "slots_per_worker": SLOTS, "headroom_slots": 0}
    return ScalePolicy(**(options | {"cooldown_s": 1.0} | overrides))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _autoscaler(
    nc: Client, pool: WorkerPool, executor: ExecutorService
) -> AsyncIterator[Autoscaler]:
    scaler = Autoscaler(
        nc,
        pool,
        _policy(),
        executor=executor,
        subjects=Subjects(),
        drain_timeout_s=120.0,
        interval_s=0.2,
        leader_ttl_s=3.0,
    )
    async with scaler:
        await until(lambda: scaler.is_leader, 10)
        yield scaler


def _states(executor: ExecutorService) -> dict[str, DrainState]:
    return {info.worker_id: info.drain for info, _ in executor.registered_workers()}


async def _fill(client: ToolbusClient, trajectories: list[str]) -> dict[str, str]:
    """Each trajectory writes its id into a file; its worker, by trajectory."""
    results = await asyncio.gather(
        *(
            client.execute(tid, "terminal", {"command": f"echo {tid} > mine"}, timeout_s=60)
            for tid in trajectories
        )
    )
    for result in results:
        assert result.success, result
    return {tid: str(r.metadata["worker_id"]) for tid, r in zip(trajectories, results, strict=True)}


async def _still_mine(client: ToolbusClient, tid: str, worker_id: str) -> None:
    result = await client.execute(tid, "terminal", {"command": "cat mine"})
    assert result.success and result.output.strip() == tid, result
    assert result.metadata["worker_id"] == worker_id


async def _scale_up_then_down(
    client: ToolbusClient,
    executor: ExecutorService,
    trajectory: Callable[[], str],
    running: Callable[[], set[str]],
    *,
    victim: Callable[[set[str]], str] | None = None,
) -> None:
    """Three trajectories on one worker of two slots: a second worker is started. Then one
    trajectory on each: one worker is wanted, one is drained (``victim`` says which), serves
    its trajectory while it holds the slot, and is stopped once that is released."""
    assert len(running()) == 1
    placed = await _fill(client, [trajectory() for _ in range(3)])
    assert len(running()) == 2 and len(set(placed.values())) == 2, placed
    by_worker: dict[str, list[str]] = {}
    for tid, wid in placed.items():
        by_worker.setdefault(wid, []).append(tid)
    # One trajectory stays on each worker.
    for tids in by_worker.values():
        for tid in tids[1:]:
            await client.release(tid)
    await until(lambda: DrainState.DRAINING in _states(executor).values(), 20)
    [draining] = [w for w, s in _states(executor).items() if s is DrainState.DRAINING]
    if victim is not None:
        assert draining == victim(running())
    [kept] = [w for w in by_worker if w != draining]
    # Held, so not stopped: its trajectory's workspace and calls carry on.
    for _ in range(3):
        await _still_mine(client, by_worker[draining][0], draining)
        await asyncio.sleep(0.5)
    assert draining in running()
    await client.release(by_worker[draining][0])
    await until(lambda: running() == {kept}, 30)
    await until(lambda: draining not in _states(executor), 20)  # deregistered as it stopped
    await _still_mine(client, by_worker[kept][0], kept)


# -- the local backend --------------------------------------------------------------------------
async def test_local_autoscaler_starts_workers_for_waiting_trajectories_and_stops_drained_ones(
    make_stack: StackFactory,
    nc: Client,
    nats_url: str,
    tmp_path: Path,
    trajectory: Callable[[], str],
) -> None:
    stack = await make_stack(executors=1, workers=0)
    executor = stack.executors[0]
    settings = Settings(slots=SLOTS, spare_slots=0)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "TOOLBUS_NATS_URL": nats_url,
        "TOOLBUS_LOG_LEVEL": "warning",
        "TOOLBUS_SLOTS": str(SLOTS),
        "TOOLBUS_SPARE_SLOTS": "0",
        "TOOLBUS_HEARTBEAT_S": "0.5",
        "TOOLBUS_MIN_FREE_DISK_MB": "0",
        "TOOLBUS_DATA_DIR": str(tmp_path / "data"),
    }
    workers = LocalWorkers(
        count=1, env=env, env_for=lambda k: worker_uid_range(settings, k), python=sys.executable
    )
    async with workers:
        await workers.wait_registered(lambda: len(executor.registered_workers()))
        pool = LocalPool(workers, name=f"test-{uuid.uuid4().hex[:8]}")

        def running() -> set[str]:
            return set(workers.running())

        async with _autoscaler(nc, pool, executor):
            # The emptiest serving worker is drained: here both hold one, the lower id goes.
            await _scale_up_then_down(stack.client, executor, trajectory, running, victim=min)


# -- the Nomad backend, on the simulator --------------------------------------------------------
@contextlib.asynccontextmanager
async def _nomad_clients(
    nomad: NomadSimulator, job_id: str, nats_url: str, root: Path
) -> AsyncIterator[Callable[[], set[str]]]:
    """Plays Nomad's clients: a worker runs for each live allocation of the job, with the
    allocation's id as its worker id, and stops when the allocation does."""
    running: dict[str, AsyncExitStack] = {}

    async def start(alloc_id: str) -> None:
        stack = AsyncExitStack()
        connection = await nats.connect(nats_url, name=alloc_id)
        stack.push_async_callback(connection.drain)
        config = WorkerConfig(
            worker_id=alloc_id,
            slots=SLOTS,
            spare_slots=0,
            heartbeat_s=0.5,
            workspace_root=root / alloc_id,
            min_free_disk_mb=0,
        )
        await stack.enter_async_context(SandboxWorker(connection, config))
        running[alloc_id] = stack

    async def follow() -> None:
        while True:
            live = {allocation["ID"] for allocation in nomad.live(job_id)}
            for alloc_id in sorted(live - set(running)):
                await start(alloc_id)
            for alloc_id in sorted(set(running) - live):
                await running.pop(alloc_id).aclose()
            await asyncio.sleep(0.05)

    task = asyncio.create_task(follow())
    try:
        yield lambda: set(running)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for stack in running.values():
            await stack.aclose()


@contextlib.asynccontextmanager
async def _simulated_job(
    nomad: NomadSimulator, nats_url: str, root: Path
) -> AsyncIterator[tuple[str, NomadWorkers, Callable[[], set[str]]]]:
    """A workers job of 1..3 on the simulator, its allocations played by in-process workers:
    its id, its NomadWorkers, and the ids of the workers running."""
    job_id = f"toolbus-scale-{uuid.uuid4().hex[:6]}"
    config = NomadConfig(
        address=nomad.address,
        job_id=job_id,
        min_workers=1,
        max_workers=3,
        worker_env={"TOOLBUS_NATS_URL": nats_url},
    )
    async with (
        NomadWorkers(config, poll_s=0.05) as workers,
        _nomad_clients(nomad, job_id, nats_url, root / "allocs") as running,
    ):
        yield job_id, workers, running


async def test_nomad_autoscaler_scales_the_job_and_stops_the_drained_allocation_nomad_removes(
    make_stack: StackFactory,
    nc: Client,
    nats_url: str,
    tmp_path: Path,
    trajectory: Callable[[], str],
) -> None:
    stack = await make_stack(executors=1, workers=0)
    executor = stack.executors[0]
    with NomadSimulator() as nomad:
        async with _simulated_job(nomad, nats_url, tmp_path) as (job_id, workers, running):
            await workers.wait_registered(lambda: len(executor.registered_workers()))

            def highest_index(_: set[str]) -> str:
                return str(nomad.live(job_id)[-1]["ID"])

            async with _autoscaler(nc, NomadPool(workers), executor):
                await _scale_up_then_down(
                    stack.client, executor, trajectory, running, victim=highest_index
                )
            assert workers.count == 1
        scales = [r for r in nomad.writes() if r.path == f"/v1/job/{job_id}/scale"]
        assert [r.body["Count"] for r in scales] == [2, 1]
        assert scales[-1].body.get("EnforceIndex") is True  # the exact, checked scale-down


# -- a real Nomad -------------------------------------------------------------------------------
@pytest.mark.nomad
@pytest.mark.skipif(not os.environ.get("NOMAD_ADDR"), reason="needs a Nomad agent at NOMAD_ADDR")
async def test_nomad_pool_against_a_real_nomad() -> None:
    """Scale up through the pool, and read back what Nomad placed; the workers need not
    register (the image need not exist on the clients), so no drain is asked of them."""
    job_id = f"toolbus-test-{uuid.uuid4().hex[:8]}"
    config = NomadConfig(
        address=os.environ["NOMAD_ADDR"],
        token=os.environ.get("NOMAD_TOKEN"),
        namespace=os.environ.get("NOMAD_NAMESPACE"),
        job_id=job_id,
        min_workers=1,
        max_workers=2,
        worker_env={"TOOLBUS_NATS_URL": "nats://worker:x@nats.invalid:4222"},
    )
    async with NomadWorkers(config) as workers:
        pool = NomadPool(workers)
        assert pool.name == f"nomad.{job_id}" and pool.planned == 1
        await pool.start_workers(1)
        assert pool.planned == 2
        group = (await workers.job())["TaskGroups"][0]
        assert group["Count"] == 2
        allocations = await workers.allocations()
        assert await pool.worker_ids() == {a.id for a in allocations if a.live}


# -- serve --autoscale ----------------------------------------------------------------------------
async def test_serve_with_autoscale_starts_a_worker_when_trajectories_wait(
    nats_url: str, tmp_path: Path, trajectory: Callable[[], str]
) -> None:
    settings = Settings(
        nats_url=nats_url,
        autoscale=True,
        workers=1,
        min_workers=1,
        max_workers=2,
        slots=1,
        spare_slots=0,
        scale_headroom_slots=0,
        heartbeat_s=0.5,
        min_free_disk_mb=0,
        data_dir=tmp_path / "data",
        log_level="warning",
    )
    ready = asyncio.Event()
    serve = asyncio.create_task(run_serve(settings, ready=lambda url: ready.set()))
    connection = await nats.connect(nats_url)
    try:
        await asyncio.wait_for(ready.wait(), 60)
        client = ToolbusClient(connection)
        # Two trajectories, one slot: the second waits until a second worker is started.
        results = await asyncio.gather(
            *(
                client.execute(tid, "terminal", {"command": "true"}, timeout_s=60)
                for tid in (trajectory(), trajectory())
            )
        )
        assert all(r.success for r in results), results
        assert len({r.metadata["worker_id"] for r in results}) == 2
    finally:
        serve.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serve
        await connection.drain()


async def test_autoscale_needs_a_backend_that_starts_workers(nats_url: str) -> None:
    settings = Settings(nats_url=nats_url, autoscale=True, backend="external")
    with pytest.raises(ToolbusError, match="--autoscale needs a backend"):
        await run_serve(settings)


async def test_a_drained_worker_that_nomad_would_not_remove_serves_again(
    make_stack: StackFactory, nc: Client, nats_url: str, tmp_path: Path
) -> None:
    """The group changed after the drain (a third allocation came, so a lower count now removes
    that one): the drained worker is not stopped, Nomad's count is not lowered, and the worker
    serves again."""
    stack = await make_stack(executors=1, workers=0)
    executor = stack.executors[0]
    with NomadSimulator() as nomad:
        async with _simulated_job(nomad, nats_url, tmp_path) as (job_id, workers, running):
            await workers.scale(2)
            await until(lambda: len(executor.registered_workers()) == 2, 20)
            scaler = Autoscaler(
                nc,
                NomadPool(workers),
                _policy(cooldown_s=0.5),
                executor=executor,
                subjects=Subjects(),
                interval_s=3600.0,  # the rounds are this test's own
            )
            async with scaler:
                await until(lambda: scaler.is_leader, 10)
                drained = str(nomad.live(job_id)[-1]["ID"])  # what a lower count removes now
                assert not (await scaler.round()).drain_one  # fewer wanted from now ...
                await asyncio.sleep(0.6)  # ... for the cooldown
                assert (await scaler.round()).drain_one
                await until(lambda: _states(executor).get(drained) is DrainState.DRAINED, 20)

                await workers.scale(3)  # behind the autoscaler's back
                await until(lambda: len(executor.registered_workers()) == 3, 20)
                assert str(nomad.live(job_id)[-1]["ID"]) != drained
                step = await scaler.round()
                assert step.stop == [drained]
                await until(lambda: _states(executor).get(drained) is DrainState.SERVING, 20)
                assert drained in running()
            stops = [r for r in nomad.writes() if r.path.endswith(f"/{drained}/stop")]
            assert not stops  # never asked to stop it
            assert workers.count == 3
