"""Reading an object's info (its meta message, ``$O.<bucket>.M.<name>``): the stored JSON,
checked field by field, with links to single objects followed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ._object_protocol import (
    _BUCKET_RE,
    ObjectCorrupt,
    ObjectNotFound,
    _check_bucket,
    _where,
    decode_digest,
    meta_subject,
    stream_name,
)

_ERR_STREAM_NOT_FOUND = 10059  # JetStream API error code


@dataclass(frozen=True)
class _Info:
    nuid: str
    size: int
    chunks: int
    digest: bytes
    chunk_size: int  # the largest chunk the writer says it used (a hint)
    link: tuple[str, str] | None  # (bucket, name) of a linked object


async def _read_meta(js: JetStreamContext, bucket: str, name: str) -> dict[str, Any] | None:
    """The object's info as stored, or None when no meta message exists for the name."""
    try:
        msg = await js.get_last_msg(stream_name(bucket), meta_subject(bucket, name))
    except NotFoundError as exc:
        if exc.err_code == _ERR_STREAM_NOT_FOUND:
            raise ObjectNotFound(f"no Object Store bucket {bucket!r}") from None
        return None
    try:
        meta = json.loads(msg.data or b"")
    except ValueError as exc:
        raise ObjectCorrupt(f"{_where(bucket, name)}: its info is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ObjectCorrupt(f"{_where(bucket, name)}: its info is not a JSON object")
    return meta


def _parse_info(bucket: str, name: str, meta: dict[str, Any]) -> _Info:
    where = _where(bucket, name)
    options = meta.get("options") or {}
    link = options.get("link") if isinstance(options, dict) else None
    if isinstance(link, dict) and link.get("bucket"):
        if not link.get("name"):
            raise ObjectNotFound(f"{where} is a link to bucket {link['bucket']!r}, not an object")
        return _Info("", 0, 0, b"", 0, (str(link["bucket"]), str(link["name"])))
    nuid, size, chunks = meta.get("nuid"), meta.get("size") or 0, meta.get("chunks") or 0
    if not isinstance(nuid, str) or not _BUCKET_RE.fullmatch(nuid):
        raise ObjectCorrupt(f"{where}: its info has no valid nuid ({nuid!r})")
    if not isinstance(size, int) or not isinstance(chunks, int) or size < 0 or chunks < 0:
        raise ObjectCorrupt(f"{where}: its info has an invalid size or chunk count")
    if (size == 0) != (chunks == 0):
        raise ObjectCorrupt(f"{where}: its info says {size} bytes in {chunks} chunks")
    digest_text = meta.get("digest")
    digest = decode_digest(digest_text) if isinstance(digest_text, str) else None
    if digest is None:
        raise ObjectCorrupt(f"{where}: its info has no valid SHA-256 digest ({digest_text!r})")
    hint = options.get("max_chunk_size") if isinstance(options, dict) else None
    chunk_size = hint if isinstance(hint, int) and hint > 0 else -(-size // max(chunks, 1))
    return _Info(nuid, size, chunks, digest, chunk_size, None)


async def _object_info(js: JetStreamContext, bucket: str, name: str) -> tuple[str, str, _Info]:
    """The (bucket, name, info) of the object, following links to single objects."""
    origin = (bucket, name)
    for _ in range(8):
        meta = await _read_meta(js, bucket, name)
        if meta is None or meta.get("deleted"):
            if (bucket, name) == origin:
                raise ObjectNotFound(f"no {_where(bucket, name)}")
            raise ObjectNotFound(f"{_where(*origin)} links to the missing {_where(bucket, name)}")
        info = _parse_info(bucket, name, meta)
        if info.link is None:
            return bucket, name, info
        bucket, name = info.link
        _check_bucket(bucket)
    raise ObjectNotFound(f"{_where(*origin)}: too many links in a row")
