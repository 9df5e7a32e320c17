"""Capacity: live trajectories held, memory per live slot, new slots per second, first-call
latency warm and cold, and rollout churn, each beside its target.

    .venv/bin/python benchmarks/bench_capacity.py [--workers 2] [--slots 1000]
                                                  [--trajectories 2000] [--quick] [--json]
                                                  [--phases cold,capacity,churn]

Everything is started here and stopped at the end (also on Ctrl-C or SIGTERM): an embedded
nats-server, the executor in this process and ``--workers`` sandbox workers as child processes
(``LocalWorkers``, as ``toolbus serve`` starts them, each with its own range of sandbox users).
Three stacks, one after the other, on the one nats-server:

1. cold: the workers with ``warm_slots=0`` and few slots: first calls of new trajectories one
   at a time (each starts its slot's sandbox), and each one's second call (a live slot);
2. capacity: the workers with ``--slots`` and ``--warm-slots``: first calls of new trajectories
   one at a time while the pool is full (warm), and their second calls; then ``--trajectories``
   trajectories each make a first and a second ``terminal`` call (``--concurrency`` at a time)
   and stay live: how many succeed, the new slots per second of the first calls, and the
   system's memory (MemTotal - MemAvailable) before and with all of them live;
3. churn: one worker with 10 slots; 100 trajectories at once, each three calls then release;
   also the hand-off: from a release to the next waiting trajectory's lease (the executor's
   "acquire slot" span ends: tracing is on for this phase) and to its first call served.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import nats
from _common import (
    SETUP_TIMEOUT_S,
    BenchError,
    Report,
    check_slots,
    describe,
    machine_info,
    make_run_id,
    ms,
    progress,
    release_all,
    run_and_report,
)
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from backends.local import LocalWorkers
from services._embedded import EmbeddedNatsServer
from services.cli import _worker_uid_range, settings_env
from services.client import ToolbusClient
from services.executor import ExecutorConfig, ExecutorService
from services.settings import DEFAULT_WARM_SLOTS, Settings

CALL_TIMEOUT_S = 60.0
ACQUIRE_TIMEOUT_S = 120.0  # a trajectory of the churn waits for one of its 10 slots
MEMORY_TARGET_MIB = 4.0
SLOTS_PER_S_TARGET = 100.0
CHURN_TARGET_S = 3.0
HAND_OFF_TARGET_MS = 10.0
PHASES = ("cold", "capacity", "churn")
CHURN_TRAJECTORIES = 100
CHURN_SLOTS = 10
COLD_SLOTS = 16  # per worker, for the cold first calls (one at a time)
MIB = 1024 * 1024


def system_memory_used() -> int:
    """MemTotal - MemAvailable, in bytes (from /proc/meminfo)."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


@contextlib.asynccontextmanager
async def stack(
    url: str, settings: Settings, workers: int
) -> AsyncIterator[tuple[ToolbusClient, ExecutorService]]:
    """An executor in this process and ``workers`` local workers, as ``toolbus serve`` starts
    them; yields a client on its own connection once every worker is registered."""
    async with AsyncExitStack() as exits:
        executor_nc = await nats.connect(url, name="toolbus-executor")
        exits.push_async_callback(executor_nc.drain)
        client_nc = await nats.connect(url, name="bench-client")
        exits.push_async_callback(client_nc.drain)
        progress(
            f"starting {workers} sandbox workers x {settings.slots} slots "
            f"(warm_slots {settings.warm_slots}) ..."
        )
        local = await exits.enter_async_context(
            LocalWorkers(
                count=workers,
                env=settings_env(settings),
                env_for=lambda k: _worker_uid_range(settings, k),
            )
        )
        executor = await exits.enter_async_context(
            ExecutorService(executor_nc, ExecutorConfig.from_settings(settings))
        )
        await local.wait_registered(
            lambda: executor.status().pool.containers, timeout_s=SETUP_TIMEOUT_S
        )
        yield ToolbusClient(client_nc), executor


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def terminal(client: ToolbusClient, tid: str, command: str) -> float:
    """One ``terminal`` call; its latency in seconds. BenchError unless it succeeded."""
    started = time.perf_counter()
    result = await client.execute(tid, "terminal", {"command": command}, timeout_s=CALL_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if not result.success or result.output.strip() != command.removeprefix("echo "):
        raise BenchError(f"terminal failed: {result.error or result.output!r}"[:300])
    return elapsed


def median_ms(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2] * 1000, 3)


