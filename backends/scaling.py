"""The backends as an autoscaler sees them (``services/_autoscaler.py``, ``WorkerPool``): how many
workers run, start some, which one to drain for a scale-down, stop a drained one.

Each has a ``name``: the autoscalers of one pool elect one leader among them (a Nomad job's
serve processes share one; each host's local workers are a pool of their own).

- **local**: worker processes of this host. The worker to drain is the serving one that holds
  the fewest slots (its trajectories have the least left to lose at the drain's deadline).
- **nomad**: allocations of the workers job. Nomad alone decides which allocation a lower count
  removes (``backends/nomad.py``), so the worker to drain is the one it would remove
  (``next_to_stop``), and a drained worker is stopped only if it still is; if not (the group
  changed meanwhile) it is not stopped, and the autoscaler has it serve again.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from .local import LocalWorkers
from .nomad import NomadWorkers, NotNextToStop


class LocalPool:
    def __init__(self, workers: LocalWorkers, *, name: str | None = None) -> None:
        self._workers = workers
        self.name = name or f"local.{socket.gethostname().split('.')[0]}"

    @property
    def planned(self) -> int:
        return len(self._workers.running())

    async def worker_ids(self) -> set[str]:
        return set(self._workers.running())

    async def start_workers(self, count: int) -> None:
        for _ in range(count):
            await self._workers.start_worker()

    async def next_to_stop(self, serving: Mapping[str, int]) -> str | None:
        running = set(self._workers.running())
        held = {wid: slots for wid, slots in serving.items() if wid in running}
        return min(held, key=lambda wid: (held[wid], wid)) if held else None

    async def stop_worker(self, worker_id: str) -> bool:
        await self._workers.stop_worker(worker_id)
        return True


class NomadPool:
    def __init__(self, workers: NomadWorkers) -> None:
        self._workers = workers
        self.name = f"nomad.{workers.config.job_id}"

    @property
    def planned(self) -> int:
        return self._workers.count

    async def worker_ids(self) -> set[str]:
        return {
            allocation.id for allocation in await self._workers.allocations() if allocation.live
        }

    async def start_workers(self, count: int) -> None:
        await self._workers.scale(self._workers.count + count)

    async def next_to_stop(self, serving: Mapping[str, int]) -> str | None:
        victim = await self._workers.next_to_stop()
        return victim.id if victim is not None and victim.id in serving else None

    async def stop_worker(self, worker_id: str) -> bool:
        try:
            await self._workers.stop_allocation(worker_id)
        except NotNextToStop:
            return False
        return True
