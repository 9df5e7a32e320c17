"""Cross-language check: a nats.js client (tests/node/client.mjs) calls toolbus over plain NATS."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from typing import Any

import pytest

from schemas.artifacts import ObjectRef
from services.exceptions import NotFound
from tests._node import NodeClient, run_node
from tests.conftest import StackFactory


@pytest.mark.node
async def test_node_client_speaks_the_wire_contract(
    make_stack: StackFactory,
    nats_url: str,
    trajectory: Callable[[], str],
    node_client: NodeClient,
) -> None:
    stack = await make_stack()
    tid = trajectory()

    code, stdout, stderr = await run_node(node_client, nats_url, tid)

    output = f"--- node stdout ---\n{stdout}\n--- node stderr ---\n{stderr}"
    assert code == 0, f"node client exited with {code}\n{output}"
    lines = stdout.strip().splitlines()
    assert lines, f"node client printed no summary\n{output}"
    summary: dict[str, Any] = json.loads(lines[-1])
    assert summary["ok"] is True, output
    assert summary["trajectory_id"] == tid, output
    checks = summary["checks"]
    assert set(checks) == {
        "terminal",
        "write_read",
        "archive_fetch",
        "unknown_tool",
        "release",
        "ping",
    }, output

    terminal_lines = checks["terminal"]["output"].splitlines()
    assert terminal_lines[0] == "hello-from-node", output
    assert terminal_lines[1].startswith("/"), output
    assert checks["terminal"]["worker_id"] == stack.workers[0].worker_id, output
    assert checks["write_read"]["bytes"] > 0, output
    assert checks["unknown_tool"] == {
        "code": 404,
        "error": "unknown_tool",
        "header": "Unknown tool: no_such_tool",
    }, output
    fetched = checks["archive_fetch"]
    assert fetched["fetched_sha256"] == fetched["sha256"], output
    # The same object, fetched by the Python client, holds what the Node client made.
    archive = io.BytesIO()
    await stack.client.fetch_artifact(ObjectRef.model_validate(fetched), archive)
    with tarfile.open(fileobj=io.BytesIO(archive.getvalue())) as tar:
        names = set(tar.getnames())
        blob = tar.extractfile("deep/er/blob.bin")
        assert blob is not None and len(blob.read()) == 300_000
    assert {"deep", "deep/er", "deep/hi.txt", "empty"} <= names, output
    assert fetched["entry_count"] == len(names), output
    assert checks["release"]["status"] == "ok", output
    assert checks["ping"]["name"] == "toolbus", output
    assert checks["ping"]["id"] in {executor.executor_id for executor in stack.executors}, output

    # The release the Node client sent took effect: the trajectory no longer holds a slot.
    with pytest.raises(NotFound, match="No active slot for trajectory"):
        await stack.client.release(tid)