async def first_and_second_calls(
    client: ToolbusClient, prefix: str, samples: int, before_each: Callable[[], Awaitable[None]]
) -> tuple[list[float], list[float]]:
    """``samples`` new trajectories one at a time: each one's first call (it gets a slot) and
    second call (a live slot). Released at the end."""
    firsts, seconds, ids = [], [], []
    try:
        for i in range(samples):
            await before_each()
            tid = f"{prefix}-{i}"
            ids.append(tid)
            firsts.append(await terminal(client, tid, "echo first"))
            seconds.append(await terminal(client, tid, "echo second"))
    finally:
        await release_all(client, ids, limit=50)
    return firsts, seconds


async def cold_phase(url: str, data_dir: Path, args: argparse.Namespace, run_id: str) -> Report:
    settings = bench_settings(url, data_dir / "cold", slots=COLD_SLOTS, warm_slots=0)
    async with stack(url, settings, args.workers) as (client, _):
        progress(f"cold: {args.samples} new trajectories one at a time ...")

        async def nothing() -> None:
            return None

        firsts, seconds = await first_and_second_calls(
            client, f"cold-{run_id}", args.samples, nothing
        )
    return {"first_call_ms": median_ms(firsts), "live_call_ms": median_ms(seconds)}


async def capacity_phase(url: str, data_dir: Path, args: argparse.Namespace, run_id: str) -> Report:
    settings = bench_settings(
        url, data_dir / "capacity", slots=args.slots, warm_slots=args.warm_slots
    )
    report: Report = {}
    async with stack(url, settings, args.workers) as (client, executor):
        full = args.workers * min(args.warm_slots, args.slots)

        async def pool_full() -> None:
            # From heartbeats sent after the last call: status is as old as the last beat.
            since = time.time()
            await until(
                lambda: (
                    all(info.updated_at > since for info, _ in executor.registered_workers())
                    and executor.status().pool.warm_slots >= full
                ),
                "a full warm pool",
            )

        progress(f"warm: {args.samples} new trajectories one at a time, the pool full ...")
        samples = min(args.samples, full) if full else 0
        firsts, seconds = await first_and_second_calls(client, f"warm-{run_id}", samples, pool_full)
        report["warm"] = {
            "samples": samples,
            "first_call_ms": median_ms(firsts),
            "live_call_ms": median_ms(seconds),
        }
        # The slots released above are wiped; the pool is full again before the baseline.
        await until(
            lambda: executor.status().pool.available_slots == args.workers * args.slots,
            "every slot free",
        )
        if full:
            await pool_full()
        memory_before = system_memory_used()
        ids = [f"live-{run_id}-{i}" for i in range(args.trajectories)]
        gate = asyncio.Semaphore(args.concurrency)
        failures: Counter[str] = Counter()

        async def call(tid: str, command: str) -> bool:
            async with gate:
                try:
                    await terminal(client, tid, command)
                    return True
                except Exception as exc:
                    failures[describe(exc)] += 1
                    return False

        try:
            progress(f"capacity: {args.trajectories} trajectories, first calls ...")
            started = time.perf_counter()
            first_ok = await asyncio.gather(*(call(tid, "echo first") for tid in ids))
            first_s = time.perf_counter() - started
            progress(f"capacity: second calls ({sum(first_ok)} first calls succeeded) ...")
            started = time.perf_counter()
            live = [tid for tid, ok in zip(ids, first_ok, strict=True) if ok]
            second_ok = await asyncio.gather(*(call(tid, "echo second") for tid in live))
            second_s = time.perf_counter() - started
            held = sum(second_ok)
            await asyncio.sleep(1.0)  # let the kernel's accounting of the new processes settle
            memory_live = system_memory_used()
            report["capacity"] = {
                "trajectories": args.trajectories,
                "held": held,
                "acquired_slots": executor.status().pool.acquired_slots,
                "first_calls_s": round(first_s, 3),
                "second_calls_s": round(second_s, 3),
                "new_slots_per_s": round(sum(first_ok) / first_s, 1),
                "memory_before_mib": round(memory_before / MIB, 1),
                "memory_live_mib": round(memory_live / MIB, 1),
                "memory_per_slot_mib": (
                    round((memory_live - memory_before) / MIB / held, 3) if held else None
                ),
                "failures": dict(failures.most_common(5)),
            }
        finally:
            progress("capacity: releasing ...")
            await release_all(client, ids, limit=200)
    return report


