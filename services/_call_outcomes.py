"""What a call's outcome says: the infra results the worker answers a call with itself (a
cancel, a refused or reused id), a retry's copy of an earlier outcome, and what a call's span
records of its result.
"""

from __future__ import annotations

from opentelemetry.trace import Span

from schemas.internal import ItemResult
from schemas.messages import ToolResult

from ._failures import infra_failure


def for_asker(outcome: ItemResult, item_id: str, *, replayed: bool) -> ItemResult:
    result = outcome.result
    if result is not None and replayed:
        result = result.model_copy(update={"metadata": {**result.metadata, "replayed": True}})
    return outcome.model_copy(update={"item_id": item_id, "result": result})


def refused_result(window_s: float, uniq_id: str | None) -> ToolResult:
    return infra_failure(
        "This call already ran (a call of the same uniq_id in this trajectory, within "
        f"{window_s:g}s), but its result is no longer held: the worker's memory for results "
        "was full. It was not run again; give it a new uniq_id to run it again",
        uniq_id=uniq_id,
        replayed=True,
    )


def cancelled_result(uniq_id: str | None = None, *, still_running: bool = False) -> ToolResult:
    if still_running:
        return infra_failure(
            "Stopped waiting for the call, which still runs for another request of the same "
            "uniq_id: a retry with that uniq_id gets its result",
            uniq_id=uniq_id,
            still_running=True,
        )
    return infra_failure(
        "Call cancelled: the trajectory was released, the call was given up on, or the worker "
        "stopped",
        uniq_id=uniq_id,
        cancelled=True,
    )


def reused_result(uniq_id: str | None) -> ToolResult:
    return infra_failure(
        f"uniq_id {uniq_id!r} was already used by another call of this trajectory (another "
        "tool or other arguments): this call did not run. Give each call an id of its own",
        uniq_id=uniq_id,
        uniq_id_reused=True,
    )


def succeeded(outcome: ItemResult) -> bool:
    if outcome.result is not None:
        return outcome.result.success
    return bool((outcome.reply or {}).get("success"))


def error_type(outcome: ItemResult) -> str:
    """``error.type`` of a failed call: the result's error kind (exit, timeout, ...)."""
    if outcome.result is not None:
        return str(outcome.result.metadata.get("error_kind") or "tool")
    return "artifact"


def error_message(outcome: ItemResult) -> str | None:
    if outcome.result is not None:
        return outcome.result.error
    error = (outcome.reply or {}).get("error")
    return str(error) if error is not None else None


def describe_result(span: Span, result: ToolResult) -> None:
    if not span.is_recording():
        return
    metadata = result.metadata
    attributes = {
        "toolbus.status": metadata.get("status"),
        "process.exit.code": metadata.get("exit_code"),
        "toolbus.sandboxed": metadata.get("sandboxed"),
        "toolbus.truncated": metadata.get("truncated"),
        "toolbus.output_bytes": (metadata.get("stdout_bytes") or 0)
        + (metadata.get("stderr_bytes") or 0),
        "toolbus.success": result.success,
    }
    span.set_attributes({key: value for key, value in attributes.items() if value is not None})
