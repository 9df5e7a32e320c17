"""What a caller hears when the service failed and not the tool: ``infra`` results.

RL trainers mask these out of rewards (README, "Failures"). A lost workspace is said with why
(``lost_reason``), so a trainer can tell an expired slot from a worker that went away.
"""

from __future__ import annotations

from typing import Any

from schemas.internal import Lease, LostReason
from schemas.messages import ErrorKindOfResult, ToolResult


def infra_failure(message: str, *, uniq_id: str | None = None, **metadata: Any) -> ToolResult:
    return ToolResult(
        success=False,
        error=message,
        metadata={"error_kind": str(ErrorKindOfResult.INFRA), **metadata},
        uniq_id=uniq_id,
    )


_LOST_BECAUSE = {
    LostReason.EXPIRED: "was released after slot_idle_timeout_s without a call, and its "
    "workspace wiped",
    LostReason.WORKER_STOPPED: "is on a sandbox worker that stopped",
    LostReason.WORKER_EXPIRED: "was given up by a sandbox worker that lost its registration",
    LostReason.WORKER_GONE: "is on a sandbox worker that is gone",
    LostReason.WORKER_DRAINED: "was on a sandbox worker taken out of service (scale-down) that "
    "could not wait longer for the trajectory to end",
    LostReason.UNREADABLE: "cannot be found (its lease is unreadable)",
}


def workspace_lost(lease: Lease, uniq_id: str | None) -> ToolResult:
    reason = lease.lost or LostReason.WORKER_GONE
    metadata: dict[str, Any] = {"worker_id": lease.worker_id, "workspace_lost": True}
    if reason is LostReason.EXPIRED:
        metadata["expired"] = True
    return infra_failure(
        f"This trajectory's slot {_LOST_BECAUSE[reason]}; the workspace is lost and the next "
        "call starts in a new one",
        uniq_id=uniq_id,
        lost_reason=str(reason),
        **metadata,
    )