async def churn_phase(url: str, data_dir: Path, run_id: str) -> Report:
    settings = bench_settings(
        url, data_dir / "churn", slots=CHURN_SLOTS, warm_slots=DEFAULT_WARM_SLOTS
    )
    # When each trajectory's executor held its lease: the end of its "acquire slot" span (the
    # executor runs in this process; tracing is on from here, for this phase only).
    acquired = _SpanEnds("acquire slot")
    provider = TracerProvider()
    provider.add_span_processor(acquired)
    trace.set_tracer_provider(provider)
    async with stack(url, settings, 1) as (client, executor):
        await until(
            lambda: executor.status().pool.warm_slots >= min(DEFAULT_WARM_SLOTS, CHURN_SLOTS),
            "a full warm pool",
        )
        progress(f"churn: {CHURN_TRAJECTORIES} trajectories through {CHURN_SLOTS} slots ...")

        releases: list[float] = []  # when each release was asked for (time.time())
        firsts: list[float] = []  # when each first call came back

        async def rollout(tid: str) -> None:
            for n in range(3):
                await terminal(client, tid, f"echo {n}")
                if n == 0:
                    firsts.append(time.time())
            releases.append(time.time())
            await client.release(tid, reset_workspace=True)

        ids = [f"churn-{run_id}-{i}" for i in range(CHURN_TRAJECTORIES)]
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(rollout(tid) for tid in ids), return_exceptions=True)
        elapsed = time.perf_counter() - started
        failed = Counter(describe(o) for o in outcomes if isinstance(o, BaseException))
    return {
        "seconds": round(elapsed, 3),
        "failed": sum(failed.values()),
        "failures": dict(failed),
        **hand_off(releases, firsts, "hand_off"),
        **hand_off(releases, acquired.ends, "slot_hand_off"),
    }


