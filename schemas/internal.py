"""Messages between executors and sandbox workers (``toolbus.worker.<id>.*``).

Not a public contract, but versioned with the rest so executors and workers of one release agree.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from .messages import ToolResult


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


class Lease(BaseModel):
    """Value of a trajectory's key in the leases KV bucket."""

    worker_id: str
    slot: int
    acquired_at: float


class AcquireRequest(BaseModel):
    trajectory_id: str


class AcquireReply(BaseModel):
    """``slot`` is None when the worker has no free slot."""

    slot: int | None = None
    created: bool = False


class WorkerReleaseRequest(BaseModel):
    trajectory_id: str
    reset_workspace: bool = False


class WorkerReleaseReply(BaseModel):
    released: bool
    slot: int | None = None


class BatchItem(BaseModel):
    item_id: str
    trajectory_id: str
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


class BatchRequest(BaseModel):
    """Results come back one message per item on ``reply_to``; the request reply is an ack."""

    reply_to: str
    items: list[BatchItem]


class RejectReason(StrEnum):
    NO_SLOT = "no_slot"  # the worker holds no slot for the trajectory (released, or stale lease)
    STOPPING = "stopping"
    EXPIRED = "expired"  # the worker released the trajectory's slot after slot_idle_timeout_s


class BatchAck(BaseModel):
    rejected: dict[str, RejectReason] = Field(default_factory=dict)


class ItemResult(BaseModel):
    """A tool call's ``result``, or an artifact operation's ``reply`` (its public shape)."""

    item_id: str
    result: ToolResult | None = None
    reply: dict[str, Any] | None = None
    queue_wait_s: float | None = None  # from created_at until the tool started
    execution_s: float | None = None  # the tool's own run time
