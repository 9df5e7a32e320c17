"""Artifacts: files of a trajectory's workspace, read, listed, archived or uploaded.

``tools.artifacts.read|list|archive`` keep the seed service's fields (shared/PARITY.md). What is
too big for a NATS message (a large read, and every archive) goes into a JetStream Object Store
bucket and the reply carries an :class:`ObjectRef` instead of ``content``; any NATS client can
fetch it with its Object Store API. ``tools.artifacts.upload`` goes the other way: the client
puts a tar archive into the Object Store and toolbus unpacks it into the workspace.

A request that cannot be served (bad body, no slot) gets an ADR-32 error reply like every other
subject; an operation that ran and failed (a missing file, a path outside the workspace, a limit)
gets ``success: false`` and ``error``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .messages import JsonFloat, JsonInt, TrajectoryId

_REQUEST = ConfigDict(extra="forbid")
_REPLY = ConfigDict(extra="ignore")

ArchiveFormat = Literal["tar.gz", "tgz", "tar"]


def _trajectory() -> Any:
    return Field(min_length=1, max_length=512, description="Trajectory whose workspace to use.")


def _timeout() -> Any:
    return Field(
        default=None,
        gt=0,
        description="Longest the operation may take; default artifact_timeout_s.",
    )


class ObjectRef(BaseModel):
    """Where an artifact was put: fetch it with any NATS client's Object Store API."""

    model_config = _REPLY

    bucket: str
    name: str
    size: int = Field(description="Bytes in the object.")
    sha256: str = Field(description="Hex SHA-256 of the object's bytes.")


# -- read ---------------------------------------------------------------------------------------
class ArtifactReadRequest(BaseModel):
    """Body of ``tools.artifacts.read``."""

    model_config = _REQUEST

    trajectory_id: TrajectoryId = _trajectory()
    path: str = Field(min_length=1, max_length=4096, description="File, relative to the workspace.")
    encoding: Literal["text", "base64"] = Field(
        default="text", description="text: UTF-8 (invalid bytes replaced); base64: exact bytes."
    )
    max_bytes: JsonInt | None = Field(
        default=None, gt=0, description="Read at most this many bytes; capped by the service."
    )
    include_sha256: bool = Field(default=False, description="Add the SHA-256 of the bytes read.")
    timeout_s: JsonFloat | None = _timeout()


class ArtifactReadReply(BaseModel):
    model_config = _REPLY

    success: bool
    content: str | None = Field(
        default=None, description="The bytes read, when small enough to come inline."
    )
    error: str | None = None
    encoding: Literal["text", "base64"] = "text"
    truncated: bool = Field(default=False, description="The file is longer than what was read.")
    bytes: int = Field(default=0, description="Bytes read.")
    file_size: int | None = None
    path: str | None = Field(default=None, description="The file, relative to the workspace.")
    mime: str | None = None
    sha256: str | None = None
    object: ObjectRef | None = Field(
        default=None, description="Set instead of content when the bytes went to the Object Store."
    )


# -- list ---------------------------------------------------------------------------------------
class ArtifactListRequest(BaseModel):
    """Body of ``tools.artifacts.list``."""

    model_config = _REQUEST

    trajectory_id: TrajectoryId = _trajectory()
    path: str = Field(default=".", min_length=1, max_length=4096)
    recursive: bool = False
    max_entries: JsonInt | None = Field(default=None, gt=0, description="Capped by the service.")
    timeout_s: JsonFloat | None = _timeout()


class ArtifactEntry(BaseModel):
    model_config = _REPLY

    path: str = Field(description="Relative to the workspace.")
    is_dir: bool
    size: int
    mtime: float
    is_symlink: bool = False


class ArtifactListReply(BaseModel):
    model_config = _REPLY

    success: bool
    entries: list[ArtifactEntry] = Field(default_factory=list)
    truncated: bool = False
    error: str | None = None


# -- archive ------------------------------------------------------------------------------------
class ArtifactArchiveRequest(BaseModel):
    """Body of ``tools.artifacts.archive``."""

    model_config = _REQUEST

    trajectory_id: TrajectoryId = _trajectory()
    path: str = Field(default=".", min_length=1, max_length=4096, description="Directory or file.")
    format: ArchiveFormat = "tar.gz"
    max_bytes: JsonInt | None = Field(
        default=None, gt=0, description="Most file bytes archived; capped by the service."
    )
    max_entries: JsonInt | None = Field(default=None, gt=0, description="Capped by the service.")
    timeout_s: JsonFloat | None = _timeout()


class ArtifactArchiveReply(BaseModel):
    model_config = _REPLY

    success: bool
    error: str | None = None
    format: ArchiveFormat = "tar.gz"
    bytes: int = Field(default=0, description="Size of the archive.")
    entry_count: int = 0
    truncated: bool = False
    truncated_reason: str | None = Field(
        default=None, description="Which limit stopped the archive, when truncated."
    )
    skipped: int = Field(
        default=0, description="Entries left out: links leaving the directory, fifos, devices."
    )
    object: ObjectRef | None = None


# -- upload -------------------------------------------------------------------------------------
class ArtifactUploadRequest(BaseModel):
    """Body of ``tools.artifacts.upload``: unpack a tar archive from the Object Store.

    Like a tool call, this takes a slot for the trajectory when it has none yet: it is how a
    task's files get into a fresh workspace.
    """

    model_config = _REQUEST

    trajectory_id: TrajectoryId = _trajectory()
    name: str = Field(min_length=1, max_length=1024, description="Object holding the archive.")
    bucket: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Object Store bucket; default the service's artifacts bucket.",
    )
    path: str = Field(default=".", min_length=1, max_length=4096, description="Unpack here.")
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="Expected hex SHA-256 of the archive; checked before unpacking.",
    )
    timeout_s: JsonFloat | None = _timeout()


class ArtifactUploadReply(BaseModel):
    model_config = _REPLY

    success: bool
    error: str | None = None
    path: str | None = Field(default=None, description="Where it was unpacked, in the workspace.")
    entry_count: int = 0
    bytes: int = Field(default=0, description="File bytes unpacked.")


ArtifactRequest = (
    ArtifactReadRequest | ArtifactListRequest | ArtifactArchiveRequest | ArtifactUploadRequest
)
ArtifactReply = ArtifactReadReply | ArtifactListReply | ArtifactArchiveReply | ArtifactUploadReply

# operation name (the subject's last token) -> (request, reply)
ARTIFACT_OPERATIONS: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "read": (ArtifactReadRequest, ArtifactReadReply),
    "list": (ArtifactListRequest, ArtifactListReply),
    "archive": (ArtifactArchiveRequest, ArtifactArchiveReply),
    "upload": (ArtifactUploadRequest, ArtifactUploadReply),
}
