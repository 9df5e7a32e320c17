"""Calls per second and latency: raw NATS request/reply next to toolbus ``read_file``.

    .venv/bin/python benchmarks/bench_requests.py [--duration 5] [--concurrency 1,100,1000]
                                                  [--workers 2] [--json]

Everything is started here and stopped at the end (also on Ctrl-C): an embedded nats-server,
an echo responder in a child process (the baseline), the toolbus executor in this process and
sandbox workers as child processes, as ``toolbus serve`` runs them.

- baseline: N requesters on one connection call ``nc.request`` against a queue subscription
  that replies at once with the request's body, on its own connection in its own process.
- toolbus: N trajectories each write a small file, then call ``read_file`` on it in a loop,
  through client -> executor -> sandbox worker -> executor -> client.

Each row runs a warm-up, then counts the calls that complete within ``--duration`` seconds
(closed loop: each requester starts its next call when the previous one returns).
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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import ValidationError

from backends.local import LocalWorkers
from observability.logging import configure_logging
from schemas.messages import ExecuteRequest, ToolCall
from services._children import child_preexec, stop_process
from services._embedded import EmbeddedNatsServer
from services._validation import describe_validation_error
from services.cli import settings_env
from services.client import ToolbusClient
from services.exceptions import NotFound, ServiceError, StartupError
from services.executor import ExecutorConfig, ExecutorService
from services.settings import Settings

SCRIPT = str(Path(__file__).resolve())
ECHO_SUBJECT = "bench.echo"
ECHO_QUEUE = "bench-echo"
READY_LINE = b"ready\n"
FILE_PATH = "bench/notes.txt"
REQUEST_TIMEOUT_S = 30.0  # per call; a call slower than this counts as an error
STRAGGLER_TIMEOUT_S = 30.0  # after a row, how long calls still in flight may take to return
SETUP_TIMEOUT_S = 120.0


class BenchError(Exception):
    """The benchmark could not run as configured."""


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


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(math.ceil(q * len(sorted_values)), 1)
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ServiceError):
        return f"{type(exc).__name__}: {exc.message}"[:200]
    return f"{type(exc).__name__}: {exc}"[:200]


async def measure(
    system: str,
    calls: Sequence[Callable[[], Awaitable[None]]],
    *,
    warmup_s: float,
    duration_s: float,
) -> Row:
    """Run each call in a loop of its own; count those that complete in the timed window."""
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
                failure = _describe(exc)
            ended = time.perf_counter()
            if window[0] <= ended < window[1]:
                if failure is None:
                    latencies.append(ended - started)
                else:
                    errors[failure] += 1

    tasks = [asyncio.create_task(requester(call)) for call in calls]
    try:
        await asyncio.sleep(warmup_s)
        start = time.perf_counter()
        window[:] = [start, start + duration_s]
        await asyncio.sleep(max(window[1] - time.perf_counter(), 0.0))
        stopping.set()
        _, pending = await asyncio.wait(tasks, timeout=STRAGGLER_TIMEOUT_S)
        if pending:
            errors[f"still in flight {STRAGGLER_TIMEOUT_S:g}s after the row"] += len(pending)
    finally:
        stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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


def _describe_row(row: Row) -> str:
    text = f"{row.calls_per_s:,.0f} calls/s, p50 {_ms(row.p50_ms)} ms, p99 {_ms(row.p99_ms)} ms"
    if row.errors:
        text += f", {row.errors} errors: {row.error_kinds}"
    return text


# -- baseline: raw NATS request/reply -----------------------------------------------------------
async def echo_responder(url: str) -> None:
    """The child process of the baseline: reply to each request with its body, at once."""
    nc = await nats.connect(url, name="bench-echo-responder")

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await nc.subscribe(ECHO_SUBJECT, queue=ECHO_QUEUE, cb=echo)
    await nc.flush()
    sys.stdout.buffer.write(READY_LINE)
    sys.stdout.flush()
    await stop.wait()
    await nc.drain()


@contextlib.asynccontextmanager
async def echo_responder_process(url: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--echo-responder",
        url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=child_preexec,  # own session; SIGTERM if this process dies
    )
    try:
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), 15)
        except TimeoutError:
            line = b""
        if line != READY_LINE:
            raise BenchError("the echo responder did not start (see its output above)")
        yield process
    finally:
        await stop_process(process, timeout=5)


async def _wait_for_echo(nc: Client, payload: bytes) -> None:
    """Until the responder's subscription is visible to this connection."""
    deadline = time.monotonic() + 10
    while True:
        try:
            await nc.request(ECHO_SUBJECT, payload, timeout=1)
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise BenchError("the echo responder does not answer") from None
            await asyncio.sleep(0.05)


