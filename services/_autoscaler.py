"""The autoscaler of ``toolbus serve --autoscale``: one leader among the executors starts and
stops workers to follow the slots held plus the trajectories waiting plus headroom.

Each round (every ``interval_s``, on the leader only: ``_leadership.py``) reads what the
workers' registrations say (slots held, drain state: ``_worker_drain.py``) and the waiting
queue's length, and takes one ``Step`` (``_scale_policy.py``): drained or draining workers
resumed and new ones started when more are wanted; drained ones stopped; one serving worker,
the backend's choice (``backends/scaling.py``), drained when fewer have been wanted for the
cooldown. A worker is stopped only once it says, asked right then, that it is drained: nothing
in it is lost. The rounds keep no state but the cooldown's clock, so a new leader takes over
from what the registrations say (a drain under way goes on: the worker runs it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Protocol

import structlog
from nats.aio.client import Client

from schemas.internal import DrainReply, DrainRequest, DrainState, WorkerInfo
from schemas.messages import WaitingStatus
from schemas.subjects import SCALER_BUCKET, Subjects

from ._kv import KvBucket, encode_key, open_bucket
from ._leadership import DEFAULT_LEADER_TTL_S, Leadership
from ._scale_policy import Cooldown, ScalePolicy, Step, WorkersSeen, plan
from ._setting_defaults import DEFAULT_SCALE_DRAIN_TIMEOUT_S
from ._tasks import cancel_and_wait

log = structlog.get_logger("toolbus.autoscaler")

DEFAULT_SCALE_INTERVAL_S = 2.0
_DRAIN_REQUEST_TIMEOUT_S = 5.0


class WorkerPool(Protocol):
    """What the autoscaler needs of a backend."""

    name: str  # the autoscalers of one pool elect one leader

    @property
    def planned(self) -> int:
        """Workers it runs, counting those asked for and not started yet."""
        ...

    async def worker_ids(self) -> set[str]:
        """The workers it runs now."""
        ...

    async def start_workers(self, count: int) -> None: ...

    async def next_to_stop(self, serving: Mapping[str, int]) -> str | None:
        """Which of ``serving`` (worker id: slots held) to drain; None: none now."""
        ...

    async def stop_worker(self, worker_id: str) -> bool:
        """Stop a drained worker; False: the backend would stop another, so it was not."""
        ...


class Demand(Protocol):
    """What the autoscaler reads of its executor (an ``ExecutorService`` is one)."""

    @property
    def executor_id(self) -> str: ...

    def registered_workers(self) -> list[tuple[WorkerInfo, float]]: ...

    async def queue_status(self) -> WaitingStatus: ...


class Autoscaler:
    def __init__(
        self,
        nc: Client,
        pool: WorkerPool,
        policy: ScalePolicy,
        *,
        executor: Demand,
        subjects: Subjects,
        drain_timeout_s: float = DEFAULT_SCALE_DRAIN_TIMEOUT_S,
        interval_s: float = DEFAULT_SCALE_INTERVAL_S,
        leader_ttl_s: float = DEFAULT_LEADER_TTL_S,
    ) -> None:
        self._nc = nc
        self._pool = pool
        self._policy = policy
        self._executor = executor
        self._subjects = subjects
        self._drain_timeout_s = drain_timeout_s
        self._interval_s = interval_s
        self._leadership = Leadership(
            KvBucket(nc.jetstream(), SCALER_BUCKET),
            key=encode_key(pool.name),
            holder=executor.executor_id,
            ttl_s=leader_ttl_s,
        )
        self._cooldown = Cooldown(policy.cooldown_s)
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self._leadership.is_leader

    async def __aenter__(self) -> Autoscaler:
        await open_bucket(
            self._nc.jetstream(), SCALER_BUCKET, description="toolbus autoscaler leader lease"
        )
        await self._leadership.__aenter__()
        self._task = asyncio.create_task(self._run(), name="autoscaler")
        log.info(
            "autoscaler started",
            min_workers=self._policy.min_workers,
            max_workers=self._policy.max_workers,
            headroom_slots=self._policy.headroom_slots,
            cooldown_s=self._policy.cooldown_s,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Rounds first (a stop under way is waited for by its own timeouts), then the lease.
        if self._task is not None:
            await cancel_and_wait([self._task])
        await self._leadership.__aexit__(exc_type, exc, tb)

    async def _run(self) -> None:
        while True:
            if self.is_leader:
                try:
                    await self.round()
                except Exception:  # a backend or NATS error: the next round tries again
                    log.exception("an autoscaler round failed")
            await asyncio.sleep(self._interval_s)

    async def round(self) -> Step:
        """Look at the workers and the queue, and take one step."""
        ids = await self._pool.worker_ids()
        infos = [info for info, _ in self._executor.registered_workers() if info.worker_id in ids]
        waiting = (await self._executor.queue_status()).trajectories
        held = sum(info.slots_held for info in infos)
        desired = self._policy.desired(slots_held=held, waiting=waiting)
        seen = WorkersSeen(
            serving={i.worker_id: i.slots_held for i in infos if i.drain is DrainState.SERVING},
            draining=sorted(i.worker_id for i in infos if i.drain is DrainState.DRAINING),
            drained=sorted(i.worker_id for i in infos if i.drain is DrainState.DRAINED),
            pending=max(self._pool.planned - len(infos), 0),
        )
        now = time.monotonic()
        fewer_wanted = desired < seen.current
        step = plan(
            desired, seen, down_allowed=self._cooldown.allows_down(now, fewer_wanted=fewer_wanted)
        )
        if step != Step():
            log.info(
                "autoscaler step",
                desired=desired,
                slots_held=held,
                waiting=waiting,
                serving=len(seen.serving),
                pending=seen.pending,
                draining=len(seen.draining),
                drained=len(seen.drained),
                resume=step.resume,
                start=step.start,
                stop=step.stop,
                drain_one=step.drain_one,
            )
        await self._take(step, seen, now)
        return step

    async def _take(self, step: Step, seen: WorkersSeen, now: float) -> None:
        for worker_id in step.resume:
            if self.is_leader:
                await self._ask(worker_id, DrainRequest(drain=False))
        if step.start and self.is_leader:
            await self._pool.start_workers(step.start)
        if step.resume or step.start:
            self._cooldown.changed(now)
        for worker_id in step.stop:
            if self.is_leader:
                await self._stop_drained(worker_id)
        if step.drain_one and self.is_leader:
            victim = await self._pool.next_to_stop(seen.serving)
            if victim is not None:
                drain = DrainRequest(drain=True, deadline_s=self._drain_timeout_s)
                if await self._ask(victim, drain) is not None:
                    self._cooldown.changed(now)

    async def _stop_drained(self, worker_id: str) -> None:
        # Asked again right before the stop: only a worker that says it holds nothing goes.
        reply = await self._ask(worker_id, DrainRequest(drain=None))
        if reply is None or reply.state is not DrainState.DRAINED or reply.slots_held:
            return
        if await self._pool.stop_worker(worker_id):
            log.info("autoscaler stopped a drained worker", worker_id=worker_id)
            self._cooldown.changed(time.monotonic())
        else:  # the backend would stop another one: this one serves again
            log.info("the backend would stop another worker: resuming", worker_id=worker_id)
            await self._ask(worker_id, DrainRequest(drain=False))

    async def _ask(self, worker_id: str, request: DrainRequest) -> DrainReply | None:
        try:
            msg = await self._nc.request(
                self._subjects.worker_drain(worker_id),
                request.model_dump_json().encode(),
                timeout=_DRAIN_REQUEST_TIMEOUT_S,
            )
            reply = DrainReply.model_validate_json(msg.data)
        except Exception as exc:
            log.warning("a drain request failed", worker_id=worker_id, error=repr(exc))
            return None
        if reply.error is not None:
            log.warning("a drain request failed", worker_id=worker_id, error=reply.error)
            return None
        return reply
