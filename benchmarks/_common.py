"""What the benchmark scripts share: the closed-loop measurement, rows, output helpers, the
toolbus stack, and running in a temporary directory with Ctrl-C/SIGTERM handling.

The scripts run as ``python benchmarks/bench_x.py``, so this directory is ``sys.path[0]`` and
``import _common`` finds this module from any working directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from pydantic import ValidationError

from backends.local import LocalWorkers
from observability.logging import configure_logging
from services import _loop
from services._children import child_preexec, stop_process
from services._validation import describe_validation_error
from services.cli import settings_env
from services.client import ToolbusClient
from services.exceptions import NotFound, ServiceError, StartupError
from services.executor import ExecutorConfig, ExecutorService
from services.settings import Settings

REQUEST_TIMEOUT_S = 30.0  # per call; a call slower than this counts as an error
STRAGGLER_TIMEOUT_S = 30.0  # after a row, how long calls still in flight may take to return
SETUP_TIMEOUT_S = 120.0

Report = dict[str, Any]


class BenchError(Exception):
    """The benchmark could not run as configured, or a call came back wrong."""


# -- measuring ----------------------------------------------------------------------------------
@dataclass
class Row:
    system: str
    concurrency: int
    seconds: float
    calls: int
    errors: int
    calls_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    error_kinds: dict[str, int] = field(default_factory=dict)
    cpu_us_per_call: dict[str, float] = field(default_factory=dict)  # by role, see _cpu.py


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(math.ceil(q * len(sorted_values)), 1)
    return sorted_values[min(rank, len(sorted_values)) - 1]


def describe(exc: BaseException) -> str:
    if isinstance(exc, ServiceError):
        return f"{type(exc).__name__}: {exc.message}"[:200]
    return f"{type(exc).__name__}: {exc}"[:200]


async def measure(
    system: str,
    calls: Sequence[Callable[[], Awaitable[None]]],
    *,
    warmup_s: float,
    duration_s: float,
    on_window: Callable[[], None] | None = None,
    finish_in_flight: bool = False,
) -> Row:
    """Run each call in a loop of its own; count those that complete in the timed window.

    ``on_window`` is called right before the timed window opens and right after it closes.
    When the row ends normally, the calls in flight may take ``STRAGGLER_TIMEOUT_S`` to return;
    on an exception or cancellation (Ctrl-C) they are cancelled at once, unless
    ``finish_in_flight``: then they are waited for in the same way first.
    """
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    window = [math.inf, math.inf]  # start, end (perf_counter); nothing counts before it is set
    stopping = asyncio.Event()

    async def requester(call: Callable[[], Awaitable[None]]) -> None:
        while not stopping.is_set():
            started = time.perf_counter()
            failure: str | None = None
            try:
                await call()
            except Exception as exc:
                failure = describe(exc)
            ended = time.perf_counter()
            if window[0] <= ended < window[1]:
                if failure is None:
                    latencies.append(ended - started)
                else:
                    errors[failure] += 1

    tasks = [asyncio.create_task(requester(call)) for call in calls]
    pending: set[asyncio.Task[None]] = set()
    completed = False
    try:
        await asyncio.sleep(warmup_s)
        if on_window is not None:
            on_window()
        start = time.perf_counter()
        window[:] = [start, start + duration_s]
        await asyncio.sleep(max(window[1] - time.perf_counter(), 0.0))
        if on_window is not None:
            on_window()
        completed = True
    finally:
        stopping.set()
        try:
            if completed or finish_in_flight:
                _, pending = await asyncio.wait(tasks, timeout=STRAGGLER_TIMEOUT_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    if pending:
        errors[f"still in flight {STRAGGLER_TIMEOUT_S:g}s after the row"] += len(pending)
    latencies.sort()
    p50, p99 = _percentile(latencies, 0.50), _percentile(latencies, 0.99)
    return Row(
        system=system,
        concurrency=len(calls),
        seconds=duration_s,
        calls=len(latencies),
        errors=sum(errors.values()),
        calls_per_s=round(len(latencies) / duration_s, 1),
        p50_ms=None if p50 is None else round(p50 * 1000, 3),
        p99_ms=None if p99 is None else round(p99 * 1000, 3),
        error_kinds=dict(errors.most_common(5)),
    )


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def describe_row(row: Row, *extra: str) -> str:
    """One progress line for a row; ``extra`` parts go between the latencies and the errors."""
    parts = [f"{row.calls_per_s:,.0f} calls/s", f"p50 {ms(row.p50_ms)} ms"]
    parts += [f"p99 {ms(row.p99_ms)} ms", *extra]
    if row.errors:
        parts.append(f"{row.errors} errors: {row.error_kinds}")
    return ", ".join(parts)


def make_run_id() -> str:
    return f"{os.getpid()}{int(time.time()) % 100_000}"


# -- the toolbus stack --------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def toolbus_client(
    url: str, settings: Settings, workers: int, config: ExecutorConfig
) -> AsyncIterator[ToolbusClient]:
    """The executor in this process and ``workers`` sandbox workers as child processes (as
    ``toolbus serve`` starts them), registered; yields a client on its own connection."""
    async with AsyncExitStack() as stack:
        executor_nc = await nats.connect(url, name="toolbus-executor")
        stack.push_async_callback(executor_nc.drain)
        client_nc = await nats.connect(url, name="bench-client")
        stack.push_async_callback(client_nc.drain)
        progress(f"starting {workers} sandbox workers x {settings.slots} slots ...")
        local = await stack.enter_async_context(
            LocalWorkers(count=workers, env=settings_env(settings))
        )
        executor = await stack.enter_async_context(ExecutorService(executor_nc, config))
        await local.wait_registered(lambda: executor.status().pool.containers)
        yield ToolbusClient(client_nc)


@contextlib.asynccontextmanager
async def toolbus_serve(
    url: str, settings: Settings, workers: int
) -> AsyncIterator[tuple[ToolbusClient, int]]:
    """``toolbus serve`` as a user runs it (the executor in a process of its own, ``workers``
    sandbox workers as its children), joined to the server at ``url``; yields a client on its
    own connection and the pid of ``serve`` once every worker is registered. SIGTERM stops it
    at the end."""
    env = settings_env(settings.model_copy(update={"nats_url": url, "workers": workers}))
    progress(f"starting toolbus serve: {workers} sandbox workers x {settings.slots} slots ...")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services",
        "serve",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=child_preexec,  # own session; SIGTERM if this process dies
    )
    try:
        async with ToolbusClient.connect(url) as client:
            await _wait_for_workers(client, process, workers)
            yield client, process.pid
    finally:
        await stop_process(process, timeout=STRAGGLER_TIMEOUT_S)


async def _wait_for_workers(
    client: ToolbusClient, process: asyncio.subprocess.Process, workers: int
) -> None:
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while True:
        if process.returncode is not None:
            raise BenchError(f"toolbus serve exited with {process.returncode} (see above)")
        with contextlib.suppress(ServiceError, nats.errors.Error):
            if (await client.status()).pool.containers >= workers:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"toolbus serve did not register {workers} workers in time")
        await asyncio.sleep(0.2)


async def release_all(
    client: ToolbusClient, trajectories: Sequence[str], *, limit: int | None = None
) -> None:
    """Release each trajectory (``reset_workspace=True``), at most ``limit`` at a time."""
    semaphore = asyncio.Semaphore(len(trajectories) if limit is None else limit)
    failures: Counter[str] = Counter()

    async def release(tid: str) -> None:
        async with semaphore:
            try:
                await client.release(tid, reset_workspace=True)
            except NotFound:
                pass  # never got a slot
            except Exception as exc:
                failures[describe(exc)] += 1

    await asyncio.gather(*(release(tid) for tid in trajectories))
    if failures:
        progress(f"  release failed for some trajectories: {dict(failures)}")


# -- entry point --------------------------------------------------------------------------------
def positive_ints(example: str) -> Callable[[str], list[int]]:
    """An argparse type: a comma-separated list of whole numbers of at least 1."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected e.g. {example}, got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"expected whole numbers of at least 1, e.g. {example}"
            )
        return values

    return parse