async def run_baseline(url: str, levels: Sequence[int], args: argparse.Namespace) -> list[Row]:
    # The body a client sends for a read_file call, so both columns move the same bytes.
    payload = (
        ExecuteRequest(
            trajectory_id="bench-000000-c1000-999",
            tool=ToolCall(name="read_file", arguments={"path": FILE_PATH}),
            timeout_s=REQUEST_TIMEOUT_S,
        )
        .model_dump_json(exclude_none=True)
        .encode()
    )
    rows = []
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(echo_responder_process(url))
        nc = await nats.connect(url, name="bench-client")
        stack.push_async_callback(nc.close)
        await _wait_for_echo(nc, payload)

        async def call() -> None:
            msg = await nc.request(ECHO_SUBJECT, payload, timeout=REQUEST_TIMEOUT_S)
            if msg.data != payload:
                raise BenchError("the echo came back different")

        for level in levels:
            progress(f"baseline, {level} concurrent requesters ...")
            row = await measure(
                "baseline", [call] * level, warmup_s=args.warmup, duration_s=args.duration
            )
            progress(f"  {_describe_row(row)}")
            rows.append(row)
    return rows


# -- toolbus: read_file through the whole stack -------------------------------------------------
async def _release_all(client: ToolbusClient, trajectories: Sequence[str]) -> None:
    limit = asyncio.Semaphore(100)
    failures: Counter[str] = Counter()

    async def release(tid: str) -> None:
        async with limit:
            try:
                await client.release(tid, reset_workspace=True)
            except NotFound:
                pass  # never got a slot
            except Exception as exc:
                failures[_describe(exc)] += 1

    await asyncio.gather(*(release(tid) for tid in trajectories))
    if failures:
        progress(f"  release failed for some trajectories: {dict(failures)}")


async def toolbus_row(
    client: ToolbusClient, level: int, run_id: str, args: argparse.Namespace
) -> Row:
    trajectories = [f"bench-{run_id}-c{level}-{i}" for i in range(level)]
    contents = {tid: f"toolbus benchmark file of trajectory {tid}\n" for tid in trajectories}
    try:
        # Setup, not timed: each trajectory gets its slot and writes its own file.
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            wrote = await asyncio.gather(
                *(
                    client.execute(
                        tid,
                        "write_file",
                        {"path": FILE_PATH, "content": contents[tid]},
                        timeout_s=REQUEST_TIMEOUT_S,
                    )
                    for tid in trajectories
                ),
                return_exceptions=True,
            )
        failed = Counter(
            _describe(result) if isinstance(result, BaseException) else str(result.error)
            for result in wrote
            if isinstance(result, BaseException) or not result.success
        )
        if failed:
            raise BenchError(f"write_file failed for {sum(failed.values())} trajectories: {failed}")

        def reader(tid: str) -> Callable[[], Awaitable[None]]:
            expected = contents[tid]

            async def call() -> None:
                result = await client.execute(
                    tid, "read_file", {"path": FILE_PATH}, timeout_s=REQUEST_TIMEOUT_S
                )
                if not result.success:
                    raise BenchError(f"read_file failed: {result.error}")
                if result.output != expected:
                    raise BenchError("read_file returned another trajectory's content")

            return call

        return await measure(
            "toolbus",
            [reader(tid) for tid in trajectories],
            warmup_s=args.warmup,
            duration_s=args.duration,
        )
    finally:
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            await _release_all(client, trajectories)


async def run_toolbus(
    url: str, data_dir: Path, levels: Sequence[int], args: argparse.Namespace
) -> list[Row]:
    slots = max(math.ceil(max(levels) / args.workers), 1)
    settings = Settings(nats_url=url, slots=slots, data_dir=data_dir, log_level="warning")
    run_id = f"{os.getpid()}{int(time.time()) % 100_000}"
    rows = []
    async with AsyncExitStack() as stack:
        executor_nc = await nats.connect(url, name="toolbus-executor")
        stack.push_async_callback(executor_nc.drain)
        client_nc = await nats.connect(url, name="bench-client")
        stack.push_async_callback(client_nc.drain)
        progress(f"starting {args.workers} sandbox workers x {slots} slots ...")
        workers = await stack.enter_async_context(
            LocalWorkers(count=args.workers, env=settings_env(settings))
        )
        executor = await stack.enter_async_context(ExecutorService(executor_nc, ExecutorConfig()))
        await workers.wait_registered(lambda: executor.status().pool.containers)
        client = ToolbusClient(client_nc)
        for level in levels:
            progress(f"toolbus, {level} concurrent trajectories ...")
            row = await toolbus_row(client, level, run_id, args)
            progress(f"  {_describe_row(row)}")
            rows.append(row)
    return rows


