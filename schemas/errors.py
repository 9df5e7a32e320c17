"""Error codes of the wire contract and the JSON body that goes with them.

A request that cannot be served gets a reply with the ADR-32 headers ``Nats-Service-Error``
(the message) and ``Nats-Service-Error-Code`` (the number below) and an :class:`ErrorBody`.
A tool that ran and failed is *not* an error here: it is a ``ToolResult`` with ``success: false``.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from pydantic import BaseModel, ConfigDict, Field


class ErrorCode(IntEnum):
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    PAYLOAD_TOO_LARGE = 413
    OVERLOADED = 429
    INTERNAL = 500
    NO_CAPACITY = 503


class ErrorKind(StrEnum):
    """Finer-grained reason, stable for programs to branch on."""

    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_TOOL = "unknown_tool"
    NO_ACTIVE_SLOT = "no_active_slot"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    OVERLOADED = "overloaded"  # the executor holds max_pending_calls calls already
    TOO_MANY_CALLS = "too_many_calls"  # this trajectory has max_calls_per_trajectory in flight
    NO_CAPACITY = "no_capacity"
    WORKER_UNAVAILABLE = "worker_unavailable"
    INTERNAL = "internal"


class ErrorBody(BaseModel):
    """JSON body of every error reply."""

    model_config = ConfigDict(extra="ignore")

    code: int = Field(description="HTTP-like status code, same as Nats-Service-Error-Code.")
    error: str = Field(description="Stable machine-readable kind, e.g. 'invalid_json'.")
    message: str = Field(description="What was wrong, for people.")
    retry_after_s: float | None = Field(
        default=None,
        description="Set on 429: seconds after which the same call is likely to be taken. "
        "A refused call did not run, so sending it again is safe.",
    )
