"""Fetching an Object Store object: :func:`fetch_object`.

It reads the object's info (``_object_info``), then has ``_object_pull`` pull the chunks and
write them in a worker thread (about 450 MiB/s to a file at 100 MiB,
benchmarks/bench_artifacts.py). It checks the chunk count, the size and the SHA-256 (against
the info's digest, and the caller's when given); a ``Path`` destination is written to a
temporary file next to it and renamed at the end, so a failed fetch leaves no partial file.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nats.js import JetStreamContext

from ._object_info import _Info, _object_info
from ._object_protocol import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_WINDOW_BYTES,
    ObjectCorrupt,
    ObjectTooLarge,
    StoredObject,
    _check_bucket,
    _check_name,
    _deadline,
    _nuid,
    _open,
    _where,
)
from ._object_pull import _ChunkPuller, _Writer

_SHA256_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")


async def fetch_object(
    js: JetStreamContext,
    bucket: str,
    name: str,
    destination: Path | IO[bytes],
    *,
    expected_sha256: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    max_bytes: int | None = None,
) -> StoredObject:
    """Stream an object to ``destination`` and check it; returns what was fetched.

    A ``Path`` is written to a temporary file in the same directory and renamed over it at the
    end, so a failed fetch leaves no file behind; a stream is written from its current position
    (on failure it may hold part of the object). Links to single objects are followed.

    Raises :class:`ObjectNotFound` (no such bucket or object, deleted, or deleted or replaced
    during the fetch), :class:`ObjectCorrupt` (size, chunk count or SHA-256 mismatch, against
    the object's info or ``expected_sha256``, in hex), :class:`ObjectTooLarge` (the info says
    more than ``max_bytes``, or more than that arrives: nothing past it is written) and
    :class:`ObjectTimeout`.
    """
    _check_bucket(bucket)
    _check_name(name)
    expected = _expected_digest(expected_sha256)
    if window_bytes <= 0:
        raise ValueError(f"window_bytes must be positive, got {window_bytes}")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be non-negative (or None), got {max_bytes}")
    async with _deadline(timeout_s, lambda: f"fetching {_where(bucket, name)}"):
        where_bucket, where_name, info = await _object_info(js, bucket, name)
        if max_bytes is not None and info.size > max_bytes:
            raise ObjectTooLarge(
                f"{_where(where_bucket, where_name)} is {info.size} bytes, over the limit "
                f"of {max_bytes} bytes",
                size=info.size,
                max_bytes=max_bytes,
            )
        fetch = _Fetch(js, where_bucket, where_name, info, expected, window_bytes, max_bytes)
        if isinstance(destination, Path):
            return await _fetch_to_path(fetch, destination)
        return await _fetch_to(fetch, destination)


def _expected_digest(expected_sha256: str | None) -> bytes | None:
    if expected_sha256 is None:
        return None
    if not _SHA256_HEX_RE.fullmatch(expected_sha256):
        raise ValueError(f"expected_sha256 must be 64 hex digits, got {expected_sha256!r}")
    return bytes.fromhex(expected_sha256)


@dataclass(frozen=True)
class _Fetch:
    """What one fetch gets, and how."""

    js: JetStreamContext
    bucket: str
    name: str
    info: _Info
    expected: bytes | None
    window_bytes: int
    max_bytes: int | None


async def _fetch_to_path(fetch: _Fetch, destination: Path) -> StoredObject:
    temporary = destination.with_name(f".{destination.name}.{_nuid.next().decode()}.part")
    # Opening, closing and renaming are quick, and kept on the loop so that a cancellation
    # cannot come between creating the file and the clean-up below.
    file = _open(temporary, "xb")
    try:
        try:
            stored = await _fetch_to(fetch, file)
        finally:
            file.close()
        os.replace(temporary, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return stored


async def _fetch_to(fetch: _Fetch, file: IO[bytes]) -> StoredObject:
    bucket, name, info, expected = fetch.bucket, fetch.name, fetch.info, fetch.expected
    where = _where(bucket, name)
    writer = _Writer(file)
    received = size = 0
    try:
        if info.chunks:
            puller = _ChunkPuller(
                fetch.js, bucket, name, info, writer, fetch.window_bytes, fetch.max_bytes
            )
            await puller.run()
            received, size = puller.received, puller.size
        digest = await writer.finish()
    except BaseException:
        await writer.abandon()
        raise
    if received != info.chunks:  # pragma: no cover - the puller stops at the count
        raise ObjectCorrupt(
            f"{where}: chunk count mismatch: its info says {info.chunks}, received {received}"
        )
    if size != info.size:
        raise ObjectCorrupt(
            f"{where}: size mismatch: its info says {info.size} bytes, the chunks hold {size}"
        )
    if digest != info.digest:
        raise ObjectCorrupt(
            f"{where}: SHA-256 mismatch: its info says {info.digest.hex()}, the chunks hash to "
            f"{digest.hex()}"
        )
    if expected is not None and digest != expected:
        raise ObjectCorrupt(
            f"{where}: SHA-256 mismatch: expected_sha256 is {expected.hex()}, the object's "
            f"sha256 is {digest.hex()}"
        )
    return StoredObject(bucket=bucket, name=name, size=size, sha256=digest.hex(), chunks=received)
