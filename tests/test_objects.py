"""Object Store transfers (services._objects) against a real nats-server, and interop with
nats-py's own ObjectStore."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, ObjectMeta, ObjectMetaOptions

from services._objects import (
    DEFAULT_CHUNK_SIZE,
    ObjectCorrupt,
    ObjectNotFound,
    ObjectTimeout,
    ObjectTooLarge,
    decode_digest,
    encode_digest,
    fetch_object,
    meta_subject,
    open_object_store,
    put_object,
    stream_name,
)
from services.exceptions import ToolbusError
from tests._node import NODE_DIR

# nats.js (tests/node) reads what put_object stored and stores what fetch_object reads.
NATS_JS_INTEROP = """
import { createHash } from "node:crypto";
import { connect } from "nats";

const env = process.env;
const nc = await connect({ servers: env.NATS_URL });
const store = await nc.jetstream().views.os(env.BUCKET);
const got = await store.getBlob(env.GET_NAME);  // rejects when the digest does not match
const data = new Uint8Array(Number(env.PUT_SIZE)).map((_, i) => (i * 7 + 3) % 256);
const info = await store.putBlob({ name: env.PUT_NAME }, data);
console.log(JSON.stringify({
  got_size: got.length,
  got_sha256: createHash("sha256").update(got).digest("hex"),
  put_chunks: info.chunks,
}));
await nc.close();
"""

MiB = 1024 * 1024


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
async def bucket(js: JetStreamContext) -> AsyncIterator[str]:
    """A fresh bucket, deleted at the end."""
    name = f"test-objects-{uuid.uuid4().hex[:12]}"
    await open_object_store(js, name, description="toolbus tests")
    yield name
    await js.delete_object_store(name)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _stream_messages(js: JetStreamContext, bucket: str) -> int:
    return (await js.stream_info(stream_name(bucket))).state.messages


async def _fetch_consumers(js: JetStreamContext, bucket: str) -> list[str]:
    infos = await js.consumers_info(stream_name(bucket))
    return [info.name for info in infos if info.name.startswith("toolbus-fetch-")]


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size",
    [0, 1, DEFAULT_CHUNK_SIZE, 3 * MiB + 17],
    ids=["empty", "one-byte", "one-chunk", "many-chunks"],
)
@pytest.mark.parametrize("to", ["path", "stream"])
async def test_round_trip(
    js: JetStreamContext, bucket: str, tmp_path: Path, size: int, to: str
) -> None:
    data = os.urandom(size)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    stored = await put_object(js, bucket, "dir/file.bin", source)
    expected_chunks = -(-size // DEFAULT_CHUNK_SIZE)
    assert (stored.bucket, stored.name) == (bucket, "dir/file.bin")
    assert (stored.size, stored.sha256, stored.chunks) == (size, _sha(data), expected_chunks)

    if to == "path":
        destination = tmp_path / "fetched.bin"
        fetched = await fetch_object(
            js, bucket, "dir/file.bin", destination, expected_sha256=stored.sha256
        )
        assert destination.read_bytes() == data
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fetched.bin", "source.bin"]
    else:
        buffer = io.BytesIO()
        fetched = await fetch_object(js, bucket, "dir/file.bin", buffer)
        assert buffer.getvalue() == data
    assert fetched == stored
    assert await _fetch_consumers(js, bucket) == []


async def test_put_from_a_stream_position_and_replace(
    js: JetStreamContext, bucket: str, tmp_path: Path
) -> None:
    first = os.urandom(2 * MiB)
    await put_object(js, bucket, "name", io.BytesIO(first))
    second = os.urandom(MiB + 5)
    source = io.BytesIO(b"skipped" + second)
    source.seek(len(b"skipped"))
    stored = await put_object(js, bucket, "name", source, chunk_size=100_000)
    assert (stored.size, stored.chunks) == (len(second), 11)

    buffer = io.BytesIO()
    await fetch_object(js, bucket, "name", buffer)
    assert buffer.getvalue() == second
    # The first version's chunks are purged: the new chunks and one meta message remain.
    assert await _stream_messages(js, bucket) == stored.chunks + 1


async def test_small_window_pulls_in_many_requests(
    js: JetStreamContext, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB + 3)
    await put_object(js, bucket, "o", io.BytesIO(data), chunk_size=32 * 1024, window_bytes=1)
    destination = tmp_path / "o"
    await fetch_object(js, bucket, "o", destination, window_bytes=1)
    assert destination.read_bytes() == data


async def test_fetch_resumes_when_its_consumer_is_deleted(
    js: JetStreamContext, bucket: str
) -> None:
    data = os.urandom(12 * MiB)
    await put_object(js, bucket, "big", io.BytesIO(data))
    loop = asyncio.get_running_loop()

    async def delete_fetch_consumers() -> None:
        for consumer in await _fetch_consumers(js, bucket):
            await js.delete_consumer(stream_name(bucket), consumer)

    class Sabotage(io.BytesIO):
        """Deletes the fetch's consumer while writing its first block (in the writer thread)."""

        done = False

        def write(self, chunk: bytes) -> int:  # type: ignore[override]
            if not self.done:
                self.done = True
                asyncio.run_coroutine_threadsafe(delete_fetch_consumers(), loop).result(10)
            return super().write(chunk)

    destination = Sabotage()
    with structlog.testing.capture_logs() as logs:
        # The deletion may be told (a 409 for a pending pull) or not (see the test below);
        # either way the fetch resumes within seconds, so a hang fails within the bound.
        fetched = await fetch_object(
            js, bucket, "big", destination, window_bytes=256 * 1024, timeout_s=60
        )
    assert destination.getvalue() == data
    assert fetched.sha256 == _sha(data)
    assert any(entry["event"] == "object fetch resumes" for entry in logs)
    assert await _fetch_consumers(js, bucket) == []


