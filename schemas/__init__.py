"""toolbus wire contract: pydantic models, subject names and error codes.

JSON Schema files generated from these models live in ``schemas/json/`` (``python -m schemas``
rewrites them; a test fails when they drift).
"""

from .errors import ErrorBody, ErrorCode, ErrorKind
from .messages import (
    ErrorKindOfResult,
    ExecuteRequest,
    FunctionSpec,
    PoolStatus,
    ReleaseReply,
    ReleaseRequest,
    StatusReply,
    ToolCall,
    ToolListReply,
    ToolResult,
    ToolSpec,
    WorkerStatus,
)
from .subjects import QUEUE_GROUP, SERVICE_NAME, Subjects
from .tools import BUILTIN_TOOLS, TOOL_ALIASES, canonical_tool_name

__all__ = [
    "BUILTIN_TOOLS",
    "QUEUE_GROUP",
    "SERVICE_NAME",
    "TOOL_ALIASES",
    "ErrorBody",
    "ErrorCode",
    "ErrorKind",
    "ErrorKindOfResult",
    "ExecuteRequest",
    "FunctionSpec",
    "PoolStatus",
    "ReleaseReply",
    "ReleaseRequest",
    "StatusReply",
    "Subjects",
    "ToolCall",
    "ToolListReply",
    "ToolResult",
    "ToolSpec",
    "WorkerStatus",
    "canonical_tool_name",
]
