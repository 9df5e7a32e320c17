"""One call's way to its slot and back: find the slot, send the call, try again what may be.

The trajectory's lease says where its slot is (``_placement.py``); the call goes there in a
batch and its result is waited for (``_dispatch.py``). When the worker did not take the call,
it did not run, and the lease is read again (the slot was released, expired or moved) before
another try; when the worker incarnation is gone, so is the workspace, and the caller hears so
once. Nothing here decides on its own that a worker is gone or a workspace lost.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from observability import tracing
from schemas.errors import ErrorKind
from schemas.internal import ItemResult, Lease, LostReason, RejectReason
from schemas.messages import ToolResult

from ._batcher import OutgoingItem
from ._dispatch import CallRejected, Dispatcher, SendAgain, WorkerGone
from ._failures import infra_failure, workspace_lost
from ._placement import Placement, WorkspaceLost
from .exceptions import BadRequest, NoCapacity

_MAX_ATTEMPTS = 4  # the worker refused the call on this many leases in a row: 503
_MAX_SENDS_AGAIN = 5  # after reconnects of this executor (then it waits, as for a call with no id)
_UNDELIVERED_RETRY_S = 0.2  # a batch that reached no worker: wait, then try again ...
_UNDELIVERED_PATIENCE_S = 20.0  # ... for this long (more than a registration's TTL)


class ItemIds:
    """Ids of the calls an executor sends: its own id and a count, unique among executors
    (a worker remembers ids to answer cancels, and refuses one it has seen); cheaper than a
    random id per call."""

    def __init__(self, executor_id: str) -> None:
        self._prefix = f"{executor_id}."
        self._count = 0

    def next(self) -> str:
        self._count += 1
        return f"{self._prefix}{self._count}"


class CallRouter:
    def __init__(self, placement: Placement, dispatcher: Dispatcher, *, ids: ItemIds) -> None:
        self._placement = placement
        self._dispatcher = dispatcher
        self._ids = ids

    async def run(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any],
        timeout_s: float,
        uniq_id: str | None,
        allow_network: bool = True,
        *,
        acquire: bool = True,
        image: str | None = None,
    ) -> ItemResult | ToolResult:
        """The worker's answer, or an infra failure result when there was none.

        ``acquire=False``: a trajectory without a slot gets NotFound instead of a new slot.
        ``image`` (normalized): a new slot is made from it; BadRequest when the trajectory's
        slot is made from another.
        """
        rejected: tuple[Lease, RejectReason] | None = None
        attempts = sent_again = 0
        patience = time.monotonic() + _UNDELIVERED_PATIENCE_S
        while True:
            try:
                lease = await self._placement.lease(
                    trajectory_id, acquire=acquire, rejected=rejected, image=image
                )
            except WorkspaceLost as lost:
                return workspace_lost(lost.lease, uniq_id)
            if image is not None and lease.image != image:
                has = f"image {lease.image}" if lease.image else "the default environment"
                raise BadRequest(
                    f"trajectory {trajectory_id!r} has a slot of {has}, not of {image}: "
                    "release it first to start over in another image"
                )
            item = OutgoingItem.encode(
                item_id=self._ids.next(),
                trajectory_id=trajectory_id,
                epoch=lease.epoch,
                tool=tool,
                arguments=arguments,
                timeout_s=timeout_s,
                uniq_id=uniq_id,
                allow_network=allow_network,
                trace_context=tracing.current_trace_headers() if tracing.enabled() else None,
                created_at=time.time(),
            )
            try:
                return await self._dispatcher.run(lease, item, resend=sent_again < _MAX_SENDS_AGAIN)
            except SendAgain:
                sent_again += 1  # the same call, the same uniq_id: it runs once
                continue
            except CallRejected as rejection:
                reason = rejection.reason
                if reason is RejectReason.UNREADABLE:
                    return infra_failure(
                        "The sandbox worker could not read this call (logged); it did not run",
                        uniq_id=uniq_id,
                    )
                if reason is None or reason is RejectReason.CANCELLED:
                    # It reached no worker: the worker may be reconnecting. While it is
                    # registered its workspace is not lost: wait and try again (if its
                    # registration expires, the next look at the lease says so).
                    if time.monotonic() > patience:
                        break
                    await asyncio.sleep(_UNDELIVERED_RETRY_S)
                    rejected = None
                    continue
                rejected = (lease, reason)  # the worker's word: the lease decides again
            except WorkerGone:
                await self._placement.forget_lost(trajectory_id, lease)
                gone = lease.model_copy(update={"lost": LostReason.WORKER_GONE})
                return workspace_lost(gone, uniq_id)
            attempts += 1
            if attempts >= _MAX_ATTEMPTS:
                break
        raise NoCapacity(
            f"could not place the call: the slot of trajectory {trajectory_id!r} kept moving",
            kind=ErrorKind.WORKER_UNAVAILABLE,
        )
