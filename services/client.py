"""Async Python client: ``execute``, ``release``, ``status`` and ``list_tools`` over NATS.

    async with ToolbusClient.connect("nats://127.0.0.1:4222") as client:
        result = await client.execute("traj-1", "terminal", {"command": "ls"})

Service errors raise the classes of :mod:`services.exceptions` (``NotFound``, ``NoCapacity``, ...);
a tool that ran and failed is a ``ToolResult`` with ``success=False``, not an exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ValidationError

from schemas.errors import ErrorBody
from schemas.messages import (
    ExecuteRequest,
    ReleaseReply,
    ReleaseRequest,
    StatusReply,
    ToolCall,
    ToolListReply,
    ToolResult,
)
from schemas.subjects import (
    AUTHORIZATION_HEADER,
    DEFAULT_PREFIX,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    Subjects,
)

from ._requests import nats_request
from .exceptions import NoCapacity, RequestTimeout, ServiceError
from .settings import DEFAULT_ACQUIRE_TIMEOUT_S, MAX_TIMEOUT_S

DEFAULT_REQUEST_TIMEOUT_S = 30.0
# An execute waits for a slot, then for the command: allow both, plus transfer time.
DEFAULT_EXECUTE_MARGIN_S = DEFAULT_ACQUIRE_TIMEOUT_S + 15.0

R = TypeVar("R", bound=BaseModel)


class ToolbusClient:
    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = DEFAULT_PREFIX,
        token: str | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        execute_margin_s: float = DEFAULT_EXECUTE_MARGIN_S,
    ) -> None:
        self._nc = nc
        self._subjects = Subjects(prefix=prefix)
        self._headers = {AUTHORIZATION_HEADER: f"Bearer {token}"} if token else None
        self._request_timeout_s = request_timeout_s
        self._execute_margin_s = execute_margin_s

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, **options: Any) -> AsyncIterator[ToolbusClient]:
        """Connect to NATS, yield a client, drain the connection on exit."""
        nc = await nats.connect(url, name="toolbus-client")
        try:
            yield cls(nc, **options)
        finally:
            await nc.drain()

    @property
    def nc(self) -> Client:
        return self._nc

    async def execute(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        uniq_id: str | None = None,
        timeout_s: float | None = None,
        allow_network: bool | None = None,
    ) -> ToolResult:
        request = ExecuteRequest(
            trajectory_id=trajectory_id,
            tool=ToolCall(name=tool, arguments=arguments or {}, uniq_id=uniq_id),
            timeout_s=timeout_s,
            allow_network=allow_network,
        )
        wait = (timeout_s or MAX_TIMEOUT_S) + self._execute_margin_s
        return await self._call(self._subjects.execute(tool), request, ToolResult, wait)

    async def release(self, trajectory_id: str, *, reset_workspace: bool = False) -> ReleaseReply:
        request = ReleaseRequest(trajectory_id=trajectory_id, reset_workspace=reset_workspace)
        return await self._call(self._subjects.release, request, ReleaseReply)

    async def status(self) -> StatusReply:
        return await self._call(self._subjects.status, None, StatusReply)

    async def list_tools(self) -> ToolListReply:
        return await self._call(self._subjects.list_tools, None, ToolListReply)

    async def request_raw(
        self, subject: str, body: bytes, *, timeout_s: float | None = None
    ) -> bytes:
        """Send a raw body; return the reply body or raise the error it carried."""
        try:
            msg = await nats_request(
                self._nc,
                subject,
                body,
                timeout=timeout_s or self._request_timeout_s,
                headers=self._headers,
            )
        except NoRespondersError:
            raise NoCapacity(
                f"no toolbus executor listens on {subject!r}: is `toolbus serve` running?",
                kind="no_responders",
            ) from None
        except NatsTimeoutError:
            raise RequestTimeout(f"no reply on {subject!r} within {timeout_s}s") from None
        headers = msg.headers or {}
        if ERROR_CODE_HEADER in headers:
            try:
                body_model: ErrorBody | None = ErrorBody.model_validate_json(msg.data)
            except ValidationError:
                body_model = None
            raise ServiceError.from_reply(
                int(headers[ERROR_CODE_HEADER]), body_model, headers.get(ERROR_HEADER, "")
            )
        return msg.data

    async def _call(
        self,
        subject: str,
        request: BaseModel | None,
        reply_model: type[R],
        timeout_s: float | None = None,
    ) -> R:
        body = request.model_dump_json(exclude_none=True).encode() if request else b""
        data = await self.request_raw(subject, body, timeout_s=timeout_s)
        return reply_model.model_validate_json(data)
