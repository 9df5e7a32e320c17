"""Cross-language check: a nats.js client (tests/node/client.mjs) calls toolbus over plain NATS.

Node.js and npm are test prerequisites, like nats-server: the test fails, not skips, without them.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from schemas.artifacts import ObjectRef
from services.exceptions import NotFound
from tests.conftest import StackFactory

NODE_DIR = Path(__file__).parent / "node"
CLIENT_SCRIPT = NODE_DIR / "client.mjs"
NPM_TIMEOUT_S = 300
NODE_TIMEOUT_S = 90


@dataclass(frozen=True)
class NodeClient:
    node: str
    script: Path


def _installed_nats_matches_pin() -> bool:
    """True if node_modules holds exactly the nats version package.json pins."""
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["nats"]
    installed = NODE_DIR / "node_modules" / "nats" / "package.json"
    if not installed.is_file():
        return False
    return bool(json.loads(installed.read_text()).get("version") == pinned)


@pytest.fixture(scope="session")
def node_client() -> NodeClient:
    """Node.js with the test client's dependencies installed (npm ci, once, if needed)."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
        pytest.fail(
            f"{missing} not found on PATH: Node.js (>= 18) and npm are prerequisites of the "
            "test suite (tests/node, marker 'node'); install them, e.g. `apt-get install nodejs "
            "npm`, or deselect with `-m 'not node'`.",
            pytrace=False,
        )
    if not _installed_nats_matches_pin():
        locked = (NODE_DIR / "package-lock.json").is_file()
        command = [npm, "ci" if locked else "install", "--no-audit", "--no-fund"]
        try:
            done = subprocess.run(
                command,
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"`{' '.join(command[1:])}` in {NODE_DIR} took over {NPM_TIMEOUT_S}s "
                "(is the npm registry reachable?)",
                pytrace=False,
            )
        if done.returncode != 0:
            pytest.fail(
                f"`npm {' '.join(command[1:])}` in {NODE_DIR} failed with exit code "
                f"{done.returncode} (is the npm registry reachable?)\n"
                f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}",
                pytrace=False,
            )
        if not _installed_nats_matches_pin():
            pytest.fail(f"npm install in {NODE_DIR} did not install the pinned nats version")
    return NodeClient(node=node, script=CLIENT_SCRIPT)


async def _run_node(client: NodeClient, *args: str) -> tuple[int, str, str]:
    """Run the Node client without blocking the loop the executor and workers run on."""
    process = await asyncio.create_subprocess_exec(
        client.node,
        str(client.script),
        *args,
        cwd=NODE_DIR,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        stdout, stderr = await process.communicate()
        pytest.fail(
            f"node client did not finish within {NODE_TIMEOUT_S}s\n"
            f"--- stdout ---\n{stdout.decode(errors='replace')}\n"
            f"--- stderr ---\n{stderr.decode(errors='replace')}"
        )
    assert process.returncode is not None
    return process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


@pytest.mark.node
async def test_node_client_speaks_the_wire_contract(
    make_stack: StackFactory,
    nats_url: str,
    trajectory: Callable[[], str],
    node_client: NodeClient,
) -> None:
    stack = await make_stack()
    tid = trajectory()

    code, stdout, stderr = await _run_node(node_client, nats_url, tid)

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
