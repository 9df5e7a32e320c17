"""The NATS accounts in deploy/nats/ let each part of toolbus do its job, and no more.

A real nats-server runs deploy/nats/accounts.conf (with a small server block of our own: a free
port and a temporary store); the executor, a worker and a client each connect as their user.
Any permission violation the server reports fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from services._embedded import find_nats_server, free_port
from services.cli import _connect, nats_servers_and_auth
from services.client import ToolbusClient
from services.exceptions import NotFound
from services.executor import ExecutorService
from services.settings import Settings
from services.worker import SandboxWorker, WorkerConfig

DEPLOY_NATS = Path(__file__).parents[1] / "deploy" / "nats"
USERS = ("executor", "worker", "client", "admin", "sys")


@pytest.fixture
def secured_server(tmp_path: Path) -> Iterator[int]:
    """A nats-server with the deployment's accounts; yields its port."""
    shutil.copy(DEPLOY_NATS / "accounts.conf", tmp_path / "accounts.conf")
    port = free_port()
    (tmp_path / "server.conf").write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"jetstream {{ store_dir: {tmp_path / 'jetstream'} }}\n"
        "include ./accounts.conf\n"
    )
    env = {**os.environ, **{f"NATS_{user.upper()}_PASSWORD": f"pw{user}" for user in USERS}}
    log = tmp_path / "nats-server.log"
    server = subprocess.Popen(
        [str(find_nats_server()), "-c", str(tmp_path / "server.conf"), "-l", str(log)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                output = log.read_text() if log.exists() else ""
                pytest.fail(f"nats-server did not start with accounts.conf:\n{output}")
            time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


async def test_each_user_of_the_accounts_file_can_do_its_part(
    secured_server: int, tmp_path: Path
) -> None:
    violations: list[str] = []

    @contextlib.asynccontextmanager
    async def connected(user: str) -> AsyncIterator[Client]:
        async def on_error(exc: Exception) -> None:
            violations.append(f"{user}: {exc}")

        connection = await nats.connect(
            f"nats://{user}:pw{user}@127.0.0.1:{secured_server}", name=user, error_cb=on_error
        )
        try:
            yield connection
        finally:
            await connection.drain()

    config = WorkerConfig(
        worker_id="deploy-test", slots=2, workspace_root=tmp_path / "workers", min_free_disk_mb=0
    )
    async with (
        asyncio.timeout(120),  # a refused publish shows up as a request that never returns
        connected("worker") as worker_nc,
        SandboxWorker(worker_nc, config),
        connected("executor") as executor_nc,
        ExecutorService(executor_nc),
        connected("client") as client_nc,
    ):
        client = ToolbusClient(client_nc)
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w:gz") as tar:
            data = os.urandom(400_000)  # beyond the inline limit when read back
            info = tarfile.TarInfo("task/data.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        uploaded = await client.upload_archive("deploy-t1", archive.getvalue())
        assert uploaded.success, uploaded
        ran = await client.execute("deploy-t1", "terminal", {"command": "ls -l task"})
        assert ran.success and "data.bin" in ran.output, ran
        read = await client.read_artifact("deploy-t1", "task/data.bin")
        assert read.success and read.object is not None, read
        fetched = io.BytesIO()
        await client.fetch_artifact(read.object, fetched)
        assert fetched.getvalue() == data
        packed = await client.archive_artifacts("deploy-t1", "task")
        assert packed.success and packed.object is not None, packed
        await client.fetch_artifact(packed.object, tmp_path / "task.tar.gz")
        status = await client.status()
        assert status.pool.total_slots == 2
        # Both slots taken: a third trajectory waits in the queue, and gets the slot freed.
        assert (await client.execute("deploy-t2", "terminal", {"command": "true"})).success
        waiter = asyncio.create_task(client.execute("deploy-t3", "terminal", {"command": "true"}))
        while (await client.status()).waiting.trajectories == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await client.release("deploy-t2", reset_workspace=True)
        assert (await waiter).success
        await client.release("deploy-t3", reset_workspace=True)
        with pytest.raises(NotFound, match="Unknown tool"):  # asked of tools.external.* first
            await client.execute("deploy-t1", "web_search", {"query": "x"})
        await client.release("deploy-t1", reset_workspace=True)
    assert violations == []


def test_credentials_in_the_url_become_connect_options_for_every_server() -> None:
    servers, auth = nats_servers_and_auth(
        "nats://executor:p%40ss%3Aw0rd@nats-1:4222, nats://nats-2:4222,tls://[::1]:4443"
    )
    assert servers == ["nats://nats-1:4222", "nats://nats-2:4222", "tls://[::1]:4443"]
    assert auth == {"user": "executor", "password": "p@ss:w0rd"}
    assert nats_servers_and_auth("nats://s3cr3t@host") == (["nats://host"], {"token": "s3cr3t"})
    assert nats_servers_and_auth("127.0.0.1:4222") == (["nats://127.0.0.1:4222"], {})


async def test_a_process_fails_over_to_a_server_its_url_gave_no_credentials_for(
    secured_server: int,
) -> None:
    """Credentials written once in TOOLBUS_NATS_URL reach every server (here the first one in
    the list is down, the second has no credentials of its own in the URL)."""
    down = free_port()
    url = f"nats://executor:pwexecutor@127.0.0.1:{down},nats://127.0.0.1:{secured_server}"
    nc = await _connect(Settings(nats_url=url), "failover-test", service=False)
    try:
        assert nc.connected_url is not None and nc.connected_url.port == secured_server
        await nc.flush()
    finally:
        await nc.close()
