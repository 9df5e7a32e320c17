"""The ``tools.status`` reply: the slots of the registered workers, and this executor's counts."""

from __future__ import annotations

from schemas.internal import DrainState, WorkerInfo
from schemas.messages import PoolStatus, StatusReply, WorkerStatus

from ._serving import CallStats


def pool_status(
    executor_id: str, workers: list[tuple[WorkerInfo, float]], stats: CallStats, in_flight: int
) -> StatusReply:
    """``workers``: each registered worker and the seconds since it was last heard."""
    total = sum(info.slots_total for info, _ in workers)
    free = sum(info.slots_free for info, _ in workers)
    broken = sum(info.slots_out_of_service for info, _ in workers)
    warm = sum(info.slots_warm for info, _ in workers)
    # A draining worker's slots that nobody holds are neither free nor in use.
    closed = sum(
        max(info.slots_total - info.slots_held - info.slots_out_of_service, 0)
        for info, _ in workers
        if info.drain is not DrainState.SERVING
    )
    in_use = total - free - broken - closed
    by_state = {"free": free, "acquired": in_use, "out_of_service": broken}
    if closed:
        by_state["draining"] = closed
    return StatusReply(
        executor_id=executor_id,
        queue_size=in_flight,
        total_requests=stats.total_requests,
        total_errors=stats.total_errors,
        rates=stats.rates(),
        pool=PoolStatus(
            total_slots=total,
            available_slots=free,
            acquired_slots=in_use,
            containers=len(workers),
            slots_by_state=by_state,
            started=bool(workers),
            warm_slots=warm,
        ),
        workers=[
            WorkerStatus(
                worker_id=info.worker_id,
                host=info.host,
                slots_total=info.slots_total,
                slots_free=info.slots_free,
                age_s=round(age, 3),
                slots_warm=info.slots_warm,
                slots_held=info.slots_held,
                state=info.drain.value,
            )
            for info, age in sorted(workers, key=lambda pair: pair[0].worker_id)
        ],
    )
