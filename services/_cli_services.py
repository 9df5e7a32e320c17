"""The long-running commands: ``serve`` (NATS, unless joining one, then the workers and an
executor, all in this process's care until a signal), ``executor`` and ``worker``."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from contextlib import AsyncExitStack

import structlog

from backends.local import LocalWorkers
from backends.nomad import NomadConfig, NomadWorkers
from backends.scaling import LocalPool, NomadPool
from schemas.subjects import Subjects

from ._autoscaler import Autoscaler, WorkerPool
from ._cli_nats import connect, nats_url
from ._cli_settings import settings_env, worker_uid_range
from ._cli_signals import until_signalled
from ._embedded import EmbeddedNatsServer
from ._scale_policy import ScalePolicy
from .exceptions import ToolbusError
from .executor import ExecutorConfig, ExecutorService
from .settings import Settings
from .worker import SandboxWorker, WorkerConfig, new_worker_id

log = structlog.get_logger("toolbus.cli")


async def run_serve(settings: Settings, *, ready: Callable[[str], None] | None = None) -> None:
    if settings.backend == "nomad" and settings.nats_url is None:
        raise ToolbusError(
            "--backend nomad needs --nats-url: Nomad runs the workers on other hosts, which "
            "cannot reach an embedded NATS server"
        )
    if settings.autoscale and settings.backend == "external":
        raise ToolbusError(
            "--autoscale needs a backend that starts workers: --backend local or nomad"
        )
    # Exit order is the reverse: no more scaling, the executor stops accepting, then the
    # workers, then NATS.
    async with AsyncExitStack() as stack:
        if settings.nats_url is None:
            server = await stack.enter_async_context(
                EmbeddedNatsServer(
                    store_dir=settings.data_dir / "nats", host=settings.host, port=settings.port
                )
            )
            settings = settings.model_copy(update={"nats_url": server.url})
        url = nats_url(settings)
        nc = await connect(settings, "toolbus-executor")
        stack.push_async_callback(nc.drain)
        workers: LocalWorkers | NomadWorkers | None = None
        pool: WorkerPool | None = None
        if settings.backend == "local" and (settings.workers > 0 or settings.autoscale):
            workers = await stack.enter_async_context(
                LocalWorkers(
                    count=_first_local_workers(settings),
                    env=settings_env(settings),
                    env_for=lambda k: worker_uid_range(settings, k),
                )
            )
            pool = LocalPool(workers)
        elif settings.backend == "nomad":
            config = NomadConfig.from_settings(
                settings,
                settings_env(settings),
                token=settings.nomad_token,
                nats_address=settings.nomad_nats_address,
            )
            workers = await stack.enter_async_context(NomadWorkers(config))
            pool = NomadPool(workers)
        executor = await stack.enter_async_context(
            ExecutorService(nc, ExecutorConfig.from_settings(settings))
        )
        if workers is not None:
            await workers.wait_registered(lambda: executor.status().pool.containers)
        if settings.autoscale and pool is not None:  # stops first: no scaling while stopping
            await stack.enter_async_context(
                Autoscaler(
                    nc,
                    pool,
                    ScalePolicy(
                        min_workers=settings.min_workers,
                        max_workers=settings.max_workers,
                        slots_per_worker=settings.slots,
                        headroom_slots=settings.scale_headroom_slots,
                        cooldown_s=settings.scale_cooldown_s,
                    ),
                    executor=executor,
                    subjects=Subjects(prefix=settings.prefix),
                    drain_timeout_s=settings.scale_drain_timeout_s,
                )
            )
        (ready or _print_banner)(url)
        await until_signalled()
        log.info("stopping")


def _first_local_workers(settings: Settings) -> int:
    """``--workers``; within ``min_workers..max_workers`` when autoscaling."""
    if not settings.autoscale:
        return settings.workers
    return max(settings.min_workers, min(settings.workers, settings.max_workers))


def _print_banner(url: str) -> None:
    example = json.dumps(
        {
            "trajectory_id": "demo",
            "tool": {"name": "terminal", "arguments": {"command": "uname -a"}},
        }
    )
    print(
        f"toolbus is ready on {url}\n"
        f"  try:  toolbus call terminal --nats-url {url} --trajectory demo "
        "--arg command='uname -a'\n"
        f"  or, with the nats CLI:  nats --server {url} request tools.execute.terminal "
        f"{shlex.quote(example)}\n"
        "  Ctrl-C stops everything.",
        flush=True,
    )


async def run_executor(settings: Settings) -> None:
    nc = await connect(settings, "toolbus-executor")
    try:
        async with ExecutorService(nc, ExecutorConfig.from_settings(settings)):
            await until_signalled()
    finally:
        await nc.drain()


async def run_worker(settings: Settings) -> None:
    worker_id = settings.worker_id or new_worker_id()
    config = WorkerConfig.from_settings(settings, worker_id)
    nc = await connect(settings, f"toolbus-worker-{worker_id}")
    try:
        async with SandboxWorker(nc, config):
            await until_signalled()
    finally:
        await nc.drain()
