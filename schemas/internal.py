"""Messages between executors and sandbox workers (``toolbus.worker.<id>.*``), and what they keep
in the KV buckets.

Not a public contract, but versioned with the rest so executors and workers of one release agree.

Who decides what (see README, "Slots: one lifecycle, one truth"):

- A worker's **registration** (``WorkerInfo`` in the workers bucket) lives while the worker
  refreshes it: it is written with a per-message TTL (``ttl_s``), so a worker that stops
  heartbeating is removed by the server, not by one executor's clock. ``incarnation`` changes
  each time the worker (re-)registers; leases name the incarnation they were made in.
- A trajectory's **lease** (``Lease`` in the leases bucket) is written by the worker that holds
  the slot: created (compare-and-set) when it assigns the slot, renewed while it holds it,
  deleted when it releases it, replaced by a tombstone (``lost`` set) when the workspace is lost.
  An executor deletes a lease only on that worker's word (it refused a call on it, or does not
  hold it), when the lease's worker incarnation is no longer registered, or to consume a
  tombstone it reports.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from .messages import ToolResult


class DrainState(StrEnum):
    """A worker on its way out of service (an autoscaler's scale-down), as it says itself."""

    SERVING = "serving"  # gives slots to new trajectories
    DRAINING = "draining"  # gives none; its trajectories keep theirs until done or the deadline
    DRAINED = "drained"  # holds no slot: it may be stopped without losing anything


class WorkerInfo(BaseModel):
    """A worker's registration in the workers KV bucket, refreshed every heartbeat."""

    worker_id: str
    host: str
    pid: int
    slots_total: int
    slots_free: int
    started_at: float
    updated_at: float
    heartbeat_s: float
    incarnation: str = Field(description="Changes at each (re-)registration of the worker.")
    ttl_s: int = Field(default=0, description="The registration expires this long after a beat.")
    slots_out_of_service: int = Field(default=0, description="Slots whose wipe failed.")
    slots_warm: int = Field(
        default=0, description="Free slots whose sandbox is already started (warm_slots)."
    )
    slots_held: int = Field(default=0, description="Slots a trajectory holds now.")
    drain: DrainState = Field(
        default=DrainState.SERVING, description="Whether it gives slots to new trajectories."
    )


class DrainRequest(BaseModel):
    """An autoscaler to a worker (``worker_drain``): stop giving slots to new trajectories, and
    be empty by ``deadline_s`` (its trajectories' slots then given up, workspaces lost); with
    ``drain`` false, serve again; None: only say the state."""

    drain: bool | None = True
    deadline_s: float = Field(default=300.0, ge=0.0)


class DrainReply(BaseModel):
    state: DrainState | None = Field(default=None, description="None: the request failed.")
    slots_held: int = 0
    error: str | None = None


class LostReason(StrEnum):
    """Why a lease is a tombstone: its workspace is gone."""

    EXPIRED = "expired"  # the worker released the slot after slot_idle_timeout_s without a call
    WORKER_STOPPED = "worker_stopped"  # the worker shut down
    WORKER_EXPIRED = "worker_expired"  # the worker missed its registration's TTL and reset
    WORKER_GONE = "worker_gone"  # the worker's registration is gone (found by an executor)
    WORKER_DRAINED = "worker_drained"  # the worker was drained (scale-down) past its deadline
    UNREADABLE = "unreadable"  # the stored lease could not be read (another release's format)


class Lease(BaseModel):
    """Value of a trajectory's key in the leases KV bucket."""

    worker_id: str
    incarnation: str
    slot: int
    epoch: int = Field(description="Which assignment of the slot: a new one per trajectory.")
    acquired_at: float
    lost: LostReason | None = Field(
        default=None, description="Set on a tombstone: the workspace is gone, and why."
    )
    image: str | None = Field(
        default=None, description="The image the slot is made from (normalized), if any."
    )

    def same_assignment(self, other: Lease) -> bool:
        return (self.worker_id, self.incarnation, self.epoch) == (
            other.worker_id,
            other.incarnation,
            other.epoch,
        )


class AcquireRequest(BaseModel):
    trajectory_id: str
    image: str | None = None  # normalized (``_image_refs.py``): the slot is made from it


class AcquireOutcome(StrEnum):
    LEASED = "leased"  # ``lease`` is the trajectory's lease on this worker (new or existing)
    FULL = "full"  # no free slot
    CONFLICT = "conflict"  # the trajectory already has a lease elsewhere: read it
    STOPPING = "stopping"
    FAILED = "failed"  # the lease could not be written (KV unavailable): try again


class AcquireReply(BaseModel):
    outcome: AcquireOutcome
    lease: Lease | None = None
    slots_free: int | None = Field(
        default=None, description="The worker's free slots after this acquisition (a hint)."
    )


class SlotWaiter(BaseModel):
    """A trajectory waiting for a slot: a message in the waiting stream (``WAITING_STREAM``).

    Workers take these in stream order whenever they have a free slot, assign the slot, and
    offer its lease to ``offer_to``; so waiters are served first come, first served, whichever
    executor they came through. The message expires with the wait (a per-message TTL)."""

    ticket: str = Field(description="Names this wait; an offer for another one is declined.")
    trajectory_id: str
    offer_to: str = Field(description="The waiting executor's offers subject.")
    deadline: float = Field(description="Unix time after which nobody waits for an offer.")
    enqueued_at: float
    image: str | None = Field(default=None, description="The slot is made from this image.")


class SlotOffer(BaseModel):
    """A worker to a waiting executor: the slot it assigned to the ticket's trajectory."""

    ticket: str
    lease: Lease | None = Field(
        default=None, description="None: the trajectory got a lease some other way; read it."
    )


class SlotOfferReply(BaseModel):
    accepted: bool = Field(
        description="False: nobody waits for that ticket any more; the worker frees the slot."
    )


class WorkerReleaseRequest(BaseModel):
    trajectory_id: str
    epoch: int | None = Field(default=None, description="Release only this assignment.")
    reset_workspace: bool = False


class WorkerReleaseReply(BaseModel):
    released: bool
    slot: int | None = None
    settled: bool = Field(
        default=True, description="False: the slot's clean-up was still running at the reply."
    )
    error: str | None = Field(
        default=None, description="The release failed on the worker (its lease is unchanged)."
    )


class BatchItem(BaseModel):
    item_id: str
    trajectory_id: str
    epoch: int = Field(description="The lease's epoch: the item runs only in that assignment.")
    tool: str = Field(
        description="Canonical tool name (aliases resolved by the executor), or "
        "'artifacts.<operation>'."
    )
    arguments: dict[str, Any]
    timeout_s: float
    uniq_id: str | None = None
    allow_network: bool = True  # False: this call runs without network
    trace_context: dict[str, str] | None = Field(
        default=None, description="W3C traceparent/tracestate of the executor's span."
    )
    created_at: float | None = Field(
        default=None, description="Unix time the executor sent the call: queue wait starts."
    )


class BatchHeader(BaseModel):
    """First line of a batch message; each further line is one ``BatchItem`` (JSON lines), so
    that a worker reads every item on its own and one it cannot read never spoils the others.

    Results come back on ``reply_to``, several to a message as JSON lines of ``ItemResult`` (a
    message of one result is that result alone); the request's reply is a BatchAck.
    """

    reply_to: str


class RejectReason(StrEnum):
    NO_SLOT = "no_slot"  # no slot of this worker holds the item's assignment: read the lease
    STOPPING = "stopping"  # the worker is shutting down: read the lease (a tombstone follows)
    CANCELLED = "cancelled"  # an executor cancelled the item before it arrived
    UNREADABLE = "unreadable"  # the worker could not parse the item


class BatchAck(BaseModel):
    rejected: dict[str, RejectReason] = Field(default_factory=dict)
    unreadable: list[int] = Field(
        default_factory=list, description="Positions (from 0) of items the worker could not read."
    )
    queued: list[str] = Field(
        default_factory=list,
        description="Accepted items that wait behind earlier calls of their trajectory: their "
        "run starts later, and a 'started' notice says when.",
    )


class CancelRequest(BaseModel):
    item_ids: list[str]
    after_s: float | None = Field(
        default=None,
        description="Cancel only after this long, and only those items still waiting then: an "
        "executor that stops leaves a call with a uniq_id this long for its retry to join.",
    )


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"  # it was queued or running: stopped, its (cancelled) result follows
    # Another request of the same uniq_id waits for its run, which goes on: this item alone is
    # answered (a result saying so follows).
    DETACHED = "detached"
    DEFERRED = "deferred"  # asked with after_s: cancelled then, if it still waits
    FINISHED = "finished"  # it had finished: its result was published
    NOT_FOUND = "not_found"  # never arrived: remembered, so that it never runs


class CancelReply(BaseModel):
    outcomes: dict[str, CancelOutcome] = Field(default_factory=dict)


class ItemResult(BaseModel):
    """A tool call's ``result``, or an artifact operation's ``reply`` (its public shape); or,
    with ``started`` and neither, the notice that a queued call began to run."""

    item_id: str
    result: ToolResult | None = None
    reply: dict[str, Any] | None = None
    started: bool = False
    queue_wait_s: float | None = None  # from created_at until the tool started
    execution_s: float | None = None  # the tool's own run time
