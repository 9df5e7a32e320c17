"""Public request and reply bodies: what a client in any language sends and gets back.

Field names follow the seed HTTP service (shared/PARITY.md). Requests reject unknown fields so a
typo gets a precise error; replies ignore unknown fields so clients survive additions.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_REQUEST = ConfigDict(extra="forbid")
_REPLY = ConfigDict(extra="ignore")

TrajectoryId = str


class ToolCall(BaseModel):
    """One tool call as an LLM produced it."""

    model_config = _REQUEST

    name: str = Field(min_length=1, max_length=128, description="Tool name, e.g. 'terminal'.")
    arguments: dict[str, Any] = Field(
        default_factory=dict,
        description="Tool arguments: an object, or a string holding a JSON object "
        "(as OpenAI tool calls carry them).",
    )
    uniq_id: str | None = Field(
        default=None, max_length=256, description="Caller's id for this call, echoed in the result."
    )

    @field_validator("arguments", mode="before")
    @classmethod
    def _decode_json_arguments(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"arguments is a string but not valid JSON: {exc.msg}") from None
        return value


class ExecuteRequest(BaseModel):
    """Body of ``tools.execute.<tool>``."""

    model_config = _REQUEST

    trajectory_id: TrajectoryId = Field(
        min_length=1, max_length=512, description="Rollout this call belongs to; owns one slot."
    )
    tool: ToolCall
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Wall-clock limit in seconds; else arguments.timeout; clamped to 1..600.",
    )
    allow_network: bool | None = Field(
        default=None,
        description="false: run this call without network (only loopback), even where the "
        "service allows it. It can only restrict: true never grants what the service denies.",
    )


class ErrorKindOfResult(StrEnum):
    """``metadata.error_kind`` of a failed ToolResult: what kind of failure it was."""

    EXIT = "exit"  # the command ran and exited non-zero
    TIMEOUT = "timeout"
    OUTPUT_LIMIT = "output_limit"
    DISK_LIMIT = "disk_limit"  # stopped because the workspaces' disk was nearly full
    SANDBOX = "sandbox"
    INVALID_ARGUMENTS = "invalid_arguments"  # the model's arguments were wrong
    TOOL = "tool"  # the tool refused or failed (missing file, path outside workspace, ...)
    INFRA = "infra"  # the service failed, not the tool: mask it out of rewards


class ToolResult(BaseModel):
    """Reply of ``tools.execute.<tool>``; a failed tool is ``success: false``, not an error."""

    model_config = _REPLY

    success: bool
    output: str = ""
    error: str = ""
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="exit_code, error_kind, timeout, sandboxed, network_isolated, duration_s, "
        "stdout_bytes, stderr_bytes, truncated, worker_id, slot, ...",
    )
    uniq_id: str | None = None


class ReleaseRequest(BaseModel):
    """Body of ``tools.release``: the trajectory is done with its slot."""

    model_config = _REQUEST

    trajectory_id: TrajectoryId = Field(min_length=1, max_length=512)
    reset_workspace: bool = Field(
        default=False, description="Wipe the workspace (and end its processes) before reuse."
    )


class ReleaseReply(BaseModel):
    model_config = _REPLY

    status: Literal["ok"] = "ok"
    worker_id: str | None = None
    slot: int | None = None


class WorkerStatus(BaseModel):
    model_config = _REPLY

    worker_id: str
    host: str
    slots_total: int
    slots_free: int
    age_s: float = Field(description="Seconds since the worker's last heartbeat.")


class PoolStatus(BaseModel):
    model_config = _REPLY

    total_slots: int
    available_slots: int
    acquired_slots: int
    containers: int = Field(description="Live sandbox workers (the seed called them containers).")
    slots_by_state: dict[str, int]
    started: bool


class CallRates(BaseModel):
    """Calls per second lately, as the answering executor counted them (totals show no trend)."""

    model_config = _REPLY

    calls_per_s_10s: float = Field(default=0.0, description="Calls per second, last 10 seconds.")
    calls_per_s_60s: float = Field(default=0.0, description="Calls per second, last 60 seconds.")
    errors_per_s_60s: float = Field(
        default=0.0,
        description="Calls that did not succeed (tool failures included) per second, last 60 "
        "seconds.",
    )


class StatusReply(BaseModel):
    """Reply of ``tools.status``; counters are those of the executor that answered."""

    model_config = _REPLY

    executor_id: str
    queue_size: int = Field(description="Calls waiting for or running on a worker.")
    total_requests: int
    total_errors: int
    pool: PoolStatus
    workers: list[WorkerStatus]
    rates: CallRates = Field(
        default_factory=CallRates,
        description="Recent call rates; zeros from an executor older than this field.",
    )


class FunctionSpec(BaseModel):
    model_config = _REPLY

    name: str
    description: str
    parameters: dict[str, Any]


class ToolSpec(BaseModel):
    """One tool in OpenAI function-calling format."""

    model_config = _REPLY

    type: Literal["function"] = "function"
    function: FunctionSpec


class ToolListReply(BaseModel):
    model_config = _REPLY

    tools: list[ToolSpec]
    aliases: dict[str, str] = Field(default_factory=dict, description="alias -> tool name")
