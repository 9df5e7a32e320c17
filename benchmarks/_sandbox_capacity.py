"""How fast slot sandboxes start and what each live one costs: a helper for the capacity
benchmarks, also runnable alone.

    .venv/bin/python benchmarks/_sandbox_capacity.py [--sandboxes 500] [--concurrency 16]
                                                     [--json]

:func:`measure_sandboxes` starts N ``BwrapSandbox``es the way a worker makes them
(``SandboxFactory``: the slot's own user and pids cgroup when running as root), at most C
starting at once, each by its first command (``true``), and keeps them all alive while it
reads what they cost:

- starts/s: N over the wall time from the first start to the last ``true`` returning, and
  the CPU time per start of this process and the sandboxes' processes (on a busy machine
  the better guide: cores / CPU time per start is what an idle machine would reach);
- MiB per live sandbox: system memory used (MemTotal - MemAvailable) after minus before,
  over N; also the summed PSS of the sandboxes' processes over N (less noisy: it leaves out
  the kernel's share, namespaces, page tables, and the rest of the machine);
- fds and threads per sandbox in this process, and host processes per sandbox.

Only the sandbox API a worker uses is touched, so the same script measures an older tree
(``PYTHONPATH=/tmp/old-tree python benchmarks/_sandbox_capacity.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from services._cgroups import PidsCgroups
from services._sandbox import Sandbox, SandboxFactory, SandboxLimits
from services._worker_config import DEFAULT_SANDBOX_UID_BASE

_MIB = 1024 * 1024


@dataclass
class SandboxCapacity:
    sandboxes: int
    concurrency: int
    starts_per_s: float
    cpu_ms_per_start: float  # CPU time of this process and the sandboxes' processes, per start
    worker_cpu_ms_per_start: float  # of that, this (the worker's) process
    mib_per_sandbox: float  # system memory used (MemTotal - MemAvailable), per live sandbox
    pss_mib_per_sandbox: float  # the sandboxes' own processes (PSS), per live sandbox
    fds_per_sandbox: float  # in this (the worker's) process
    threads_per_sandbox: float  # in this process
    processes_per_sandbox: float  # on the host
    errors: int


def _memory_used() -> int:
    fields = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _descendants() -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                text = handle.read()
        except OSError:
            continue
        ppid = int(text[text.rfind(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [os.getpid()]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds of this process and of ``pids`` (with what each has reaped)."""
    own = os.times()
    total = own.user + own.system
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                text = handle.read()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        total += sum(int(v) for v in fields[11:15]) / _CLK_TCK
    return total


def _pss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def measure_sandboxes(
    root: Path, sandboxes: int, concurrency: int, *, limits: SandboxLimits | None = None
) -> SandboxCapacity:
    """Start ``sandboxes`` slot sandboxes under ``root``, ``concurrency`` at a time; their cost."""
    raise_fd_limit()
    limits = limits or SandboxLimits()
    cgroups = PidsCgroups.create(f"capacity-{uuid.uuid4().hex[:8]}").cgroups
    factory = SandboxFactory(
        allow_network=False,
        require_sandbox=True,
        limits=limits,
        cgroups=cgroups,
        uid_base=DEFAULT_SANDBOX_UID_BASE,  # a worker's default: a user per slot, when root
    )
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)
    await factory.probe(root / ".probe")
    made: list[Sandbox] = []
    for index in range(sandboxes):
        workspace = root / f"slot_{index}"
        workspace.mkdir()
        made.append(factory.make(index, workspace))
    gate = asyncio.Semaphore(concurrency)
    errors = 0

    async def start(sandbox: Sandbox) -> None:
        nonlocal errors
        async with gate:
            try:
                command = await sandbox.run("true")
                code = await asyncio.wait_for(command.wait(), 60)
                command.close()
                errors += code != 0
            except Exception:
                errors += 1

    memory, fds, threads = _memory_used(), _fds(), _threads()
    before = _descendants()
    processes, cpu, own = len(before), _cpu_s(before), _cpu_s([])
    started = time.perf_counter()
    try:
        await asyncio.gather(*(start(sandbox) for sandbox in made))
        seconds = time.perf_counter() - started
        cpu, own = _cpu_s(_descendants()) - cpu, _cpu_s([]) - own
        for _ in range(3):  # closed transports let go of their pipes on the next turns
            await asyncio.sleep(0)
        await asyncio.sleep(1)  # the launchers settle (their first command's pages)
        pids = _descendants()
        return SandboxCapacity(
            sandboxes=sandboxes,
            concurrency=concurrency,
            starts_per_s=sandboxes / seconds,
            cpu_ms_per_start=cpu * 1000 / sandboxes,
            worker_cpu_ms_per_start=own * 1000 / sandboxes,
            mib_per_sandbox=(_memory_used() - memory) / _MIB / sandboxes,
            pss_mib_per_sandbox=_pss(pids) / _MIB / sandboxes,
            fds_per_sandbox=(_fds() - fds) / sandboxes,
            threads_per_sandbox=(_threads() - threads) / sandboxes,
            processes_per_sandbox=(len(pids) - processes) / sandboxes,
            errors=errors,
        )
    finally:
        closing = asyncio.Semaphore(32)

        async def close(sandbox: Sandbox) -> None:
            async with closing:
                await sandbox.close()

        await asyncio.gather(*(close(sandbox) for sandbox in made))
        await factory.close()
        if cgroups is not None:
            await cgroups.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandboxes", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="toolbus-capacity-") as scratch:
        Path(scratch).chmod(0o711)
        result = asyncio.run(measure_sandboxes(Path(scratch), args.sandboxes, args.concurrency))
    if args.json:
        print(json.dumps(asdict(result)))
        return
    for name, value in asdict(result).items():
        print(f"{name:24} {value:.2f}" if isinstance(value, float) else f"{name:24} {value}")


if __name__ == "__main__":
    sys.exit(main())