@dataclass
class SilencedFetch:
    """What :func:`silence_the_first_fetch` saw: the consumer it deleted, the pulls heard."""

    deleted: list[str] = field(default_factory=list)
    pulls: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def silence_the_first_fetch(
    js: JetStreamContext, nc: Client, bucket: str
) -> AsyncIterator[SilencedFetch]:
    """Make the first fetch's pulls go unanswered, as a consumer deleted while it takes them in
    may leave them: no chunk, no status, nothing ever arrives. The first consumer ``js`` makes
    is deleted as soon as it is made (on the real server), and a listener on the pull subject
    stands where the server's own subscription lingers in that race, so that the server does
    not answer "no responders" either. Later consumers work as usual."""
    seen = SilencedFetch()

    async def listen(msg: Msg) -> None:
        seen.pulls.append(msg.subject)

    listener = await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{stream_name(bucket)}.*", cb=listen)
    add_consumer = js.add_consumer

    async def add_then_delete_the_first(*args: Any, **kwargs: Any) -> ConsumerInfo:
        info = await add_consumer(*args, **kwargs)
        if not seen.deleted:
            seen.deleted.append(info.name)
            await js.delete_consumer(stream_name(bucket), info.name)
        return info

    js.add_consumer = add_then_delete_the_first  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del js.add_consumer  # the class's own again
        await listener.unsubscribe()


async def test_fetch_resumes_when_its_consumer_is_deleted_without_a_word(
    js: JetStreamContext, bucket: str, nc: Client
) -> None:
    data = os.urandom(3 * MiB)
    await put_object(js, bucket, "big", io.BytesIO(data))
    destination = io.BytesIO()
    async with silence_the_first_fetch(js, nc, bucket) as silenced:
        with structlog.testing.capture_logs() as logs:
            # Bounded: before the stall was looked into, this waited for the whole timeout.
            fetched = await fetch_object(js, bucket, "big", destination, timeout_s=30)
    assert destination.getvalue() == data
    assert fetched.sha256 == _sha(data)
    assert any(pull.endswith(f".{silenced.deleted[0]}") for pull in silenced.pulls)
    resumes = [entry for entry in logs if entry["event"] == "object fetch resumes"]
    assert len(resumes) == 1 and "gone" in resumes[0]["reason"]
    assert resumes[0]["received"] == 0
    assert await _fetch_consumers(js, bucket) == []


