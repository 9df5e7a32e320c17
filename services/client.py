"""Async Python client: tool calls, artifacts, release, status and the tool list over NATS.

    async with ToolbusClient.connect("nats://127.0.0.1:4222") as client:
        archive = await client.put_archive(Path("task.tar.gz"))    # once, for many trajectories
        await client.upload_archive("traj-1", archive)               # unpacked in its workspace
        result = await client.execute("traj-1", "terminal", {"command": "ls"})
        packed = await client.archive_artifacts("traj-1", "results")
        await client.fetch_artifact(packed.object, Path("results.tar.gz"))

Service errors raise the classes of :mod:`services.exceptions` (``NotFound``, ``NoCapacity``, ...);
a tool that ran and failed is a ``ToolResult`` with ``success=False``, not an exception.
"""

from __future__ import annotations

import io
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import nats
import pydantic_core
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, ValidationError

from observability import tracing
from schemas.artifacts import (
    ArchiveFormat,
    ArtifactArchiveReply,
    ArtifactArchiveRequest,
    ArtifactListReply,
    ArtifactListRequest,
    ArtifactReadReply,
    ArtifactReadRequest,
    ArtifactUploadReply,
    ArtifactUploadRequest,
    ObjectRef,
)
from schemas.errors import ErrorBody
from schemas.messages import (
    ReleaseReply,
    ReleaseRequest,
    StatusReply,
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

from ._objects import StoredObject, fetch_object, put_object
from ._requests import Requester, nats_request
from .exceptions import NoCapacity, RequestTimeout, ServiceError
from .settings import (
    DEFAULT_ACQUIRE_TIMEOUT_S,
    DEFAULT_ARTIFACT_TIMEOUT_S,
    DEFAULT_ARTIFACTS_BUCKET,
    MAX_TIMEOUT_S,
)

DEFAULT_REQUEST_TIMEOUT_S = 30.0
# An execute waits for a slot, then for the command: allow both, plus transfer time.
DEFAULT_EXECUTE_MARGIN_S = DEFAULT_ACQUIRE_TIMEOUT_S + 15.0
_OWN_ID_PREFIX = "toolbus-client-"  # of the ids the client gives calls that have none

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")


class ToolbusClient:
    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = DEFAULT_PREFIX,
        token: str | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        execute_margin_s: float = DEFAULT_EXECUTE_MARGIN_S,
        artifacts_bucket: str = DEFAULT_ARTIFACTS_BUCKET,
    ) -> None:
        self._nc = nc
        self._requester = Requester(nc)
        self._artifacts_bucket = artifacts_bucket
        self._subjects = Subjects(prefix=prefix)
        self._headers = {AUTHORIZATION_HEADER: f"Bearer {token}"} if token else None
        self._request_timeout_s = request_timeout_s
        self._execute_margin_s = execute_margin_s
        # Ids of calls that come without one: this client's own prefix and a count.
        self._own_ids = f"{_OWN_ID_PREFIX}{uuid.uuid4().hex}-"
        self._own_count = itertools.count(1)

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
        image: str | None = None,
    ) -> ToolResult:
        """Run a tool call in the trajectory's slot; ``image`` names what a new slot is made
        from (README, Images)."""
        # An ExecuteRequest's JSON, written directly: validating it here as well as in the
        # executor cost more than the rest of the client's work on a call. The executor's
        # answer to a bad value is as precise (a BadRequest naming the field).
        # Every call has an id, so that sending it again after a reconnect runs nothing twice
        # (the worker answers a repeat of an id with the first run's result).
        call: dict[str, Any] = {
            "name": tool,
            "arguments": arguments or {},
            "uniq_id": f"{self._own_ids}{next(self._own_count)}" if uniq_id is None else uniq_id,
        }
        request: dict[str, Any] = {"trajectory_id": trajectory_id, "tool": call}
        if timeout_s is not None:
            request["timeout_s"] = timeout_s
        if allow_network is not None:
            request["allow_network"] = allow_network
        if image is not None:
            request["image"] = image
        body = pydantic_core.to_json(request)
        wait = (timeout_s or MAX_TIMEOUT_S) + self._execute_margin_s
        result = await self._traced(
            self._subjects.execute(tool),
            body,
            wait,
            ToolResult.model_validate_json,
            resend_on_reconnect=True,
        )
        if uniq_id is None:
            result.uniq_id = None  # the caller gave none: ours is not its business
        return result

    # -- artifacts ----------------------------------------------------------------------------
    async def read_artifact(
        self,
        trajectory_id: str,
        path: str,
        *,
        encoding: str = "text",
        max_bytes: int | None = None,
        include_sha256: bool = False,
        timeout_s: float | None = None,
    ) -> ArtifactReadReply:
        """Small files come back in ``content``; large ones as ``object`` (see fetch_artifact)."""
        request = ArtifactReadRequest.model_validate(
            {
                "trajectory_id": trajectory_id,
                "path": path,
                "encoding": encoding,
                "max_bytes": max_bytes,
                "include_sha256": include_sha256,
                "timeout_s": timeout_s,
            }
        )
        return await self._artifact_call("read", request, ArtifactReadReply, timeout_s)

    async def list_artifacts(
        self,
        trajectory_id: str,
        path: str = ".",
        *,
        recursive: bool = False,
        max_entries: int | None = None,
        timeout_s: float | None = None,
    ) -> ArtifactListReply:
        request = ArtifactListRequest(
            trajectory_id=trajectory_id,
            path=path,
            recursive=recursive,
            max_entries=max_entries,
            timeout_s=timeout_s,
        )
        return await self._artifact_call("list", request, ArtifactListReply, timeout_s)

    async def archive_artifacts(
        self,
        trajectory_id: str,
        path: str = ".",
        *,
        format: ArchiveFormat = "tar.gz",
        max_bytes: int | None = None,
        max_entries: int | None = None,
        timeout_s: float | None = None,
    ) -> ArtifactArchiveReply:
        """Archive a directory of the workspace into the Object Store; ``object`` says where."""
        request = ArtifactArchiveRequest(
            trajectory_id=trajectory_id,
            path=path,
            format=format,
            max_bytes=max_bytes,
            max_entries=max_entries,
            timeout_s=timeout_s,
        )
        return await self._artifact_call("archive", request, ArtifactArchiveReply, timeout_s)

    async def put_archive(
        self, source: Path | bytes | BinaryIO, *, name: str | None = None
    ) -> ObjectRef:
        """Put a tar (or tar.gz) archive into the artifacts bucket, for ``upload_archive``.

        One archive can be unpacked into any number of trajectories' workspaces.
        """
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        name = name or f"uploads/{uuid.uuid4().hex}"
        stored = await put_object(self._nc.jetstream(), self._artifacts_bucket, name, source)
        return ObjectRef(
            bucket=stored.bucket, name=stored.name, size=stored.size, sha256=stored.sha256
        )

    async def upload_archive(
        self,
        trajectory_id: str,
        archive: ObjectRef | Path | bytes | BinaryIO,
        *,
        path: str = ".",
        timeout_s: float | None = None,
    ) -> ArtifactUploadReply:
        """Unpack an archive into the trajectory's workspace (taking a slot if it has none)."""
        ref = archive if isinstance(archive, ObjectRef) else await self.put_archive(archive)
        request = ArtifactUploadRequest(
            trajectory_id=trajectory_id,
            name=ref.name,
            bucket=ref.bucket,
            path=path,
            sha256=ref.sha256,
            timeout_s=timeout_s,
        )
        return await self._artifact_call("upload", request, ArtifactUploadReply, timeout_s)

    async def fetch_artifact(
        self, ref: ObjectRef, destination: Path | BinaryIO, *, timeout_s: float | None = None
    ) -> StoredObject:
        """Stream an artifact from the Object Store to a file, checking its SHA-256.

        Much faster than nats-py's ``ObjectStore.get`` for large objects; a failed fetch
        leaves no partial file at a ``Path`` destination.
        """
        return await fetch_object(
            self._nc.jetstream(),
            ref.bucket,
            ref.name,
            destination,
            expected_sha256=ref.sha256,
            timeout_s=timeout_s or DEFAULT_ARTIFACT_TIMEOUT_S,
        )

    async def _artifact_call(
        self, operation: str, request: BaseModel, reply_model: type[R], timeout_s: float | None
    ) -> R:
        wait = (timeout_s or DEFAULT_ARTIFACT_TIMEOUT_S) + self._execute_margin_s
        return await self._call(self._subjects.artifacts(operation), request, reply_model, wait)

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
        return await self._traced(subject, body, timeout_s, lambda data: data)

    async def _traced(
        self,
        subject: str,
        body: bytes,
        timeout_s: float | None,
        parse: Callable[[bytes], T],
        *,
        resend_on_reconnect: bool = False,
    ) -> T:
        """The request as a CLIENT span whose context travels in the ``traceparent`` header,
        so the service's spans join the caller's trace; a failed call marks it as an error.
        ``resend_on_reconnect``: see ``Requester.request``."""
        with tracing.span(
            f"send {subject}",
            kind=SpanKind.CLIENT,
            attributes=lambda: tracing.nats_attributes(
                subject, "send", **{tracing.MESSAGING_BODY_SIZE: len(body)}
            ),
        ) as span:
            try:
                reply = parse(await self._request(subject, body, timeout_s, resend_on_reconnect))
            except ServiceError as error:
                tracing.mark_error(span, error.kind, error.message)
                raise
            except RequestTimeout as error:
                tracing.mark_error(span, "timeout", str(error))
                raise
            if isinstance(reply, ToolResult) and not reply.success:
                kind = str(reply.metadata.get("error_kind") or "tool")
                tracing.mark_error(span, kind, reply.error)
            elif getattr(reply, "success", True) is False:
                tracing.mark_error(span, "artifact", getattr(reply, "error", None))
            return reply

    async def _request(
        self, subject: str, body: bytes, timeout_s: float | None, resend_on_reconnect: bool
    ) -> bytes:
        wait_s = timeout_s or self._request_timeout_s
        try:
            msg = await nats_request(
                self._nc,
                subject,
                body,
                timeout=wait_s,
                headers=(
                    tracing.inject_context(self._headers) or None
                    if tracing.enabled()
                    else self._headers
                ),
                requester=self._requester,
                resend_on_reconnect=resend_on_reconnect,
            )
        except NoRespondersError:
            raise NoCapacity(
                f"no toolbus executor listens on {subject!r}: is `toolbus serve` running?",
                kind="no_responders",
            ) from None
        except NatsTimeoutError:
            raise RequestTimeout(f"no reply on {subject!r} within {wait_s:g}s") from None
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
        return await self._traced(subject, body, timeout_s, reply_model.model_validate_json)
