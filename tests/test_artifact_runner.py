"""ArtifactRunner on its own, in a real bubblewrap sandbox, against the real nats-server: what
the worker's batch around it does not show (its own time budget, a race in upload)."""

from __future__ import annotations

import asyncio
import io
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from services._artifacts import ArtifactLimits, ArtifactRunner
from services._objects import put_object
from services._sandbox import Sandbox, SandboxFactory, SandboxLimits
from tests.test_objects import silence_the_first_fetch

_TEST_BOUND_S = 60  # a run that hangs fails the test after this


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    factory = SandboxFactory(
        allow_network=False, require_sandbox=True, limits=SandboxLimits(), cgroups=None
    )
    await factory.probe(tmp_path / "probe")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    made = factory.make(0, workspace)
    try:
        yield made
    finally:
        await made.close()
        await factory.close()


@pytest.fixture
def bucket() -> str:
    return f"test-artifacts-{uuid.uuid4().hex[:12]}"


async def _runner(
    js: JetStreamContext, tmp_path: Path, bucket: str, limits: ArtifactLimits | None = None
) -> ArtifactRunner:
    runner = ArtifactRunner(
        js, scratch=tmp_path / "scratch", bucket=bucket, limits=limits or ArtifactLimits()
    )
    await runner.start()
    return runner


@pytest.fixture
async def runner(
    js: JetStreamContext, tmp_path: Path, bucket: str
) -> AsyncIterator[ArtifactRunner]:
    yield await _runner(js, tmp_path, bucket)
    await js.delete_object_store(bucket)


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def _run(runner: ArtifactRunner, sandbox: Sandbox, operation: str, **kwargs: Any) -> Any:
    budget = {"timeout_s": kwargs.pop("timeout_s")} if "timeout_s" in kwargs else {}
    running = runner.run(operation, kwargs, sandbox, "traj-runner", **budget)
    return await asyncio.wait_for(running, _TEST_BOUND_S)


# -- the time budget ----------------------------------------------------------------------------
async def test_a_transfer_gets_the_time_left_of_the_operation(
    runner: ArtifactRunner, sandbox: Sandbox, js: JetStreamContext, nc: Client, bucket: str
) -> None:
    """The upload's fetch stalls for a few seconds (its first pulls go unanswered, then it
    resumes): a 1 s budget ends it with the operation's own timeout, a longer one lets it
    resume. Before, the fetch had its 300 s default whatever the call's timeout."""
    await put_object(js, bucket, "up.tar", io.BytesIO(_tar({"a.txt": b"hello"})))
    async with silence_the_first_fetch(js, nc, bucket) as silenced:
        short = await _run(runner, sandbox, "upload", name="up.tar", path="in", timeout_s=1)
    assert silenced.deleted  # the fetch had begun
    assert short == {"success": False, "error": "artifact upload timed out after 1s"}
    assert not (sandbox.workspace / "in" / "a.txt").exists()

    async with silence_the_first_fetch(js, nc, bucket) as silenced:
        long = await _run(runner, sandbox, "upload", name="up.tar", path="in", timeout_s=40)
    assert silenced.deleted
    assert long["success"], long
    assert (sandbox.workspace / "in" / "a.txt").read_bytes() == b"hello"


async def test_the_helper_is_killed_when_the_budget_runs_out(
    runner: ArtifactRunner, sandbox: Sandbox
) -> None:
    # A helper that never finishes: the sandbox's "python" sleeps instead.
    script = sandbox.workspace / "slow-python"
    script.write_text("#!/bin/sh\nexec sleep 600\n")
    script.chmod(0o755)
    sandbox.python = f"{sandbox.inner_workspace}/slow-python"
    reply = await _run(runner, sandbox, "list", path=".", timeout_s=1)
    assert reply == {"success": False, "error": "artifact list timed out after 1s"}


# -- upload -------------------------------------------------------------------------------------
async def test_an_upload_replaced_by_a_larger_one_after_its_size_check_is_refused(
    js: JetStreamContext,
    tmp_path: Path,
    bucket: str,
    sandbox: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The size comes from the object's info first; the fetch itself is bounded too, since the
    object may be replaced by a larger one in between (here: right after the check)."""
    limits = ArtifactLimits(max_upload_bytes=100_000, max_upload_entries=1000)
    runner = await _runner(js, tmp_path, bucket, limits)
    try:
        await put_object(js, bucket, "up.tar", io.BytesIO(_tar({"small": b"x"})))
        larger = _tar({f"f{index}": b"y" for index in range(300)})  # 300 KiB of tar, 300 bytes
        assert len(larger) > limits.max_upload_bytes
        object_size = ArtifactRunner._object_size

        async def check_then_replace(self: ArtifactRunner, bucket: str, name: str) -> int:
            size = await object_size(self, bucket, name)
            await put_object(js, bucket, name, io.BytesIO(larger))
            return size

        monkeypatch.setattr(ArtifactRunner, "_object_size", check_then_replace)
        reply = await _run(runner, sandbox, "upload", name="up.tar", path="in")
        assert not reply["success"]
        assert reply["error"] == (
            f"object 'up.tar' in bucket {bucket!r} is {len(larger)} bytes, over the limit of "
            "100000 bytes"
        )
        assert not (sandbox.workspace / "in").exists()
        assert list((tmp_path / "scratch").iterdir()) == []
    finally:
        await js.delete_object_store(bucket)