async def test_object_replaced_during_fetch(
    js: JetStreamContext, bucket: str, tmp_path: Path
) -> None:
    await put_object(js, bucket, "big", io.BytesIO(os.urandom(12 * MiB)))
    loop = asyncio.get_running_loop()
    newer = os.urandom(1000)

    def replace() -> None:
        coroutine = put_object(js, bucket, "big", io.BytesIO(newer))
        asyncio.run_coroutine_threadsafe(coroutine, loop).result(10)

    class Sabotage(io.BytesIO):
        """Replaces the object while the fetch writes its first block (in the writer thread)."""

        done = False

        def write(self, chunk: bytes) -> int:  # type: ignore[override]
            if not self.done:
                self.done = True
                replace()
            return super().write(chunk)

    with pytest.raises(ObjectNotFound, match="deleted, replaced or expired while it was being"):
        await fetch_object(js, bucket, "big", Sabotage(), window_bytes=256 * 1024)
    assert await _fetch_consumers(js, bucket) == []
    destination = tmp_path / "big"
    assert (await fetch_object(js, bucket, "big", destination)).size == len(newer)
    assert destination.read_bytes() == newer


# -- interop with nats-py's ObjectStore ---------------------------------------------------------
async def test_nats_py_put_then_fetch_object(
    js: JetStreamContext, bucket: str, tmp_path: Path
) -> None:
    store = await js.object_store(bucket)
    data = os.urandom(MiB + 1234)
    meta = ObjectMeta(name="from-nats-py", options=ObjectMetaOptions(max_chunk_size=64 * 1024))
    await store.put("from-nats-py", data, meta=meta)
    destination = tmp_path / "out.bin"
    fetched = await fetch_object(
        js, bucket, "from-nats-py", destination, expected_sha256=_sha(data)
    )
    assert destination.read_bytes() == data
    assert (fetched.size, fetched.chunks) == (len(data), 17)

    await store.put("empty-from-nats-py", b"")
    empty = io.BytesIO()
    assert (await fetch_object(js, bucket, "empty-from-nats-py", empty)).size == 0
    assert empty.getvalue() == b""


async def test_put_object_then_nats_py_get(js: JetStreamContext, bucket: str) -> None:
    store = await js.object_store(bucket)
    data = os.urandom(MiB + 99)
    stored = await put_object(js, bucket, "to nats-py ✓", io.BytesIO(data), description="hi")
    result = await store.get("to nats-py ✓")  # nats-py checks the digest itself
    assert result.data == data
    info = result.info
    assert (info.size, info.chunks, info.nuid != "") == (stored.size, stored.chunks, True)
    assert info.description == "hi"
    assert info.digest == encode_digest(bytes.fromhex(stored.sha256))
    assert info.digest.endswith("=")  # padded, as nats.go, nats.js and nats-py write it

    await put_object(js, bucket, "empty", io.BytesIO(b""))
    assert (await store.get("empty")).data == b""


