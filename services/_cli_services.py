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

from ._cli_nats import connect, nats_url
from ._cli_settings import settings_env, worker_uid_range
from ._cli_signals import until_signalled
from ._embedded import EmbeddedNatsServer
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
    # Exit order is the reverse: executor stops accepting, then workers, then NATS.
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
        if settings.backend == "local" and settings.workers > 0:
            workers = await stack.enter_async_context(
                LocalWorkers(
                    count=settings.workers,
                    env=settings_env(settings),
                    env_for=lambda k: worker_uid_range(settings, k),
                )
            )
        elif settings.backend == "nomad":
            config = NomadConfig.from_settings(
                settings,
                settings_env(settings),
                token=settings.nomad_token,
                nats_address=settings.nomad_nats_address,
            )
            workers = await stack.enter_async_context(NomadWorkers(config))
        executor = await stack.enter_async_context(
            ExecutorService(nc, ExecutorConfig.from_settings(settings))
        )
        if workers is not None:
            await workers.wait_registered(lambda: executor.status().pool.containers)
        (ready or _print_banner)(url)
        await until_signalled()
        log.info("stopping")


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
