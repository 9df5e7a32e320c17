"""CPU time per call, by role: which process of the stack spends what on a call.

Throughput on a shared 2-core machine moves with whatever else runs; the CPU each process
spends per call moves much less, so it is the figure to compare changes by. A sample reads
``utime + stime`` of every process from ``/proc`` and names its role from its command line and
its parent: this process (the client), ``toolbus serve`` (the executor), its sandbox workers,
the sandboxes under them, and nats-server.
"""

from __future__ import annotations

import os
from collections.abc import Callable

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")

# The order rows are printed in.
ROLES = (
    "client",
    "client+executor",
    "executor",
    "workers",
    "sandboxes",
    "responder",
    "nats-server",
)


def _processes() -> dict[int, tuple[int, str, int]]:
    """Every readable process: pid -> (parent pid, command line, CPU ticks)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                stat = file.read()
            with open(f"/proc/{name}/cmdline", "rb") as file:
                cmdline = file.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        found[int(name)] = (int(fields[1]), cmdline, int(fields[11]) + int(fields[12]))
    return found


def _role_of(pid: int, processes: dict[int, tuple[int, str, int]], roots: dict[int, str]) -> str:
    """The role of the process: its own, or that of the nearest ancestor with one; a process
    under a sandbox worker is a sandbox. '' for the rest of the machine."""
    ancestor = pid
    for _ in range(64):  # a bound, for a /proc read mid-change
        if ancestor in roots:
            return roots[ancestor]
        parent, cmdline, _ = processes.get(ancestor, (0, "", 0))
        if "nats-server" in cmdline.split(" ", 1)[0]:
            return "nats-server"
        if " services worker" in cmdline:
            return "workers" if ancestor == pid else "sandboxes"
        if parent <= 1:
            break
        ancestor = parent
    return ""


def cpu_by_role(roots: dict[int, str]) -> dict[str, float]:
    """CPU seconds so far of every process with a role; ``roots`` names the roles of some pids
    (this process as the client, say); a sandbox worker is found by its command line, its
    descendants are sandboxes."""
    processes = _processes()
    totals: dict[str, float] = {}
    for pid, (_, _, ticks) in processes.items():
        role = _role_of(pid, processes, roots)
        if role:
            totals[role] = totals.get(role, 0.0) + ticks / _TICKS_PER_S
    return totals


class CpuWindow:
    """``mark()`` at the start and at the end of a window; then ``per_call(calls)``."""

    def __init__(self, roots: Callable[[], dict[int, str]]) -> None:
        self._roots = roots
        self._marks: list[dict[str, float]] = []

    def mark(self) -> None:
        self._marks.append(cpu_by_role(self._roots()))

    def per_call_us(self, calls: int) -> dict[str, float]:
        """Microseconds of CPU per call of each role over the last window (empty without one)."""
        if len(self._marks) < 2 or calls <= 0:
            return {}
        start, end = self._marks[-2], self._marks[-1]
        spent = {role: seconds - start.get(role, 0.0) for role, seconds in end.items()}
        return {
            role: round(spent[role] / calls * 1e6, 1) for role in ROLES if spent.get(role, 0) > 0
        }
