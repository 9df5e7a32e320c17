"""Soak: hours of rollout churn in minutes. Half the slots busy with trajectories that come and go,
a worker and an executor killed (kill -9) midway and started again; at the end, nothing of the
service may have grown.

    .venv/bin/python benchmarks/soak.py [--duration 1200] [--slots 16] [--trajectories N] [--json]

Everything is started here and stopped at the end (also on Ctrl-C or SIGTERM), each part in a
process of its own, as a deployment runs them: an embedded nats-server, two executors
(``toolbus executor``) and two sandbox workers (``toolbus worker``, ``--slots`` slots each, one
data directory). The client is this process. ``--trajectories`` (default: half the slots) loop,
each as a trajectory of an agent would: a new trajectory id; ``ls -A``, which must print
nothing (a file of an earlier trajectory would be a leak between trajectories); ``write_file``
of a random text, ``read_file`` of it (it must come back), a ``terminal`` call; release. A call
that fails to arrive (a timeout, no executor) is retried with its ``uniq_id``; one that says the
workspace is lost ends its trajectory, which starts over.

Timeline, in fractions of ``--duration``: the warm-up from 0 runs a trajectory on every slot
(every slot's sandbox, cgroup and pipes come to be, as they do whenever a worker is down and the
other takes all the load) and, at the default duration, outlasts the 5 minutes for which the
nats-server keeps the workers bucket's removal markers; at 0.30 the load pauses (every
trajectory finishes and releases, the slots settle) and the **baseline** is taken; then half the
slots' worth of trajectories; at 0.40 a worker is killed and started again with its id; at 0.65
an executor; at 0.95 the load pauses again and the **final** figures are taken, in the same
quiet state as the baseline.

Figures: RSS and open fds of each process (a restarted one against the baseline of the one it
replaced), the processes of the stack (this process's descendants and anything running as a
sandbox user of the soak's uid range: a killed worker's orphans count), the pids cgroups of the
soak's workers, and the keys of the ``toolbus-leases`` and ``toolbus-workers`` buckets. RSS is
also sampled every minute; its verdict compares the median of the 4 minutes after the baseline
(of the process the baseline saw) with that of the 4 minutes before the end, since one instant of
a garbage-collected process says little (nats-server's RSS saws by about 12%). Pass: every RSS
within +5%, every count at most its baseline, no leak and no wrong content. Exit code 1 on a
failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import BenchError, Report, describe, machine_info, progress, run_and_report
from _soak_figures import SAMPLE_EVERY_S, Series, sample_rss, snapshot, verdicts

from services._children import child_preexec, stop_process
from services._cli_settings import settings_env, worker_uid_range
from services._embedded import EmbeddedNatsServer
from services.client import ToolbusClient
from services.settings import Settings

SANDBOX_UID_BASE = 2_120_000_000  # the soak's sandbox users: apart from the tests' and serve's
CALL_TIMEOUT_S = 30.0
CALL_TRIES = 4
SETTLE_TIMEOUT_S = 120.0
SETTLE_QUIET_S = 10.0  # after the slots are all free: wipes end, warm sandboxes start


# -- the stack: one process per part --------------------------------------------------------------
class Stack:
    def __init__(self, url: str, settings: Settings) -> None:
        self._url = url
        self._settings = settings
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.restarted: set[str] = set()

    async def start(self, role: str) -> None:
        command, _, index = role.partition("-")
        env = settings_env(self._settings.model_copy(update={"nats_url": self._url}))
        if command == "worker":
            env |= worker_uid_range(self._settings, int(index))
            env["TOOLBUS_WORKER_ID"] = f"soak-{role}"
        self.processes[role] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services",
            command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=child_preexec,  # own session; SIGTERM if this process dies
        )

    async def kill_and_restart(self, role: str) -> None:
        process = self.processes[role]
        process.kill()
        await process.wait()
        progress(f"killed {role} (pid {process.pid}); starting it again")
        await self.start(role)
        self.restarted.add(role)

    async def stop(self) -> None:
        await asyncio.gather(*(stop_process(p) for p in self.processes.values()))


# -- the load -------------------------------------------------------------------------------------
@dataclass
class Tally:
    trajectories: int = 0
    calls: int = 0
    retries: int = 0
    leaks: int = 0  # a new trajectory's workspace was not empty
    wrong: int = 0  # read_file did not return what write_file wrote
    ended: Counter[str] = field(default_factory=Counter)  # trajectories cut short, by why
    samples: dict[str, str] = field(default_factory=dict)  # the first error of each why


class Load:
    """``trajectories`` loops, of which the first ``active`` run in a phase (the others wait)."""

    def __init__(self, client: ToolbusClient, trajectories: int) -> None:
        self._client = client
        self._count = trajectories
        self._running = asyncio.Event()
        self._paused = asyncio.Event()
        self._idle = 0
        self.active = trajectories
        self._tasks: list[asyncio.Task[None]] = []
        self.tally = Tally()

    def start(self) -> None:
        self._running.set()
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(self._count)]

    async def pause(self) -> None:
        """Until every trajectory has finished its current one and released it."""
        self._running.clear()
        self._paused.set()
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while self._idle < self._count:  # noqa: ASYNC110 - counted by the loops
                await asyncio.sleep(0.1)

    def resume(self, *, active: int | None = None) -> None:
        if active is not None:
            self.active = active
        self._paused.clear()
        self._running.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self, index: int) -> None:
        number = 0
        while True:
            while not (self._running.is_set() and index < self.active):
                self._idle += 1
                try:
                    await self._paused.wait()  # not in this phase: until the next pause ...
                    await self._running.wait()  # ... and the resume after it
                finally:
                    self._idle -= 1
            number += 1
            tid = f"soak-{index}-{number}-{secrets.token_hex(3)}"
            try:
                await self._trajectory(tid)
            except _Ended as ended:
                self.tally.ended[ended.why] += 1
                if ended.why not in self.tally.samples:
                    self.tally.samples[ended.why] = ended.detail
                    progress(f"a trajectory cut short ({ended.why}): {ended.detail}")
            finally:
                with contextlib.suppress(Exception):
                    await self._client.release(tid, reset_workspace=True)
            self.tally.trajectories += 1

    async def _trajectory(self, tid: str) -> None:
        listing = await self._call(tid, "terminal", {"command": "ls -A"})
        if listing.strip():
            self.tally.leaks += 1
            progress(f"LEAK: a new trajectory's workspace holds {listing.strip()[:200]!r}")
        text = secrets.token_hex(16)
        await self._call(tid, "write_file", {"path": "notes.txt", "content": text})
        if text not in await self._call(tid, "read_file", {"path": "notes.txt"}):
            self.tally.wrong += 1
        await self._call(tid, "terminal", {"command": "wc -c notes.txt && ls -la"})

    async def _call(self, tid: str, tool: str, arguments: dict[str, Any]) -> str:
        uniq_id = secrets.token_hex(8)
        for attempt in range(CALL_TRIES):
            try:
                result = await self._client.execute(
                    tid, tool, arguments, uniq_id=uniq_id, timeout_s=CALL_TIMEOUT_S
                )
            except Exception as exc:  # no answer, no executor, overloaded: the same uniq_id again
                if attempt == CALL_TRIES - 1:
                    raise _Ended(describe(exc)[:80], f"{tool}: {describe(exc)}") from None
                self.tally.retries += 1
                await asyncio.sleep(1.0 + attempt)
                continue
            self.tally.calls += 1
            if result.success:
                return result.output
            kind = "workspace_lost" if result.metadata.get("workspace_lost") else None
            why = kind or str(result.metadata.get("error_kind") or result.error)[:80]
            raise _Ended(why, f"{tool}: {result.error} {result.metadata}"[:600])
        raise AssertionError("unreachable")


class _Ended(Exception):
    def __init__(self, why: str, detail: str) -> None:
        super().__init__(why)
        self.why = why
        self.detail = detail


async def _settle(client: ToolbusClient, workers: int) -> None:
    """Until every worker is registered and no slot is held; then the clean-ups' time."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            status = await client.status()
            if status.pool.containers == workers and status.pool.acquired_slots == 0:
                await asyncio.sleep(SETTLE_QUIET_S)
                return
        await asyncio.sleep(0.5)
    raise BenchError(f"the slots did not settle within {SETTLE_TIMEOUT_S:g}s")