@pytest.mark.node
@pytest.mark.usefixtures("node_client")
async def test_nats_js_reads_put_object_and_writes_for_fetch_object(
    js: JetStreamContext, bucket: str, nats_url: str
) -> None:
    data = os.urandom(MiB + 7)
    stored = await put_object(js, bucket, "for nats.js/a b.bin", io.BytesIO(data))
    node = shutil.which("node")
    assert node is not None
    put_size = 300_001
    process = await asyncio.create_subprocess_exec(
        node,
        "--input-type=module",
        "-e",
        NATS_JS_INTEROP,
        cwd=NODE_DIR,
        env={
            **os.environ,
            "NATS_URL": nats_url,
            "BUCKET": bucket,
            "GET_NAME": "for nats.js/a b.bin",
            "PUT_NAME": "from nats.js/a b.bin",
            "PUT_SIZE": str(put_size),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode(errors="replace")
    report = json.loads(stdout)
    assert (report["got_size"], report["got_sha256"]) == (stored.size, stored.sha256)

    expected = bytes((i * 7 + 3) % 256 for i in range(put_size))
    buffer = io.BytesIO()
    fetched = await fetch_object(
        js, bucket, "from nats.js/a b.bin", buffer, expected_sha256=_sha(expected)
    )
    assert buffer.getvalue() == expected
    assert fetched.chunks == report["put_chunks"] == 3


# -- errors ---------------------------------------------------------------------------------------
async def test_missing_deleted_and_bucketless_objects(
    js: JetStreamContext, bucket: str, tmp_path: Path
) -> None:
    destination = tmp_path / "never"
    with pytest.raises(ObjectNotFound, match="no object 'nothing' in bucket"):
        await fetch_object(js, bucket, "nothing", destination)

    await put_object(js, bucket, "gone", io.BytesIO(b"data"))
    await (await js.object_store(bucket)).delete("gone")
    with pytest.raises(ObjectNotFound, match="'gone'"):
        await fetch_object(js, bucket, "gone", destination)

    with pytest.raises(ObjectNotFound, match="no Object Store bucket 'no-such-bucket-x'"):
        await fetch_object(js, "no-such-bucket-x", "a", destination)
    with pytest.raises(ObjectNotFound, match="no Object Store bucket 'no-such-bucket-x'"):
        await put_object(js, "no-such-bucket-x", "a", io.BytesIO(b"x"))
    assert not destination.exists()
    assert list(tmp_path.iterdir()) == []
    assert issubclass(ObjectNotFound, ToolbusError)


async def test_expected_sha256_mismatch_leaves_no_file(
    js: JetStreamContext, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    await put_object(js, bucket, "o", io.BytesIO(data))
    wrong = _sha(b"something else")
    destination = tmp_path / "o.bin"
    with pytest.raises(
        ObjectCorrupt, match=f"SHA-256 mismatch: expected_sha256 is {wrong}"
    ) as caught:
        await fetch_object(js, bucket, "o", destination, expected_sha256=wrong.upper())
    assert _sha(data) in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    assert await _fetch_consumers(js, bucket) == []

    destination.write_bytes(b"old content")  # an existing file is kept as it was
    with pytest.raises(ObjectCorrupt):
        await fetch_object(js, bucket, "o", destination, expected_sha256=wrong)
    assert destination.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["o.bin"]

    with pytest.raises(ValueError, match="64 hex digits"):
        await fetch_object(js, bucket, "o", destination, expected_sha256="abc")


async def _rewrite_meta(js: JetStreamContext, bucket: str, name: str, **changes: object) -> None:
    """Publish a changed copy of an object's info, as a broken writer would."""
    subject = meta_subject(bucket, name)
    meta = json.loads((await js.get_last_msg(stream_name(bucket), subject)).data or b"")
    meta.update(changes)
    await js.publish(subject, json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"digest": encode_digest(hashlib.sha256(b"x").digest())}, "SHA-256 mismatch: its info"),
        ({"size": 3 * DEFAULT_CHUNK_SIZE}, "size mismatch: its info says 393216 bytes"),
        ({"size": 10}, "size mismatch: its info says 10 bytes"),
        ({"chunks": 4}, "chunk count mismatch: its info says 4 chunks, the bucket holds 2"),
        ({"chunks": 1}, "chunk count mismatch: its info says 1 chunks, the bucket holds 2"),
        ({"digest": "MD5=abc"}, "no valid SHA-256 digest"),
    ],
    ids=["digest", "size-larger", "size-smaller", "more-chunks", "fewer-chunks", "bad-digest"],
)
async def test_info_that_does_not_match_the_chunks(
    js: JetStreamContext,
    bucket: str,
    tmp_path: Path,
    changes: dict[str, object],
    message: str,
) -> None:
    await put_object(js, bucket, "o", io.BytesIO(os.urandom(DEFAULT_CHUNK_SIZE + 1)))
    await _rewrite_meta(js, bucket, "o", **changes)
    with pytest.raises(ObjectCorrupt, match=message):
        await fetch_object(js, bucket, "o", tmp_path / "o")
    assert list(tmp_path.iterdir()) == []
    assert await _fetch_consumers(js, bucket) == []


