"""Artifact operations of a sandbox worker: read, list, archive, upload.

The worker never touches a workspace's files itself for these: a process the agent left running
could swap a path for a symlink to a host file between a check and its use. Each operation runs
``_artifact_helper.py`` inside the slot's sandbox, as the slot's user, so it can reach nothing the
agent's own commands could not (``_artifact_process`` runs it). The worker moves the bytes: small
reads come back inline, large ones and every archive go to the Object Store, and an upload is
fetched from it into a scratch file that the helper reads as its stdin. A read comes inline only
when its whole reply, as JSON, fits in :data:`MAX_REPLY_JSON_BYTES`: text can take six times its
bytes there (``\\u0000``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, ObjectDeletedError, ObjectNotFoundError
from pydantic import BaseModel

from schemas.artifacts import (
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

from ._artifact_process import ArtifactFailure, run_helper
from ._files import from_sandbox_path
from ._objects import (
    DEFAULT_TIMEOUT_S,
    ObjectCorrupt,
    ObjectNotFound,
    ObjectTimeout,
    ObjectTooLarge,
    StoredObject,
    fetch_object,
    open_object_store,
    put_object,
)
from ._sandbox import Sandbox, SandboxError
from .settings import (
    DEFAULT_ARTIFACT_INLINE_BYTES,
    DEFAULT_ARTIFACTS_BUCKET,
    DEFAULT_ARTIFACTS_TTL_S,
    DEFAULT_MAX_ARTIFACT_BYTES,
    DEFAULT_MAX_ARTIFACT_ENTRIES,
    DEFAULT_MAX_UPLOAD_ENTRIES,
    DEFAULT_MAX_UPLOAD_MB,
)

log = structlog.get_logger("toolbus.artifacts")

# The most a reply may take as JSON (UTF-8): it travels as one NATS message, inside the worker's
# and the executor's envelopes, and NATS's default max_payload is 1 MiB. A read whose reply
# would be larger goes to the Object Store; a listing is cut.
MAX_REPLY_JSON_BYTES = 512 * 1024
# Bounds of what an archive may add to its file bytes: per entry a header, a PAX header for a
# long or non-ASCII name (up to 4 KiB) and padding; at the end, tar's minimum size.
_ARCHIVE_OVERHEAD_PER_ENTRY = 6 * 1024
_ARCHIVE_OVERHEAD = 10 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtifactLimits:
    max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    max_entries: int = DEFAULT_MAX_ARTIFACT_ENTRIES
    inline_bytes: int = DEFAULT_ARTIFACT_INLINE_BYTES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    max_upload_entries: int = DEFAULT_MAX_UPLOAD_ENTRIES


class ArtifactRunner:
    """Runs artifact operations in slots' sandboxes; knows nothing of slots or leases."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        scratch: Path,
        bucket: str = DEFAULT_ARTIFACTS_BUCKET,
        ttl_s: float = DEFAULT_ARTIFACTS_TTL_S,
        limits: ArtifactLimits = ArtifactLimits(),
    ) -> None:
        self._js = js
        self._scratch = scratch
        self._bucket = bucket
        self._ttl_s = ttl_s
        self._limits = limits

    async def start(self) -> None:
        self._scratch.mkdir(parents=True, exist_ok=True)
        self._scratch.chmod(0o700)
        await open_object_store(
            self._js, self._bucket, ttl_s=self._ttl_s or None, description="toolbus artifacts"
        )

    async def run(
        self,
        operation: str,
        arguments: dict[str, Any],
        sandbox: Sandbox,
        trajectory_id: str,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """The operation's public reply (``success: false`` and ``error`` when it failed).

        ``timeout_s`` bounds the whole operation: each Object Store transfer gets the time
        left of it, and the helper is killed when it runs out; the reply then says the
        operation timed out. Without it each transfer has ``DEFAULT_TIMEOUT_S`` and the caller
        bounds the rest (on cancellation the helper is killed too).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                return await self._run(operation, arguments, sandbox, trajectory_id, deadline)
        except ObjectTimeout as exc:
            if timeout_s is None:  # a transfer's own DEFAULT_TIMEOUT_S
                return {"success": False, "error": str(exc)}
            return _timed_out(operation, timeout_s)  # the budget's deadline, timed by a transfer
        except TimeoutError:
            if timeout_s is not None and scope.expired():
                return _timed_out(operation, timeout_s)
            raise
        except (ArtifactFailure, ObjectNotFound, ObjectCorrupt, ObjectTooLarge) as exc:
            return {"success": False, "error": str(exc)}
        except SandboxError as exc:
            return {"success": False, "error": f"Sandbox failure: {exc}"}

    async def _run(
        self,
        operation: str,
        arguments: dict[str, Any],
        sandbox: Sandbox,
        trajectory_id: str,
        deadline: float | None,
    ) -> dict[str, Any]:
        fields = {"trajectory_id": trajectory_id, **arguments}
        budget = _Budget(deadline)
        if operation == "read":
            return await self._read(ArtifactReadRequest.model_validate(fields), sandbox, budget)
        if operation == "list":
            return await self._list(ArtifactListRequest.model_validate(fields), sandbox)
        if operation == "archive":
            return await self._archive(
                ArtifactArchiveRequest.model_validate(fields), sandbox, budget
            )
        if operation == "upload":
            return await self._upload(ArtifactUploadRequest.model_validate(fields), sandbox, budget)
        raise ArtifactFailure(f"Unknown artifact operation: {operation}")

    # -- operations ---------------------------------------------------------------------------
    async def _read(
        self, request: ArtifactReadRequest, sandbox: Sandbox, budget: _Budget
    ) -> dict[str, Any]:
        max_bytes = min(request.max_bytes or self._limits.max_bytes, self._limits.max_bytes)
        digest = hashlib.sha256()
        with tempfile.SpooledTemporaryFile(
            max_size=self._limits.inline_bytes, mode="w+b", dir=str(self._scratch)
        ) as spool:

            def keep(chunk: bytes) -> None:
                spool.write(chunk)
                digest.update(chunk)

            summary = await run_helper(
                sandbox,
                "read",
                {"path": from_sandbox_path(request.path), "max_bytes": max_bytes},
                sink=keep,
                max_output=max_bytes,
            )
            size = int(summary["bytes"])
            reply = ArtifactReadReply(
                success=True,
                encoding=request.encoding,
                truncated=bool(summary["truncated"]),
                bytes=size,
                file_size=int(summary["file_size"]),
                path=str(summary["path"]),
                mime=summary.get("mime"),
                sha256=digest.hexdigest() if request.include_sha256 else None,
            )
            spool.seek(0)
            if size <= self._limits.inline_bytes:
                data = spool.read()
                reply.content = (
                    data.decode("utf-8", errors="replace")
                    if request.encoding == "text"
                    else base64.b64encode(data).decode()
                )
                if _json_bytes(reply) > MAX_REPLY_JSON_BYTES:
                    reply.content = None  # escapes made it too large to come inline
                    spool.seek(0)
            if reply.content is None:
                name = _object_name(request.trajectory_id, "read", Path(reply.path or "").name)
                stored = await put_object(
                    self._js, self._bucket, name, spool, timeout_s=budget.left()
                )
                reply.object = _ref(stored)
                reply.sha256 = reply.object.sha256
        return reply.model_dump(mode="json")

    async def _list(self, request: ArtifactListRequest, sandbox: Sandbox) -> dict[str, Any]:
        max_entries = min(request.max_entries or self._limits.max_entries, self._limits.max_entries)
        listing = bytearray()
        summary = await run_helper(
            sandbox,
            "list",
            {
                "path": from_sandbox_path(request.path),
                "recursive": request.recursive,
                "max_entries": max_entries,
            },
            sink=listing.extend,
            max_output=max_entries * 8192 + 1024,
        )
        reply = ArtifactListReply(
            success=True,
            entries=json.loads(listing)["entries"],
            truncated=bool(summary["truncated"]),
        )
        # One NATS message holds the reply: long paths can make even max_entries too many.
        while _json_bytes(reply) > MAX_REPLY_JSON_BYTES:
            del reply.entries[len(reply.entries) * 3 // 4 :]
            reply.truncated = True
        return reply.model_dump(mode="json")

    async def _archive(
        self, request: ArtifactArchiveRequest, sandbox: Sandbox, budget: _Budget
    ) -> dict[str, Any]:
        max_bytes = min(request.max_bytes or self._limits.max_bytes, self._limits.max_bytes)
        max_entries = min(request.max_entries or self._limits.max_entries, self._limits.max_entries)
        with self._scratch_file() as archive:
            summary = await run_helper(
                sandbox,
                "archive",
                {
                    "path": from_sandbox_path(request.path),
                    "format": request.format,
                    "max_bytes": max_bytes,
                    "max_entries": max_entries,
                },
                sink=archive.write,
                max_output=max_bytes
                + (max_entries + 2) * _ARCHIVE_OVERHEAD_PER_ENTRY
                + _ARCHIVE_OVERHEAD,
            )
            archive.seek(0)
            suffix = "tar" if request.format == "tar" else "tar.gz"
            name = _object_name(request.trajectory_id, "archive", f"archive.{suffix}")
            stored = await put_object(
                self._js, self._bucket, name, archive, timeout_s=budget.left()
            )
        return ArtifactArchiveReply(
            success=True,
            format=request.format,
            bytes=stored.size,
            entry_count=int(summary["entry_count"]),
            truncated=bool(summary["truncated"]),
            truncated_reason=summary.get("truncated_reason"),
            skipped=int(summary.get("skipped", 0)),
            object=_ref(stored),
        ).model_dump(mode="json")

    async def _upload(
        self, request: ArtifactUploadRequest, sandbox: Sandbox, budget: _Budget
    ) -> dict[str, Any]:
        bucket = request.bucket or self._bucket
        limit = self._limits.max_upload_bytes
        size = await self._object_size(bucket, request.name)
        if size > limit:
            raise ArtifactFailure(
                f"Upload {request.name!r} is {size} bytes; the limit is {limit} bytes"
            )
        with self._scratch_file() as archive:
            # Bounded again while fetched: the object may be replaced by a larger one by now.
            await fetch_object(
                self._js,
                bucket,
                request.name,
                archive,
                expected_sha256=request.sha256,
                timeout_s=budget.left(),
                max_bytes=limit,
            )
            archive.flush()
            archive.seek(0)
            summary = await run_helper(
                sandbox,
                "extract",
                {
                    "path": from_sandbox_path(request.path),
                    "max_bytes": limit,
                    "max_entries": self._limits.max_upload_entries,
                },
                stdin_fd=archive.fileno(),
            )
        return ArtifactUploadReply(
            success=True,
            path=str(summary["path"]),
            entry_count=int(summary["entry_count"]),
            bytes=int(summary["bytes"]),
        ).model_dump(mode="json")

    # -- plumbing -----------------------------------------------------------------------------
    async def _object_size(self, bucket: str, name: str) -> int:
        try:
            store = await self._js.object_store(bucket)
            info = await store.get_info(name)
        except BucketNotFoundError:
            raise ArtifactFailure(f"No Object Store bucket {bucket!r}") from None
        except (ObjectNotFoundError, ObjectDeletedError):
            raise ArtifactFailure(f"No object {name!r} in bucket {bucket!r}") from None
        return int(info.size or 0)

    @contextlib.contextmanager
    def _scratch_file(self) -> Iterator[IO[bytes]]:
        with tempfile.TemporaryFile(dir=self._scratch) as file:
            yield file


@dataclass(frozen=True, slots=True)
class _Budget:
    """The operation's deadline (event loop time), or None when the caller bounds it."""

    deadline: float | None

    def left(self) -> float:
        """The ``timeout_s`` of a transfer started now."""
        if self.deadline is None:
            return DEFAULT_TIMEOUT_S
        return max(0.0, self.deadline - asyncio.get_running_loop().time())


def _timed_out(operation: str, timeout_s: float) -> dict[str, Any]:
    return {"success": False, "error": f"artifact {operation} timed out after {timeout_s:g}s"}


def _json_bytes(reply: BaseModel) -> int:
    """The reply's size as it travels: pydantic's JSON, UTF-8."""
    return len(reply.model_dump_json().encode())


def _object_name(trajectory_id: str, operation: str, filename: str) -> str:
    return f"{trajectory_id}/{operation}-{uuid.uuid4().hex[:12]}/{filename or 'artifact'}"


def _ref(stored: StoredObject) -> ObjectRef:
    return ObjectRef(bucket=stored.bucket, name=stored.name, size=stored.size, sha256=stored.sha256)