class _SpanEnds(SpanProcessor):
    """The end times (time.time()) of the spans of one name."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.ends: list[float] = []

    def on_end(self, span: ReadableSpan) -> None:
        if span.name == self._name and span.end_time is not None:
            self.ends.append(span.end_time / 1e9)


def hand_off(releases: list[float], arrivals: list[float], name: str) -> Report:
    """From a slot's release to a waiting trajectory's arrival, in ms: the k-th release asked
    for, paired with the k-th arrival of a trajectory that waited (the first ``CHURN_SLOTS``
    found a slot free; the others wait in one queue, so each release serves the next one).
    Median and 90th percentile. Arrivals are first calls served (which includes ending the
    sandbox, the wipe or a spare, the offer to the waiter and a sandbox start), or leases
    held (the queue's part alone)."""
    releases, arrivals = sorted(releases), sorted(arrivals)[CHURN_SLOTS:]
    gaps = sorted(a - r for r, a in zip(releases, arrivals, strict=False))
    if not gaps:
        return {f"{name}_ms": None, f"{name}_p90_ms": None, f"{name}s": 0}
    return {
        f"{name}_ms": round(gaps[len(gaps) // 2] * 1000, 1),
        f"{name}_p90_ms": round(gaps[int(len(gaps) * 0.9)] * 1000, 1),
        f"{name}s": len(gaps),
    }


def bench_settings(url: str, data_dir: Path, *, slots: int, warm_slots: int) -> Settings:
    return Settings(
        nats_url=url,
        slots=slots,
        warm_slots=warm_slots,
        data_dir=data_dir,
        require_sandbox=True,
        acquire_timeout_s=ACQUIRE_TIMEOUT_S,
        log_level="warning",
    )


# -- output -------------------------------------------------------------------------------------
def table(report: Report) -> str:
    config, machine = report["config"], report["machine"]
    cold, warm = report.get("cold"), report.get("warm")
    capacity, churn = report.get("capacity"), report.get("churn")
    live_target = config["workers"] * config["slots"]
    rows: list[tuple[str, str, str]] = []
    if capacity is not None:
        rows += [
            (
                "live trajectories held",
                f"{capacity['held']:,} of {capacity['trajectories']:,}",
                f"{live_target:,} ({config['workers']} workers x {config['slots']} slots), "
                "all succeed",
            ),
            (
                "memory per live slot",
                f"{_num(capacity['memory_per_slot_mib'])} MiB",
                f"<= {MEMORY_TARGET_MIB:g} MiB",
            ),
            (
                "new slots per second",
                f"{capacity['new_slots_per_s']:,.0f}/s",
                f">= {SLOTS_PER_S_TARGET:g}/s sustained",
            ),
        ]
    if warm is not None:
        rows.append(
            (
                "first call, warm slot",
                f"{ms(warm['first_call_ms'])} ms",
                f"~ a call in a live slot: {ms(warm['live_call_ms'])} ms",
            )
        )
    if cold is not None:
        rows.append(
            (
                "first call, cold slot",
                f"{ms(cold['first_call_ms'])} ms",
                f"(for comparison; live slot: {ms(cold['live_call_ms'])} ms)",
            )
        )
    if churn is not None:
        rows += [
            (
                "churn",
                f"{churn['seconds']:.2f} s",
                f"<= {CHURN_TARGET_S:g} s ({CHURN_TRAJECTORIES} trajectories, {CHURN_SLOTS} "
                "slots, 3 calls each, then release)",
            ),
            (
                "slot to the next waiter",
                f"{ms(churn['slot_hand_off_ms'])} ms",
                f"~ {HAND_OFF_TARGET_MS:g} ms (release to the waiter's lease; p90 "
                f"{ms(churn['slot_hand_off_p90_ms'])} ms)",
            ),
            (
                "its first call served",
                f"{ms(churn['hand_off_ms'])} ms",
                f"(release to the waiter's first call; p90 {ms(churn['hand_off_p90_ms'])} ms)",
            ),
        ]
    header = (
        f"toolbus capacity benchmark: {machine['cpus']} CPUs, Python {machine['python']}; "
        f"{config['workers']} workers x {config['slots']} slots, warm_slots "
        f"{config['warm_slots']}; {config['trajectories']:,} trajectories, "
        f"{config['concurrency']} at a time; latencies are medians of {config['samples']} "
        "new trajectories, one at a time"
    )
    width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    lines = [header, "", f"{'':<{width}}  {'measured':>{value_width}}  target"]
    lines += [f"{n:<{width}}  {v:>{value_width}}  {t}" for n, v, t in rows]
    if capacity is not None:
        lines.append(
            f"\nmemory used (MemTotal - MemAvailable): {capacity['memory_before_mib']:,.0f} "
            f"MiB before, {capacity['memory_live_mib']:,.0f} MiB with all live; first calls "
            f"took {capacity['first_calls_s']:.1f} s, second calls "
            f"{capacity['second_calls_s']:.1f} s"
        )
    for name, phase in (("capacity", capacity), ("churn", churn)):
        if phase is not None and phase["failures"]:
            lines.append(f"failures ({name}): {phase['failures']}")
    return "\n".join(line.rstrip() for line in lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# -- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Live trajectories, memory per slot, slots/s, first-call latency, churn."
    )
    parser.add_argument("--workers", type=int, help="worker processes [default: 2]")
    parser.add_argument("--slots", type=int, help="slots per worker [default: 1000]")
    parser.add_argument(
        "--trajectories",
        type=int,
        help="live trajectories of the capacity row [default: workers x slots]",
    )
    parser.add_argument(
        "--warm-slots",
        type=int,
        default=DEFAULT_WARM_SLOTS,
        help=f"warm slots per worker [default: {DEFAULT_WARM_SLOTS}]",
    )
    parser.add_argument(
        "--concurrency", type=int, default=200, help="capacity calls in flight [default: 200]"
    )
    parser.add_argument("--samples", type=int, help="trajectories per latency figure [default: 8]")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="defaults of 2 workers x 100 slots, 200 trajectories, 4 samples (about a minute)",
    )
    parser.add_argument(
        "--phases",
        type=lambda text: [p for p in text.split(",") if p],
        default=list(PHASES),
        help=f"the phases to run, comma-separated [default: {','.join(PHASES)}]",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


async def run(args: argparse.Namespace, data_dir: Path) -> Report:
    run_id = make_run_id()
    data_dir.chmod(0o711)  # sandbox users pass through to their slots, as under /var/lib
    results: Report = {}
    async with EmbeddedNatsServer(store_dir=data_dir / "nats", port=0) as server:
        if "cold" in args.phases:
            results["cold"] = await cold_phase(server.url, data_dir, args, run_id)
        if "capacity" in args.phases:
            results.update(await capacity_phase(server.url, data_dir, args, run_id))
        if "churn" in args.phases:
            results["churn"] = await churn_phase(server.url, data_dir, run_id)
    return {
        "machine": machine_info(),
        "config": {
            "workers": args.workers,
            "slots": args.slots,
            "warm_slots": args.warm_slots,
            "trajectories": args.trajectories,
            "concurrency": args.concurrency,
            "samples": args.samples,
        },
        **results,
        "targets": {
            "live_trajectories": args.workers * args.slots,
            "memory_per_slot_mib": MEMORY_TARGET_MIB,
            "new_slots_per_s": SLOTS_PER_S_TARGET,
            "churn_s": CHURN_TARGET_S,
            "hand_off_ms": HAND_OFF_TARGET_MS,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = {"workers": 2, "slots": 100, "samples": 4} if args.quick else {}
    full = {"workers": 2, "slots": 1000, "samples": 8}
    for name, value in full.items():
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, value))
    if args.trajectories is None:
        args.trajectories = min(200, args.workers * args.slots) if args.quick else None
    args.trajectories = args.trajectories or args.workers * args.slots
    if min(args.workers, args.slots, args.trajectories, args.concurrency, args.samples) < 1:
        print("bench: every count must be at least 1", file=sys.stderr)
        return 2
    if not args.phases or set(args.phases) - set(PHASES):
        print(f"bench: --phases takes some of {','.join(PHASES)}", file=sys.stderr)
        return 2
    if args.warm_slots < 0:
        print("bench: --warm-slots must be at least 0", file=sys.stderr)
        return 2
    if args.trajectories > args.workers * args.slots:
        print("bench: more --trajectories than slots (workers x slots)", file=sys.stderr)
        return 2
    if not check_slots(args.slots):
        return 2
    return run_and_report(
        lambda data_dir: run(args, data_dir),
        prefix="toolbus-bench-capacity-",
        as_json=args.json,
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
