"""Calls per second and latency: raw NATS request/reply next to toolbus ``read_file``.

    .venv/bin/python benchmarks/bench_requests.py [--duration 5] [--concurrency 1,100,1000]
                                                  [--workers 2] [--executor process] [--json]

Everything is started here and stopped at the end (also on Ctrl-C): an embedded nats-server,
an echo responder in a child process (the baseline), and ``toolbus serve`` in a child process
(the executor, and the sandbox workers as its children), as a user runs it; the client is in
this process. ``--executor in-process`` runs the executor in this process instead, beside the
client, which one py-spy then profiles together.

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
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nats
from _common import (
    REQUEST_TIMEOUT_S,
    SETUP_TIMEOUT_S,
    BenchError,
    Report,
    Row,
    add_timing_options,
    check_slots,
    describe,
    describe_row,
    machine_info,
    make_run_id,
    measure,
    ms,
    positive_ints,
    progress,
    release_all,
    run_and_report,
    toolbus_client,
    toolbus_serve,
)
from _cpu import cpu_delta, cpu_snapshot
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.messages import ExecuteRequest, ToolCall
from services import _loop
from services._children import child_preexec, stop_process
from services._embedded import EmbeddedNatsServer
from services.client import ToolbusClient
from services.executor import ExecutorConfig
from services.settings import Settings

SCRIPT = str(Path(__file__).resolve())
ECHO_SUBJECT = "bench.echo"
ECHO_QUEUE = "bench-echo"
READY_LINE = b"ready\n"
FILE_PATH = "bench/notes.txt"


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
        responder = await stack.enter_async_context(echo_responder_process(url))
        roles = {responder.pid: "responder"}
        nc = await nats.connect(url, name="bench-client")
        stack.push_async_callback(nc.close)
        await _wait_for_echo(nc, payload)

        async def call() -> None:
            msg = await nc.request(ECHO_SUBJECT, payload, timeout=REQUEST_TIMEOUT_S)
            if msg.data != payload:
                raise BenchError("the echo came back different")

        for level in levels:
            progress(f"baseline, {level} concurrent requesters ...")
            cpu = CpuWindow(roles, "client")
            row = await measure(
                "baseline",
                [call] * level,
                warmup_s=args.warmup,
                duration_s=args.duration,
                on_window=cpu.mark,
            )
            row.cpu_us_per_call = cpu.per_call_us(row.calls)
            progress(f"  {describe_row(row)}")
            rows.append(row)
    return rows


# -- toolbus: read_file through the whole stack -------------------------------------------------
async def toolbus_row(
    client: ToolbusClient, level: int, run_id: str, args: argparse.Namespace, cpu: CpuWindow
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
            describe(result) if isinstance(result, BaseException) else str(result.error)
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

        row = await measure(
            "toolbus",
            [reader(tid) for tid in trajectories],
            warmup_s=args.warmup,
            duration_s=args.duration,
            on_window=cpu.mark,
        )
        row.cpu_us_per_call = cpu.per_call_us(row.calls)
        return row
    finally:
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            await release_all(client, trajectories, limit=100)


async def run_toolbus(
    url: str, data_dir: Path, levels: Sequence[int], args: argparse.Namespace
) -> list[Row]:
    slots = max(math.ceil(max(levels) / args.workers), 1)
    settings = Settings(nats_url=url, slots=slots, data_dir=data_dir, log_level="warning")
    run_id = make_run_id()
    rows = []
    async with AsyncExitStack() as stack:
        if args.executor == "process":
            client, serve_pid = await stack.enter_async_context(
                toolbus_serve(url, settings, args.workers)
            )
            roles, me = {serve_pid: "executor"}, "client"
        else:
            client = await stack.enter_async_context(
                toolbus_client(url, settings, args.workers, ExecutorConfig())
            )
            roles, me = {}, "client+executor"
        for level in levels:
            progress(f"toolbus, {level} concurrent trajectories ...")
            row = await toolbus_row(client, level, run_id, args, CpuWindow(roles, me))
            progress(f"  {describe_row(row)}")
            rows.append(row)
    return rows


# -- CPU per call -------------------------------------------------------------------------------
ROLES = ("client", "client+executor", "executor", "workers", "sandboxes", "responder", "nats")
_TITLES = {"nats": "nats-server"}


class CpuWindow:
    """``mark()`` as the timed window opens and closes (``measure``'s ``on_window``); then
    ``per_call_us(calls)``: microseconds of CPU per call by role, this process as ``me``."""

    def __init__(self, roles: dict[int, str], me: str) -> None:
        self._roles = roles
        self._me = me
        self._marks: list[dict[str, Any]] = []

    def mark(self) -> None:
        self._marks.append(cpu_snapshot(self._roles))

    def per_call_us(self, calls: int) -> dict[str, float]:
        spent = cpu_delta(*self._marks[-2:]) if len(self._marks) >= 2 else None
        if spent is None or calls <= 0:
            return {}
        spent[self._me] = spent.pop("bench") + spent.pop("reaped")
        return {
            role: round(spent[role] / calls * 1e6, 1) for role in ROLES if spent.get(role, 0) > 0
        }


# -- output -------------------------------------------------------------------------------------
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
                f"{row.calls_per_s:>10,.0f} {ms(row.p50_ms):>8} {ms(row.p99_ms):>8} "
                f"{row.calls:>8,} {row.errors:>5} "
            )
        lines.append(f"{level:>11} " + "  ".join(cells))
    lines += ["", "CPU per call, µs (utime+stime from /proc over the timed window):"]
    roles = [role for role in ROLES if any(role in row.cpu_us_per_call for row in rows)]
    lines.append(
        f"{'':>11} {'system':<9}"
        + "".join(f"{_TITLES.get(role, role):>17}" for role in roles)
        + f"{'all':>10}"
    )
    for row in sorted(rows, key=lambda r: (r.concurrency, r.system)):
        cpu = "".join(
            f"{row.cpu_us_per_call[role]:>17,.0f}" if role in row.cpu_us_per_call else f"{'-':>17}"
            for role in roles
        )
        total = sum(row.cpu_us_per_call.values())
        lines.append(f"{row.concurrency:>11} {row.system:<9}{cpu}{total:>10,.0f}")
    errors = [row for row in rows if row.errors]
    if errors:
        lines.append("")
        lines.extend(f"errors ({r.system}, {r.concurrency}): {r.error_kinds}" for r in errors)
    return "\n".join(line.rstrip() for line in lines)


# -- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Calls/s and latency of raw NATS request/reply and of toolbus read_file."
    )
    add_timing_options(parser)
    parser.add_argument(
        "--concurrency",
        type=positive_ints("1,100,1000"),
        default=[1, 100, 1000],
        help="concurrent requesters/trajectories per row [default: 1,100,1000]",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="sandbox worker processes [default: 2]"
    )
    parser.add_argument(
        "--only", choices=("baseline", "toolbus"), help="run one side of the table only"
    )
    parser.add_argument(
        "--executor",
        choices=("process", "in-process"),
        default="process",
        help="process: `toolbus serve` runs the executor and the workers, as a user runs it; "
        "in-process: the executor runs in this process beside the client (to profile both "
        "with one py-spy) [default: process]",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--echo-responder", metavar="URL", help=argparse.SUPPRESS)
    return parser


async def run(args: argparse.Namespace, data_dir: Path) -> Report:
    levels = sorted(set(args.concurrency))
    rows: list[Row] = []
    async with EmbeddedNatsServer(store_dir=data_dir / "nats", port=0) as server:
        if args.only != "toolbus":
            rows += await run_baseline(server.url, levels, args)
        if args.only != "baseline":
            rows += await run_toolbus(server.url, data_dir, levels, args)
    return {
        "machine": machine_info(),
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": levels,
            "workers": args.workers,
            "executor": args.executor,
            "slots_per_worker": max(math.ceil(max(levels) / args.workers), 1),
        },
        "results": [asdict(row) for row in rows],
    }


_WHERE = {"process": "in its own process (toolbus serve)", "in-process": "in the client's process"}


def table(report: Report) -> str:
    config = report["config"]
    header = (
        f"toolbus request benchmark: {config['duration_s']:g} s per row after "
        f"{config['warmup_s']:g} s warm-up; {report['machine']['cpus']} CPUs, "
        f"Python {report['machine']['python']} ({report['machine'].get('event_loop', 'asyncio')} "
        f"loop); {config['workers']} sandbox workers x "
        f"{config['slots_per_worker']} slots; executor {_WHERE[config.get('executor', '')]}"
    )
    return render_table([Row(**row) for row in report["results"]], header)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.echo_responder:
        with contextlib.suppress(KeyboardInterrupt):
            _loop.run(echo_responder(args.echo_responder))
        return 0
    if args.duration <= 0 or args.warmup < 0 or args.workers < 1:
        print("bench: --duration must be > 0, --warmup >= 0, --workers >= 1", file=sys.stderr)
        return 2
    if not check_slots(math.ceil(max(args.concurrency) / args.workers)):
        return 2
    return run_and_report(
        lambda data_dir: run(args, data_dir),
        prefix="toolbus-bench-",
        as_json=args.json,
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
