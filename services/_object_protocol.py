"""What fetching and putting Object Store objects share: the errors they raise, what they
return, ADR-20's subjects and digests, and the small helpers both use (argument checks,
deadlines, subscriptions that feed a queue, nats-py's private connection).

Object names in subjects and digests are base64url *with* padding, as nats.go, nats.js and
nats-py write them; digests are read with or without padding. Keep object names ASCII when
nats.js must read them: it base64-encodes names as Latin-1 (``btoa``), the others as UTF-8.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.nuid import NUID

from .exceptions import ToolbusError

DEFAULT_CHUNK_SIZE = 128 * 1024  # ADR-20's default; every client reads any chunk size
DEFAULT_TIMEOUT_S = 300.0  # for a whole transfer
DEFAULT_WINDOW_BYTES = 16 * 1024 * 1024  # chunk bytes in flight (pulled, or published unacked)
_BLOCK_BYTES = 4 * 1024 * 1024  # source reads / destination writes per worker-thread call
_CLEANUP_TIMEOUT_S = 5.0

_BUCKET_RE = re.compile(r"[A-Za-z0-9_-]+")
_DIGEST_PREFIX = "SHA-256="

_nuid = NUID()


class ObjectNotFound(ToolbusError):
    """The object (or its bucket) does not exist, was deleted, or went away while fetched."""


class ObjectCorrupt(ToolbusError):
    """The object's chunks do not match its info (size, chunk count or digest), or the caller's
    expected SHA-256; or its info cannot be read."""


class ObjectTimeout(ToolbusError, TimeoutError):
    """A transfer did not finish within its ``timeout_s``."""


class ObjectTooLarge(ToolbusError):
    """The object is larger than the fetch's ``max_bytes`` (by its info, or by the bytes that
    arrived: an info may understate them). Not a subclass of :class:`ObjectCorrupt`: the object
    may be fine, only too large for this caller."""

    def __init__(self, message: str, *, size: int, max_bytes: int) -> None:
        super().__init__(message)
        self.size = size  # the info's size, or the bytes received when they went past
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    name: str
    size: int
    sha256: str  # lowercase hex
    chunks: int


# -- names, digests ---------------------------------------------------------------------------
def stream_name(bucket: str) -> str:
    return f"OBJ_{bucket}"


def meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def chunk_subject(bucket: str, nuid: str) -> str:
    return f"$O.{bucket}.C.{nuid}"


def encode_digest(sha256: bytes) -> str:
    """ADR-20's digest field: ``SHA-256=`` and the base64url of the hash, padded."""
    return _DIGEST_PREFIX + base64.urlsafe_b64encode(sha256).decode()


def decode_digest(digest: str) -> bytes | None:
    """The 32 hash bytes of a ``SHA-256=<base64url>`` digest (padded or not; the standard
    base64 alphabet is accepted too), or None when it is not one."""
    if digest[: len(_DIGEST_PREFIX)].upper() != _DIGEST_PREFIX:
        return None
    value = digest[len(_DIGEST_PREFIX) :].rstrip("=").replace("+", "-").replace("/", "_")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == hashlib.sha256().digest_size else None


def _check_bucket(bucket: str) -> None:
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(f"invalid Object Store bucket name {bucket!r}: use A-Z, a-z, 0-9, - and _")


def _check_name(name: str) -> None:
    if not name:
        raise ValueError("an object name cannot be empty")


def _where(bucket: str, name: str) -> str:
    return f"object {name!r} in bucket {bucket!r}"


def _connection(js: JetStreamContext) -> Client:
    # nats-py keeps the connection private; its own ObjectStore uses it the same way.
    return js._nc


def _api_prefix(js: JetStreamContext) -> str:
    prefix: str = js._prefix
    return prefix


@contextlib.asynccontextmanager
async def _deadline(timeout_s: float, what: Callable[[], str]) -> AsyncIterator[None]:
    """``asyncio.timeout`` raising :class:`ObjectTimeout` with ``what()`` in its message."""
    scope = asyncio.timeout(timeout_s)
    try:
        async with scope:
            yield
    except TimeoutError:
        if scope.expired():
            raise ObjectTimeout(f"{what()} did not finish within {timeout_s:g} s") from None
        raise


async def _subscribe_queue(nc: Client, subject: str) -> tuple[Subscription, asyncio.Queue[Msg]]:
    """A subscription that hands its messages to a queue. Cheaper per message than nats-py's
    ``next_msg`` (a task and a uuid4 per call); the callers bound what is in flight."""
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await nc.subscribe(subject, cb=queue.put)
    return sub, queue


def _open(path: Path, mode: str) -> IO[bytes]:
    file: IO[bytes] = path.open(mode)
    return file
