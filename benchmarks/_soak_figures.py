"""The soak's figures (see soak.py): what each process holds, what the stack left running, and
the verdicts on a run's baseline and final figures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import nats
from _common import Report
from nats.js.errors import NoKeysError

from schemas.subjects import LEASES_BUCKET, WORKERS_BUCKET

RSS_GROWTH_LIMIT = 0.05
CGROUP_ROOT = Path("/sys/fs/cgroup/pids/toolbus")  # cgroup v1 (where the workers put slots)
SAMPLE_EVERY_S = 60.0  # RSS of every process, for the trend beside the two figures
# The RSS verdict compares medians of the samples of this long after the baseline and before the
# end, not two instants: nats-server's RSS saws up and down by about 12% with Go's collector.
RSS_WINDOW_S = 240.0


def _rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def _fds(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return None


def _stack_processes(first_uid: int, last_uid: int) -> int:
    """This process's descendants, and any process running as a soak sandbox user."""
    parents: dict[int, int] = {}
    sandboxed: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            status = Path(f"/proc/{entry}/status").read_text().splitlines()
            fields = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in status}
            parents[int(entry)] = int(fields["PPid"])
            if first_uid <= int(fields["Uid"].split()[0]) <= last_uid:
                sandboxed.add(int(entry))
    me, found = os.getpid(), set(sandboxed)
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor > 1:
            if ancestor == me:
                found.add(pid)
                break
            ancestor = parents.get(ancestor)
    return len(found)


def _cgroups() -> int:
    """The soak's workers' pids cgroups (their own and their slots')."""
    if not CGROUP_ROOT.is_dir():
        return 0
    workers = list(CGROUP_ROOT.glob("soak-worker-*"))
    return len(workers) + sum(len(list(worker.glob("slot_*"))) for worker in workers)


async def _keys(url: str, bucket: str) -> int:
    nc = await nats.connect(url, name="soak-keys")
    try:
        kv = await nc.jetstream().key_value(bucket)
        try:
            return len(await kv.keys())
        except NoKeysError:
            return 0
    finally:
        await nc.close()


async def snapshot(url: str, pids: Callable[[], dict[str, int]], uids: tuple[int, int]) -> Report:
    """Every figure now: RSS and fds by role (``pids()``), processes, cgroups, KV keys."""
    pids_now = pids()
    return {
        "processes": {
            role: {"pid": pid, "rss_kib": _rss_kib(pid), "fds": _fds(pid)}
            for role, pid in pids_now.items()
        },
        "stack_processes": _stack_processes(*uids),
        "cgroups": _cgroups(),
        "leases_keys": await _keys(url, LEASES_BUCKET),
        "workers_keys": await _keys(url, WORKERS_BUCKET),
    }


Series = dict[str, list[tuple[int, int, float]]]  # by role: (seconds in, pid, MiB)


async def sample_rss(pids: Callable[[], dict[str, int]], began: float, series: Series) -> None:
    """Every SAMPLE_EVERY_S, each process's RSS in MiB (a restarted one's under its role):
    a leak climbs steadily, an allocator's settling flattens."""
    while True:
        at = round(time.monotonic() - began)
        for role, pid in pids().items():
            if (kib := _rss_kib(pid)) is not None:
                series.setdefault(role, []).append((at, pid, round(kib / 1024, 1)))
        await asyncio.sleep(SAMPLE_EVERY_S)


def _rss_medians(
    samples: list[tuple[int, int, float]], pid: int, baseline_at: float, final_at: float
) -> tuple[float, float] | None:
    """The median RSS of the baseline's process in the window after the baseline (a process
    killed in it counts until it was), and of whichever runs the role in the window before the
    end; None without samples in both."""
    before = [mib for at, p, mib in samples if p == pid and 0 <= at - baseline_at <= RSS_WINDOW_S]
    after = [mib for at, _, mib in samples if 0 <= final_at - at <= RSS_WINDOW_S]
    if not before or not after:
        return None
    return statistics.median(before), statistics.median(after)


def verdicts(
    baseline: Report, final: Report, series: Series, at: tuple[float, float]
) -> list[tuple[str, str, bool]]:
    """(figure, baseline -> final, within the target) for each process and count."""
    checks: list[tuple[str, str, bool]] = []
    for role, before in baseline["processes"].items():
        after = final["processes"][role]
        if before["rss_kib"] is None or after["rss_kib"] is None:
            checks.append((f"{role} alive", "no process", False))
            continue
        medians = _rss_medians(series.get(role, []), before["pid"], *at)
        if medians is None:
            checks.append((f"{role} RSS", "too few samples (run longer)", False))
        else:
            growth = medians[1] / medians[0] - 1
            text = f"{medians[0]:.1f} -> {medians[1]:.1f} MiB ({growth:+.1%})"
            checks.append((f"{role} RSS (medians)", text, growth < RSS_GROWTH_LIMIT))
        checks.append(
            (f"{role} fds", f"{before['fds']} -> {after['fds']}", after["fds"] <= before["fds"])
        )
    for name in ("stack_processes", "cgroups", "leases_keys", "workers_keys"):
        checks.append((name, f"{baseline[name]} -> {final[name]}", final[name] <= baseline[name]))
    return checks