async def test_max_bytes_bounds_the_fetch_by_the_info_and_by_the_bytes_received(
    js: JetStreamContext, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * DEFAULT_CHUNK_SIZE)
    await put_object(js, bucket, "o", io.BytesIO(data))
    exact = io.BytesIO()
    assert (await fetch_object(js, bucket, "o", exact, max_bytes=len(data))).size == len(data)
    assert exact.getvalue() == data

    destination = tmp_path / "o"
    with pytest.raises(
        ObjectTooLarge, match=r"'o' .* is 393216 bytes, over the limit of 393215 bytes"
    ):
        await fetch_object(js, bucket, "o", destination, max_bytes=len(data) - 1)
    # An info that understates the size (as a replaced or broken object's may): the fetch
    # stops at the first chunk past max_bytes, before writing it.
    await _rewrite_meta(js, bucket, "o", size=100)
    buffer = io.BytesIO()
    with pytest.raises(
        ObjectTooLarge, match=r"over the limit of 1000 bytes \(131072 bytes in the first 1 chunks"
    ):
        await fetch_object(js, bucket, "o", buffer, max_bytes=1000)
    assert buffer.getvalue() == b""
    with pytest.raises(ObjectTooLarge):
        await fetch_object(js, bucket, "o", destination, max_bytes=1000)
    assert list(tmp_path.iterdir()) == []
    assert await _fetch_consumers(js, bucket) == []
    assert issubclass(ObjectTooLarge, ToolbusError)
    with pytest.raises(ValueError, match="max_bytes"):
        await fetch_object(js, bucket, "o", buffer, max_bytes=-1)


async def test_timeout(js: JetStreamContext, bucket: str, tmp_path: Path) -> None:
    await put_object(js, bucket, "o", io.BytesIO(os.urandom(MiB)))
    with pytest.raises(ObjectTimeout, match=r"fetching object 'o' .* within 0 s"):
        await fetch_object(js, bucket, "o", tmp_path / "o", timeout_s=0)
    with pytest.raises(TimeoutError):
        await put_object(js, bucket, "p", io.BytesIO(os.urandom(MiB)), timeout_s=0)
    assert list(tmp_path.iterdir()) == []


async def test_failed_put_leaves_no_chunks(js: JetStreamContext, bucket: str) -> None:
    class Broken(io.RawIOBase):
        reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
            self.reads += 1
            if self.reads > 3:
                raise OSError("disk on fire")
            buffer[: len(buffer)] = b"\x01" * len(buffer)
            return len(buffer)

    source = io.BufferedReader(Broken(), buffer_size=3 * MiB)
    with pytest.raises(OSError, match="disk on fire"):
        await put_object(js, bucket, "broken", source)
    state = (await js.stream_info(stream_name(bucket))).state
    assert state.last_seq > 0  # chunks went out before the source failed ...
    assert state.messages == 0  # ... and were purged
    with pytest.raises(ObjectNotFound):
        await fetch_object(js, bucket, "broken", io.BytesIO())


# -- buckets and helpers ------------------------------------------------------------------------
async def test_open_object_store_is_idempotent_and_sets_the_ttl(js: JetStreamContext) -> None:
    name = f"test-objects-{uuid.uuid4().hex[:12]}"
    try:
        stores = await asyncio.gather(
            *(open_object_store(js, name, ttl_s=3600, description="d") for _ in range(4))
        )
        assert {store._name for store in stores} == {name}
        config = (await js.stream_info(stream_name(name))).config
        assert config.max_age == 3600
        assert config.description == "d"
        assert config.storage == "file"
        # An existing bucket is used as it is, even when asked with another TTL.
        await open_object_store(js, name, ttl_s=60)
        assert (await js.stream_info(stream_name(name))).config.max_age == 3600
    finally:
        await js.delete_object_store(name)

    forever = f"test-objects-{uuid.uuid4().hex[:12]}"
    try:
        await open_object_store(js, forever)
        assert not (await js.stream_info(stream_name(forever))).config.max_age
    finally:
        await js.delete_object_store(forever)

    with pytest.raises(ValueError, match="invalid Object Store bucket name"):
        await open_object_store(js, "a.b")


def test_digest_encoding() -> None:
    raw = hashlib.sha256(b"toolbus").digest()
    padded = encode_digest(raw)
    assert padded == "SHA-256=" + base64.urlsafe_b64encode(raw).decode()
    assert padded.endswith("=")
    assert decode_digest(padded) == raw
    assert decode_digest(padded.rstrip("=")) == raw
    assert decode_digest("sha-256=" + base64.b64encode(raw).decode()) == raw
    assert decode_digest("SHA-256=" + base64.urlsafe_b64encode(raw[:16]).decode()) is None
    assert decode_digest("SHA-512=" + padded[8:]) is None
    assert decode_digest("SHA-256=!!!") is None
    assert (
        meta_subject("b", "dir/ä")
        == "$O.b.M." + base64.urlsafe_b64encode("dir/ä".encode()).decode()
    )
