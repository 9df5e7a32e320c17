"""Fixtures: one real nats-server per test session, and in-process toolbus stacks on it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from observability.logging import configure_logging
from schemas.subjects import Subjects
from services._cli_nats import SERVICE_RECONNECT
from services.client import ToolbusClient
from services.executor import ExecutorConfig, ExecutorService
from services.worker import SandboxWorker, WorkerConfig

from ._nats_server import nats_server
from ._node import node_client

__all__ = ["node_client"]  # a fixture: Node.js with the nats.js test client's dependencies


def pytest_configure(config: pytest.Config) -> None:
    # Sandbox users of a root worker walk through the test's tmp directories. pytest takes
    # group and other rights off the shared /tmp/pytest-of-<user> whenever a session starts,
    # so another pytest run on the machine would lock them out half-way: use a root of our own.
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="toolbus-pytest-")
        config.stash[_OWN_BASETEMP] = config.option.basetemp


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_BASETEMP, None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)


_OWN_BASETEMP = pytest.StashKey[str]()


if sys.version_info < (3, 11, 8):
    # CPython gh-106905: an ast.parse inside another one (a finalizer's, run by a collection
    # of a failed test's garbage, formatting a traceback) breaks the outer one's depth count.
    # pytest parses the test's source for the failure report, gets a SystemError, and the whole
    # run ends in an INTERNALERROR that hides every failure. No collection while a report is made.
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport() -> Iterator[None]:
        collecting = gc.isenabled()
        gc.disable()
        try:
            return (yield)
        finally:
            if collecting:
                gc.enable()


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    configure_logging(level="debug", fmt="json")


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture(autouse=True)
async def _no_executor_left_behind(
    request: pytest.FixtureRequest, nats_url: str
) -> AsyncIterator[None]:
    """After each test (and its stacks' teardown): no executor still serves on the session's
    nats-server. One left behind takes a share of every later test's calls in the queue group,
    so this test fails and the in-process ones it left are stopped: later tests run clean."""
    yield
    subject = Subjects().list_tools
    connection = await nats.connect(nats_url, name="toolbus-tests-leak-check")
    try:
        await connection.request(subject, b"", timeout=5)
    except NoRespondersError:
        return
    except NatsTimeoutError:
        problem = f"an executor still takes {subject} after this test, and answers nothing"
    else:
        problem = f"an executor still answers {subject} after this test"
    finally:
        await connection.close()
    stopped = await _stop_executors_left_serving()
    pytest.fail(f"{problem} ({stopped} in-process ones stopped now)")


async def _stop_executors_left_serving() -> int:
    """The in-process executors a test entered and never exited (a failure half-way)."""
    left = [
        found for found in gc.get_objects() if isinstance(found, ExecutorService) and found.serving
    ]
    for executor in left:
        with contextlib.suppress(Exception):
            await executor.__aexit__(None, None, None)
    return len(left)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    connection = await nats.connect(nats_url, name="toolbus-tests")
    yield connection
    await connection.drain()


@pytest.fixture
def trajectory() -> Callable[[], str]:
    """Fresh trajectory ids, unique across the session (buckets are shared)."""
    return lambda: f"traj-{uuid.uuid4().hex[:12]}"


@dataclass
class Stack:
    client: ToolbusClient
    add_worker: Callable[[], Awaitable[SandboxWorker]]  # one more, with the stack's options
    executors: list[ExecutorService] = field(default_factory=list)
    workers: list[SandboxWorker] = field(default_factory=list)
    connections: list[Client] = field(default_factory=list)


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(nats_url: str, tmp_path: Path) -> AsyncIterator[StackFactory]:
    """Build executors and workers in this process, each on its own NATS connection."""
    # Sandboxes of a root worker run as other users: they must be able to pass through here.
    for directory in (tmp_path, *tmp_path.parents):
        if directory == Path(tempfile.gettempdir()):
            break
        directory.chmod(directory.stat().st_mode | 0o111)
    async with AsyncExitStack() as exit_stack:

        async def connect(name: str) -> Client:
            connection = await nats.connect(nats_url, name=name, **SERVICE_RECONNECT)
            exit_stack.push_async_callback(connection.drain)
            return connection

        async def factory(
            *,
            executors: int = 1,
            workers: int = 1,
            slots: int = 4,
            executor_config: ExecutorConfig | None = None,
            worker_options: dict[str, Any] | None = None,
            client_options: dict[str, Any] | None = None,
            executor_options: dict[str, Any] | None = None,
        ) -> Stack:

            async def add_worker() -> SandboxWorker:
                worker_id = f"test-{uuid.uuid4().hex[:8]}"
                config = WorkerConfig(
                    worker_id=worker_id,
                    slots=slots,
                    workspace_root=tmp_path / worker_id,
                    # The disk guard has its own test; others must not depend on free space.
                    **{
                        "heartbeat_s": 0.5,
                        "min_free_disk_mb": 0,
                        "spare_slots": 0,
                        **(worker_options or {}),
                    },
                )
                connection = await connect(worker_id)
                worker = SandboxWorker(connection, config)
                stack.workers.append(await exit_stack.enter_async_context(worker))
                return worker

            client = ToolbusClient(await connect("client"), **(client_options or {}))
            stack = Stack(client=client, add_worker=add_worker)
            for _ in range(workers):
                await add_worker()
            for index in range(executors):
                connection = await connect(f"executor-{index}")
                executor = ExecutorService(
                    connection, executor_config or ExecutorConfig(), **(executor_options or {})
                )
                stack.executors.append(await exit_stack.enter_async_context(executor))
            return stack

        yield factory


def _dump_asyncio_tasks(signum: int, frame: object) -> None:
    """SIGUSR1: every asyncio task's stack to /tmp/toolbus-tasks-<pid>.txt (a hung test's)."""
    loop = asyncio._get_running_loop()
    if loop is None:
        with open(f"/tmp/toolbus-tasks-{os.getpid()}.txt", "a") as out:
            print("no running loop", file=out)
        return
    _write_tasks(loop, "SIGUSR1")


def _write_tasks(loop: asyncio.AbstractEventLoop, why: str) -> None:
    path = f"/tmp/toolbus-tasks-{os.getpid()}.txt"
    with open(path, "a") as out:
        print(f"=== {why}", file=out)
        for task in asyncio.all_tasks(loop):
            print(f"--- {task!r}", file=out)
            task.print_stack(file=out)
    # Past pytest's capture: a CI log shows where to look.
    print(f"\nasyncio tasks of {why} written to {path}", file=sys.__stderr__, flush=True)


# Shortly before pytest-timeout fails a hung test (and leaves its tasks running in the session's
# loop), the stacks of every task are written down: what the hung call waits for.
_DUMP_BEFORE_TIMEOUT_S = 30.0


@pytest.fixture(autouse=True)
async def _tasks_written_down_before_the_timeout(
    request: pytest.FixtureRequest,
) -> AsyncIterator[None]:
    timeout = request.config.getoption("timeout", None) or request.config.getini("timeout")
    after_s = float(timeout or 0) - _DUMP_BEFORE_TIMEOUT_S
    if after_s <= 0:
        yield
        return
    loop = asyncio.get_running_loop()
    timer = loop.call_later(after_s, _write_tasks, loop, f"{request.node.nodeid} (hung?)")
    yield
    timer.cancel()


signal.signal(signal.SIGUSR1, _dump_asyncio_tasks)