# -- output -------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def render_table(rows: Sequence[Row], header: str) -> str:
    by_key = {(row.system, row.concurrency): row for row in rows}
    levels = sorted({row.concurrency for row in rows})
    systems = [s for s in ("baseline", "toolbus") if any(r.system == s for r in rows)]
    titles = {"baseline": "baseline: nats-py request/reply", "toolbus": "toolbus: read_file"}
    cell_w = 44
    cols = f"{'calls/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'calls':>8} {'err':>5} "
    lines = [header, ""]
    lines.append(f"{'':>11} " + "  ".join(f"{titles[s]:<{cell_w}}" for s in systems))
    lines.append(f"{'concurrency':>11} " + "  ".join(cols for _ in systems))
    for level in levels:
        cells = []
        for system in systems:
            row = by_key.get((system, level))
            if row is None:
                cells.append(f"{'-':>10} {'-':>8} {'-':>8} {'-':>8} {'-':>5} ")
                continue
            cells.append(
                f"{row.calls_per_s:>10,.0f} {_ms(row.p50_ms):>8} {_ms(row.p99_ms):>8} "
                f"{row.calls:>8,} {row.errors:>5} "
            )
        lines.append(f"{level:>11} " + "  ".join(cells))
    errors = [row for row in rows if row.errors]
    if errors:
        lines.append("")
        lines.extend(f"errors ({r.system}, {r.concurrency}): {r.error_kinds}" for r in errors)
    return "\n".join(line.rstrip() for line in lines)


# -- entry point --------------------------------------------------------------------------------
def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,100,1000, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be at least 1")
    return levels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Calls/s and latency of raw NATS request/reply and of toolbus read_file."
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="timed seconds per row [default: 5]"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="warm-up seconds before each row [default: 1]"
    )
    parser.add_argument(
        "--concurrency",
        type=_levels,
        default=[1, 100, 1000],
        help="concurrent requesters/trajectories per row [default: 1,100,1000]",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="sandbox worker processes [default: 2]"
    )
    parser.add_argument(
        "--only", choices=("baseline", "toolbus"), help="run one side of the table only"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--echo-responder", metavar="URL", help=argparse.SUPPRESS)
    return parser


async def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    # SIGTERM stops the run like Ctrl-C does: the exit stacks stop every child process.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    levels = sorted(set(args.concurrency))
    rows: list[Row] = []
    async with EmbeddedNatsServer(store_dir=data_dir / "nats", port=0) as server:
        if args.only != "toolbus":
            rows += await run_baseline(server.url, levels, args)
        if args.only != "baseline":
            rows += await run_toolbus(server.url, data_dir, levels, args)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": levels,
            "workers": args.workers,
            "slots_per_worker": max(math.ceil(max(levels) / args.workers), 1),
        },
        "results": [asdict(row) for row in rows],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.echo_responder:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(echo_responder(args.echo_responder))
        return 0
    if args.duration <= 0 or args.warmup < 0 or args.workers < 1:
        print("bench: --duration must be > 0, --warmup >= 0, --workers >= 1", file=sys.stderr)
        return 2
    slots = math.ceil(max(args.concurrency) / args.workers)
    try:
        Settings(slots=slots)
    except ValidationError as exc:
        print(f"bench: {slots} slots per worker: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    configure_logging(level="warning", fmt="json")
    data_dir = Path(tempfile.mkdtemp(prefix="toolbus-bench-"))
    try:
        report = asyncio.run(run(args, data_dir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; child processes stopped", file=sys.stderr)
        return 130
    except (BenchError, StartupError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        config = report["config"]
        header = (
            f"toolbus request benchmark: {config['duration_s']:g} s per row after "
            f"{config['warmup_s']:g} s warm-up; {report['machine']['cpus']} CPUs, "
            f"Python {report['machine']['python']}; {config['workers']} sandbox workers x "
            f"{config['slots_per_worker']} slots"
        )
        print(render_table([Row(**row) for row in report["results"]], header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
