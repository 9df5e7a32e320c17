"""Node.js for the cross-language tests: the nats.js client scripts in tests/node.

Node.js and npm are test prerequisites, like nats-server: a test that needs them fails, not
skips, without them. The ``node_client`` fixture is provided through conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

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


async def run_node(client: NodeClient, *args: str) -> tuple[int, str, str]:
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
