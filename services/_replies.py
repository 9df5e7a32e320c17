"""Replying to NATS requests: JSON bodies, and ADR-32 error replies without tracebacks."""

from __future__ import annotations

from typing import TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from schemas.errors import ErrorKind
from schemas.messages import JSON_PARSER_MAX_DEPTH, MAX_JSON_DEPTH
from schemas.subjects import ERROR_CODE_HEADER, ERROR_HEADER

from ._validation import describe_validation_error
from .exceptions import BadRequest, PayloadTooLarge, ServiceError

_MAX_HEADER_CHARS = 1024
_TOO_DEEP = (
    "request body is nested too deeply: JSON arrays and objects may nest at most "
    f"{JSON_PARSER_MAX_DEPTH} levels (tool arguments at most {MAX_JSON_DEPTH})"
)

M = TypeVar("M", bound=BaseModel)


async def reply_json(nc: Client, msg: Msg, body: bytes) -> None:
    if msg.reply:
        await nc.publish(msg.reply, body)


async def reply_error(nc: Client, msg: Msg, error: ServiceError) -> None:
    if not msg.reply:
        return
    # A header value is one line; the body carries the full message.
    header = " ".join(error.message.split())[:_MAX_HEADER_CHARS]
    await nc.publish(
        msg.reply,
        error.body().model_dump_json(exclude_none=True).encode(),  # retry_after_s: 429 only
        headers={ERROR_HEADER: header, ERROR_CODE_HEADER: str(int(error.code))},
    )


def parse_request(model: type[M], data: bytes, *, max_bytes: int) -> M:
    """Validate a request body, raising 413 or 400 with a precise message."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(data)} bytes; the limit is {max_bytes}")
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            if error["type"] == "json_invalid":
                raise BadRequest(_json_problem(error["msg"]), kind=ErrorKind.INVALID_JSON) from None
        raise BadRequest(f"invalid {model.__name__}: {describe_validation_error(exc)}") from None


def _json_problem(parser_message: str) -> str:
    """The parser's own words (where it stopped), never a second parse: that one could recurse."""
    problem = parser_message.removeprefix("Invalid JSON: ")
    if problem.startswith("recursion limit exceeded"):
        return _TOO_DEEP
    return f"request body is not valid JSON: {problem}"