# -- the run --------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _running_stack(
    data_dir: Path, settings: Settings
) -> AsyncIterator[tuple[str, Stack, int, ToolbusClient]]:
    async with AsyncExitStack() as exits:
        server = await exits.enter_async_context(
            EmbeddedNatsServer(store_dir=data_dir / "nats", port=0)
        )
        stack = Stack(server.url, settings)
        exits.push_async_callback(stack.stop)
        for role in ("worker-0", "worker-1", "executor-0", "executor-1"):
            await stack.start(role)
        client = await exits.enter_async_context(
            ToolbusClient.connect(server.url, execute_margin_s=10)
        )
        await _settle(client, workers=2)
        assert server.pid is not None
        yield server.url, stack, server.pid, client


async def run(data_dir: Path, args: argparse.Namespace) -> Report:
    settings = Settings(
        slots=args.slots,
        data_dir=data_dir,
        sandbox_uid_base=SANDBOX_UID_BASE,
        min_free_disk_mb=0,
        log_level="warning",
    )
    per_worker = settings.slots + settings.spare_slots + 1  # (+ its image slots' user)
    uids = (SANDBOX_UID_BASE, SANDBOX_UID_BASE + 2 * per_worker - 1)
    trajectories = args.trajectories or args.slots  # half of the two workers' slots
    every_slot = 2 * args.slots
    duration = args.duration
    async with _running_stack(data_dir, settings) as (url, stack, nats_pid, client):
        load = Load(client, max(every_slot, trajectories))
        began = time.monotonic()

        async def until(fraction: float) -> None:
            await asyncio.sleep(max(began + fraction * duration - time.monotonic(), 0.0))

        progress(f"{trajectories} trajectories on 2 workers x {args.slots} slots, {duration:g}s")
        load.start()  # the warm-up: a trajectory on every slot
        series: Series = {}

        def pids() -> dict[str, int]:
            return {"nats-server": nats_pid, **{r: p.pid for r, p in stack.processes.items()}}

        sampling = asyncio.create_task(sample_rss(pids, began, series))
        try:
            await until(0.30)
            await load.pause()
            await _settle(client, workers=2)
            baseline = await snapshot(url, pids, uids)
            baseline_at = time.monotonic() - began
            progress(f"baseline after {time.monotonic() - began:.0f}s: {baseline}")
            load.resume(active=trajectories)
            await until(0.40)
            await stack.kill_and_restart("worker-0")
            await until(0.65)
            await stack.kill_and_restart("executor-0")
            await until(0.95)
            await load.pause()
            await _settle(client, workers=2)
            final = await snapshot(url, pids, uids)
            final_at = time.monotonic() - began
            progress(f"final after {time.monotonic() - began:.0f}s: {final}")
        finally:
            sampling.cancel()
            await load.stop()
    checks = verdicts(baseline, final, series, (baseline_at, final_at))
    checks.append(("leaks between trajectories", str(load.tally.leaks), load.tally.leaks == 0))
    checks.append(("wrong read_file contents", str(load.tally.wrong), load.tally.wrong == 0))
    return {
        "machine": machine_info(),
        "config": {
            "duration_s": duration,
            "slots_per_worker": args.slots,
            "workers": 2,
            "executors": 2,
            "trajectories": trajectories,
        },
        "restarted": sorted(stack.restarted),
        "tally": {**vars(load.tally), "ended": dict(load.tally.ended)},
        "baseline": baseline,
        "final": final,
        "rss_mib_series": series,
        "checks": [{"figure": f, "value": v, "ok": ok} for f, v, ok in checks],
        "passed": all(ok for _, _, ok in checks),
    }