def add_timing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=float, default=5.0, help="timed seconds per row [default: 5]"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="warm-up seconds before each row [default: 1]"
    )


def check_slots(slots: int) -> bool:
    """Whether toolbus accepts this many slots per worker; says why not on stderr."""
    try:
        Settings(slots=slots)
    except ValidationError as exc:
        print(f"bench: {slots} slots per worker: {describe_validation_error(exc)}", file=sys.stderr)
        return False
    return True


def machine_info(*, fast_loop: bool = True) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "event_loop": _loop.loop_name(fast=fast_loop),
    }


async def _stop_on_sigterm(run: Awaitable[Report]) -> Report:
    # SIGTERM stops the run like Ctrl-C does: the exit stacks stop every child process.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run


def run_and_report(
    run: Callable[[Path], Coroutine[Any, Any, Report]],
    *,
    prefix: str,
    as_json: bool,
    table: Callable[[Report], str],
    fast_loop: bool = True,
) -> int:
    """Run ``run(data_dir)`` in a temporary directory removed at the end (SIGTERM stops it like
    Ctrl-C), print its report as a table or JSON, and return the exit code; on failure say on
    stderr what went wrong."""
    configure_logging(level="warning", fmt="json")
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    # Passable by others (not listable), as /var/lib/toolbus is: a root worker's sandboxes then
    # run as their slots' own users, as in a deployment, not as root.
    data_dir.chmod(0o711)
    try:
        report = _loop.run(_stop_on_sigterm(run(data_dir)), fast=fast_loop)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; child processes stopped", file=sys.stderr)
        return 130
    except (BenchError, StartupError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps(report, indent=2) if as_json else table(report))
    return 0
