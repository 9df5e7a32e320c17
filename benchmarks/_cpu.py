"""CPU time by role over a timed window: which process of the stack spends what on a call.

Throughput on a shared 2-core machine moves with whatever else runs; the CPU each process
spends per call moves much less, so it is the figure to compare changes by. A snapshot reads
``utime + stime`` of this process and each of its descendants from ``/proc`` (Linux only) and
groups them: this process (``bench``) and what it reaped, nats-server, sandbox workers, the
sandboxes below them (bubblewrap, the launcher and the commands it reaped), processes the
caller names (``roles``: ``toolbus serve`` as the executor, an echo responder), and the rest
of the machine (``other``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

GROUPS = ("bench", "reaped", "nats", "workers", "sandboxes", "other")  # roles come after bench


def _machine_busy_s() -> float | None:
    """CPU seconds spent by all cores on anything but idle and iowait, since boot."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLK_TCK


def _proc_stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own CPU seconds, reaped children's CPU seconds) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
    utime, stime, cutime, cstime = (int(v) for v in rest[11:15])
    return int(rest[1]), (utime + stime) / _CLK_TCK, (cutime + cstime) / _CLK_TCK


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_snapshot(roles: Mapping[int, str] | None = None) -> dict[str, Any]:
    """CPU seconds so far of this process and each of its descendants, and of the machine.

    A child of this process is nats-server, a sandbox worker, or one of ``roles`` (pid ->
    group); below a worker everything is a sandbox, and so is any other child of this process.
    """
    roles = roles or {}
    me = os.getpid()
    stats: dict[int, tuple[int, float, float]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
                stats[int(entry)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    per_pid: dict[int, tuple[str, float]] = {}

    def add(pid: int, group: str) -> None:
        _, own, reaped = stats[pid]
        # Reaped children count with their parent (the launcher reaps the commands), but not
        # a worker's: those are sandboxes that ended, outside any timed window.
        per_pid[pid] = (group, own + (0.0 if group == "workers" else reaped))
        for child in children.get(pid, []):
            add(child, "workers" if " services worker" in _cmdline(child) else "sandboxes")

    for child in children.get(me, []):
        command = _cmdline(child)
        if child in roles:
            add(child, roles[child])
        elif "nats-server" in command:
            add(child, "nats")
        elif "services worker" in command:
            add(child, "workers")
        else:
            add(child, "sandboxes")
    own, reaped = stats[me][1:] if me in stats else (0.0, 0.0)
    return {"machine": _machine_busy_s(), "bench": own, "reaped": reaped, "pids": per_pid}


def cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float] | None:
    """CPU seconds per group between two snapshots; "other" is the rest of the machine."""
    if before["machine"] is None or after["machine"] is None:
        return None
    groups = dict.fromkeys(GROUPS, 0.0)
    groups["bench"] = after["bench"] - before["bench"]
    groups["reaped"] = after["reaped"] - before["reaped"]
    for pid, (group, seconds) in after["pids"].items():
        start = before["pids"].get(pid, (group, 0.0))[1]  # a process born in the window: all
        groups[group] = groups.get(group, 0.0) + max(seconds - start, 0.0)
    total = after["machine"] - before["machine"]
    groups["other"] = max(total - sum(groups.values()), 0.0)
    groups["total"] = total
    return groups