def table(report: Report) -> str:
    tally, config = report["tally"], report["config"]
    lines = [
        f"soak: {config['duration_s']:g}s, {config['trajectories']} trajectories on "
        f"{config['workers']} workers x {config['slots_per_worker']} slots, "
        f"{config['executors']} executors; killed and restarted: {', '.join(report['restarted'])}",
        f"trajectories {tally['trajectories']}, calls {tally['calls']}, retries "
        f"{tally['retries']}, cut short: {tally['ended'] or 'none'}",
        *(f"  first {why}: {detail}" for why, detail in tally["samples"].items()),
        "(a restarted process is compared with the baseline of the one it replaced)",
        "quiet-state RSS, baseline -> final (MiB): "
        + ", ".join(
            f"{role} {before['rss_kib'] / 1024:.1f} -> "
            f"{(report['final']['processes'][role]['rss_kib'] or 0) / 1024:.1f}"
            for role, before in report["baseline"]["processes"].items()
            if before["rss_kib"]
        ),
        "",
        f"{'figure':32} {'baseline -> final':36} ok",
    ]
    lines += [
        f"{c['figure']:32} {c['value']:36} {'yes' if c['ok'] else 'NO'}" for c in report["checks"]
    ]
    lines.append(
        f"\nRSS in MiB every {SAMPLE_EVERY_S:g} s (the load pauses at the baseline and the end):"
    )
    for role, samples in report["rss_mib_series"].items():
        lines.append(f"{role:12} " + " ".join(f"{mib:g}" for _, _, mib in samples))
    lines.append(f"\n{'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds [default: 1200]")
    parser.add_argument("--slots", type=int, default=16, help="slots per worker [default: 16]")
    parser.add_argument("--trajectories", type=int, default=0, help="default: half the slots")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.duration < 60:
        parser.error("--duration must be at least 60 s")

    reports: list[Report] = []

    async def soak(data_dir: Path) -> Report:
        reports.append(await run(data_dir, args))
        return reports[-1]

    code = run_and_report(soak, prefix="toolbus-soak-", as_json=args.json, table=table)
    return code or (0 if reports and reports[-1]["passed"] else 1)


if __name__ == "__main__":
    sys.exit(main())
