"""Taking a worker out of service before it is stopped (an autoscaler's scale-down).

The worker is the one that knows whether it is empty, so the drain's state lives here, and goes
out with every heartbeat (``WorkerInfo.drain``, ``slots_held``):

    SERVING ──drain──▶ DRAINING ──no slot held──▶ DRAINED
       ▲                  │  └──deadline: every held slot given up (workspace lost)──▶ DRAINED
       └──────resume──────┴──────────────────────────────────────────────────────────────┘

While DRAINING the worker gives no slot to a new trajectory (``SlotKeeper.draining``: executors'
acquisitions get FULL, waiting tickets are not pulled); the trajectories that hold one keep it,
their calls run and their leases are renewed, until they release it or it expires. At the
deadline what is still held is taken back with a tombstone (``LostReason.WORKER_DRAINED``): its
running calls end with an ``infra`` result, and the trajectory's next call hears
``workspace_lost`` and gets a slot elsewhere. A DRAINED worker holds nothing: stopping it loses
nothing. A resume (scale-up came first) makes it serve again, whatever step it was at.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from schemas.internal import DrainReply, DrainRequest, DrainState, LostReason

from ._slot_keeper import SlotKeeper
from ._slots import SlotState, SlotTable
from ._tasks import cancel_and_wait

log = structlog.get_logger("toolbus.worker")

_GIVE_UP_RETRY_S = 0.2  # a slot still ASSIGNING at the deadline is taken at the next round


class WorkerDrain:
    def __init__(
        self,
        keeper: SlotKeeper,
        table: SlotTable,
        *,
        worker_id: str,
        changed: Callable[[], None],
    ) -> None:
        self._keeper = keeper
        self._table = table
        self._worker_id = worker_id
        self._changed = changed  # the state changed: wake the offers, tell executors soon
        self._state = DrainState.SERVING
        self._task: asyncio.Task[None] | None = None
        self._slots_changed = asyncio.Event()

    def slots_changed(self) -> None:
        """A slot changed state (the worker's table says so): maybe the last one was let go."""
        self._slots_changed.set()

    @property
    def state(self) -> DrainState:
        return self._state

    @property
    def slots_held(self) -> int:
        return self._table.count(SlotState.ASSIGNING, SlotState.ASSIGNED)

    async def request(self, request: DrainRequest) -> DrainReply:
        """Drain (a second drain changes nothing, its deadline included), resume, or only say
        the state (``drain`` None)."""
        if request.drain and self._state is DrainState.SERVING and not self.slots_held:
            self._set(DrainState.DRAINED, draining=True)  # empty: drained at once
            log.info("drained", worker_id=self._worker_id)
        elif request.drain and self._state is DrainState.SERVING:
            self._set(DrainState.DRAINING, draining=True)
            log.info("draining", worker_id=self._worker_id, deadline_s=request.deadline_s)
            self._task = asyncio.create_task(
                self._until_empty(request.deadline_s), name=f"drain-{self._worker_id}"
            )
        elif request.drain is False and self._state is not DrainState.SERVING:
            # The state first, in this step: a request that comes while the task stops sees it.
            task, self._task = self._task, None
            self._set(DrainState.SERVING, draining=False)
            log.info("serving again", worker_id=self._worker_id)
            if task is not None:
                await cancel_and_wait([task])
        return DrainReply(state=self._state, slots_held=self.slots_held)

    async def close(self) -> None:
        """Stop the drain's task (when the worker stops)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])

    def _set(self, state: DrainState, *, draining: bool) -> None:
        # One step: what executors and the offers read changes with the state.
        self._state = state
        self._keeper.draining = draining
        self._changed()

    async def _until_empty(self, deadline_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        while self.slots_held and (left_s := deadline - loop.time()) > 0:
            self._slots_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slots_changed.wait(), left_s)
        while self.slots_held:
            # Past the deadline. A slot still ASSIGNING (a lease write that began before the
            # drain) is ASSIGNED or free within one KV step: it is taken at the next round.
            log.warning(
                "drain deadline passed: giving up the slots still held",
                worker_id=self._worker_id,
                slots_held=self.slots_held,
            )
            # Shielded: a resume meanwhile must not cut a tombstone's write half-way.
            await asyncio.shield(self._keeper.give_up_all(LostReason.WORKER_DRAINED))
            if self.slots_held:
                await asyncio.sleep(_GIVE_UP_RETRY_S)
        self._set(DrainState.DRAINED, draining=True)
        log.info("drained", worker_id=self._worker_id)
