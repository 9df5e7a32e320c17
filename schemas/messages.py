"""Public request and reply bodies: what a client in any language sends and gets back.

Field names follow the seed HTTP service (shared/PARITY.md). Requests reject unknown fields so a
typo gets a precise error; replies ignore unknown fields so clients survive additions.

Numbers in requests are JSON numbers: a boolean or a numeric string is refused, not read as 1 or
a number (float fields take integers; they refuse infinities and NaN). Free-form JSON in a request
(``tool.arguments``) nests at most :data:`MAX_JSON_DEPTH` levels.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    field_validator,
)
from pydantic_core import PydanticCustomError

_REQUEST = ConfigDict(extra="forbid")
_REPLY = ConfigDict(extra="ignore")

TrajectoryId = str

# Most levels of arrays and objects in free-form JSON of a request (``tool.arguments``, itself
# the first level). Far below what the parsers between here and a sandbox can read (see
# JSON_PARSER_MAX_DEPTH): on its way to a worker a call gains levels (batch, item), and a call
# the worker cannot read would fail its whole batch.
MAX_JSON_DEPTH = 32

# Levels of nested arrays and objects pydantic-core's JSON parser (jiter) reads: its
# DEFAULT_RECURSION_LIMIT. (An empty innermost [] or {} is not counted.) A test pins it.
JSON_PARSER_MAX_DEPTH = 200


_CONTAINERS = (dict, list, tuple)


def json_nesting_exceeds(value: object, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest more than ``limit`` levels (``[]`` is one).

    Level by level, without recursion: a value of any depth is safe to check.
    """
    if limit >= 1 and isinstance(value, dict):
        for child in value.values():
            if isinstance(child, _CONTAINERS):
                break
        else:
            return False  # a flat object, as most tool arguments are: one level
    level = [value]
    for _ in range(limit + 1):
        containers = [node for node in level if isinstance(node, _CONTAINERS)]
        if not containers:
            return False
        level = [
            child
            for node in containers
            for child in (node.values() if isinstance(node, dict) else node)
        ]
    return True


# Number fields of requests and tool arguments: strict, or true would read as 1 and "60" as 60.
# A strict float still takes an integer; a strict integer takes no float (not even 2.0).
JsonFloat = Annotated[float, Strict(), AllowInfNan(False)]
JsonInt = Annotated[int, Strict()]


class ToolCall(BaseModel):
    """One tool call as an LLM produced it."""

    model_config = _REQUEST

    name: str = Field(min_length=1, max_length=128, description="Tool name, e.g. 'terminal'.")
    arguments: dict[str, Any] = Field(
        default_factory=dict,
        description="Tool arguments: an object, or a string holding a JSON object "
        f"(as OpenAI tool calls carry them); arrays and objects nest at most {MAX_JSON_DEPTH} "
        "levels, the arguments object being the first.",
    )
    uniq_id: str | None = Field(
        default=None,
        max_length=256,
        description="Caller's id for this call, unique within its trajectory, echoed in the "
        "result. A repeat of the id within the retry window runs nothing: it gets the first "
        "run's result (README, Failures).",
    )

    @field_validator("arguments", mode="before")
    @classmethod
    def _decode_json_arguments(cls, value: Any) -> Any:
        # The body's own parser, not json.loads: no Python recursion, no lone surrogates.
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                return pydantic_core.from_json(value)
            except ValueError as exc:
                raise PydanticCustomError(
                    "arguments_not_json",
                    "arguments is a string but not valid JSON: {problem}",
                    {"problem": str(exc)},
                ) from None
        return value

    @field_validator("arguments")
    @classmethod
    def _limit_nesting(cls, value: dict[str, Any]) -> dict[str, Any]:
        if json_nesting_exceeds(value, MAX_JSON_DEPTH):
            raise PydanticCustomError(
                "json_too_deep",
                "JSON arrays and objects nested too deeply: at most {limit} levels",
                {"limit": MAX_JSON_DEPTH},
            )
        return value


class ExecuteRequest(BaseModel):
    """Body of ``tools.execute.<tool>``."""

    model_config = _REQUEST

    trajectory_id: TrajectoryId = Field(
        min_length=1, max_length=512, description="Rollout this call belongs to; owns one slot."
    )
    tool: ToolCall
    timeout_s: JsonFloat | None = Field(
        default=None,
        gt=0,
        description="Wall-clock limit in seconds; else arguments.timeout; clamped to 1..600.",
    )
    allow_network: bool | None = Field(
        default=None,
        description="false: run this call without network (only loopback), even where the "
        "service allows it. It can only restrict: true never grants what the service denies.",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="The image the trajectory's slot is made from, on the call that gets the "
        "slot: a registry image (python:3.12-slim, host:5000/team/task@sha256:...), "
        "oci:<dir>[:tag] or docker-archive:<file>[:repo:tag] on the worker's host. Without "
        "one the slot is the default environment. A later call naming another image than the "
        "slot's is refused.",
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
    slots_warm: int = Field(default=0, description="Free slots whose sandbox is started.")
    slots_held: int | None = Field(
        default=None, description="Slots trajectories hold (None: the worker does not say)."
    )
    state: Literal["serving", "draining", "drained"] = Field(
        default="serving",
        description="draining: taken out of service (a scale-down); it gives no slot to a new "
        "trajectory and serves those it holds; drained: it holds none and is about to stop.",
    )


class PoolStatus(BaseModel):
    model_config = _REPLY

    total_slots: int
    available_slots: int
    acquired_slots: int
    containers: int = Field(description="Live sandbox workers (the seed called them containers).")
    slots_by_state: dict[str, int]
    started: bool
    warm_slots: int = Field(
        default=0, description="Of the available slots, those whose sandbox is started."
    )


class WaitingStatus(BaseModel):
    """Trajectories waiting for a slot (all slots in use)."""

    model_config = _REPLY

    trajectories: int = Field(
        default=0, description="Waiting now, through every executor (the waiting queue's length)."
    )
    longest_wait_s: float = Field(
        default=0.0, description="How long the first in the queue has waited so far."
    )


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
    waiting: WaitingStatus = Field(
        default_factory=WaitingStatus,
        description="Trajectories waiting for a slot; zeros from an executor older than this.",
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
