"""External tools: calls of tools toolbus does not run itself (web search, browsing, vision, ...).

The executor forwards a call of a tool that is not built in, first to a NATS service on
``tools.external.<name>`` (any language can provide a tool this way: answer the same
ExecuteRequest body with a ToolResult), then, when none answers and ``tool_server_url`` is set,
to the seed's HTTP tool server (``POST {tool_server_url}/execute``). A tool nobody provides is
still ``404 Unknown tool``. A provider that fails, or answers nonsense, gives an ``infra`` result
saying so; a provider's own ADR-32 error is the tool's failure.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.error
import urllib.request
from typing import Any

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import ValidationError

from observability import tracing
from schemas.errors import ErrorBody
from schemas.internal import Lease
from schemas.messages import ErrorKindOfResult, ExecuteRequest, ToolResult
from schemas.subjects import ERROR_CODE_HEADER, ERROR_HEADER

DEFAULT_GRACE_S = 10.0  # beyond the call's timeout, for the provider's own overhead
_MAX_HTTP_REPLY_BYTES = 16 * 1024 * 1024


def _failure(message: str, kind: ErrorKindOfResult, **metadata: Any) -> ToolResult:
    return ToolResult(success=False, error=message, metadata={"error_kind": str(kind), **metadata})


class ExternalTools:
    def __init__(
        self,
        nc: Client,
        *,
        subject_prefix: str,
        server_url: str | None = None,
        server_token: str | None = None,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self._nc = nc
        self._prefix = subject_prefix  # e.g. "tools.external"
        self._server_url = server_url.rstrip("/") if server_url else None
        self._server_token = server_token
        self._grace_s = grace_s

    async def call(
        self, request: ExecuteRequest, *, timeout_s: float, lease: Lease | None
    ) -> ToolResult | None:
        """The provider's result, or None when no provider has the tool."""
        name = request.tool.name
        result = await self._over_nats(request, timeout_s)
        if result is None and self._server_url is not None:
            result = await asyncio.to_thread(self._over_http, request, timeout_s, lease)
        if result is not None:
            result.uniq_id = request.tool.uniq_id
            result.metadata.setdefault("external", True)
            result.metadata.setdefault("tool", name)
        return result

    # -- NATS -------------------------------------------------------------------------------------
    async def _over_nats(self, request: ExecuteRequest, timeout_s: float) -> ToolResult | None:
        name = request.tool.name
        subject = f"{self._prefix}.{name}"
        body = request.model_copy(update={"timeout_s": timeout_s}).model_dump_json().encode()
        try:
            # One try: no responders is the usual answer here (the tool is simply not there).
            msg = await self._nc.request(
                subject,
                body,
                timeout=timeout_s + self._grace_s,
                headers=tracing.current_trace_headers(),
            )
        except NoRespondersError:
            return None
        except NatsTimeoutError:
            return _failure(
                f"External tool {name} did not answer within {timeout_s + self._grace_s:g}s",
                ErrorKindOfResult.INFRA,
            )
        headers = msg.headers or {}
        if ERROR_CODE_HEADER in headers:
            try:
                reason = ErrorBody.model_validate_json(msg.data).message
            except ValidationError:
                reason = headers.get(ERROR_HEADER, "")
            return _failure(
                f"{name}: {reason}",
                ErrorKindOfResult.TOOL,
                provider_error_code=int(headers[ERROR_CODE_HEADER]),
            )
        return _as_result(name, msg.data)

    # -- HTTP (the seed's tool server) ------------------------------------------------------------
    def _over_http(
        self, request: ExecuteRequest, timeout_s: float, lease: Lease | None
    ) -> ToolResult | None:
        """In a thread: POST {tool_server_url}/execute; a 404 means it has no such tool."""
        name = request.tool.name
        payload = {
            "trajectory_id": request.trajectory_id,
            "tool": request.tool.model_dump(),
            "timeout_s": timeout_s,
            "slot": None if lease is None else {"worker_id": lease.worker_id, "slot": lease.slot},
        }
        http_request = urllib.request.Request(
            f"{self._server_url}/execute",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        if self._server_token:
            http_request.add_header("Authorization", f"Bearer {self._server_token}")
        try:
            with urllib.request.urlopen(http_request, timeout=timeout_s + self._grace_s) as reply:
                data = reply.read(_MAX_HTTP_REPLY_BYTES + 1)
                # A bounded read stops short at the end of the stream without a word when
                # less came than the Content-Length announced: what is still owed.
                missing = reply.length or 0
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            return _failure(
                f"The tool server answered {exc.code} {exc.reason} for {name}",
                ErrorKindOfResult.INFRA,
                http_status=exc.code,
            )
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            return _failure(
                f"The tool server could not be reached for {name}: {reason}",
                ErrorKindOfResult.INFRA,
            )
        except http.client.IncompleteRead:  # a chunked reply that ended inside a chunk
            return _failure(
                f"The tool server's reply for {name} broke off before its end",
                ErrorKindOfResult.INFRA,
            )
        except http.client.HTTPException:  # a bad status line, bad headers, ...
            return _failure(
                f"The tool server's reply for {name} is not valid HTTP", ErrorKindOfResult.INFRA
            )
        if len(data) > _MAX_HTTP_REPLY_BYTES:
            return _failure(
                f"The tool server's reply for {name} is over {_MAX_HTTP_REPLY_BYTES} bytes",
                ErrorKindOfResult.INFRA,
            )
        if missing:
            return _failure(
                f"The tool server's reply for {name} broke off before its end: {len(data)} of "
                f"the {len(data) + missing} bytes it announced arrived",
                ErrorKindOfResult.INFRA,
            )
        return _as_result(name, data)


def _as_result(name: str, data: bytes) -> ToolResult:
    try:
        return ToolResult.model_validate_json(data)
    except ValidationError:
        return _failure(
            f"External tool {name} answered with something that is not a tool result",
            ErrorKindOfResult.INFRA,
        )
