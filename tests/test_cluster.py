"""A 3-node NATS cluster (deploy/nats/cluster.conf, buckets with three replicas made first as the
deploy README says) loses a node under load, and the service carries on (issue 11, item 4).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from schemas.messages import ToolResult
from services._cli_nats import connect
from services.client import ToolbusClient
from services.executor import ExecutorService
from services.settings import Settings
from services.worker import SandboxWorker, WorkerConfig
from tests._nats_cluster import NatsCluster, nats_cluster

_CARRIES_ON_WITHIN_S = 5.0  # of the node's loss: every trajectory's calls succeed again


async def _replicated_buckets(admin: Client) -> None:
    """What deploy/README.md has an operator make first, with three replicas."""
    js = admin.jetstream()
    async with asyncio.timeout(30):  # until the cluster has elected its JetStream leader
        while True:
            try:
                await js.account_info()
                break
            except Exception:
                await asyncio.sleep(0.2)
    for bucket, description in (
        ("toolbus-leases", "toolbus trajectory leases"),
        ("toolbus-workers", "toolbus sandbox workers"),
    ):
        await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=1, replicas=3, description=description)
        )
    await js.create_object_store(  # (nats-py takes the bucket's name apart from its config)
        "toolbus-artifacts", config=ObjectStoreConfig(replicas=3, ttl=24 * 3600)
    )
    await js.add_stream(
        StreamConfig(
            name="toolbus-waiting",
            subjects=["toolbus.waiting"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=3,
            max_age=3600,
            discard=DiscardPolicy.OLD,
        )
    )


@asynccontextmanager
async def _as(cluster: NatsCluster, user: str) -> AsyncIterator[Client]:
    nc = await connect(Settings(nats_url=cluster.url(user)), f"test-{user}")
    try:
        yield nc
    finally:
        await nc.close()


async def test_a_cluster_that_loses_a_node_under_load_carries_on(
    tmp_path: Path, trajectory: Callable[[], str]
) -> None:
    with nats_cluster(tmp_path / "nats") as cluster:
        async with AsyncExitStack() as stack:
            await _replicated_buckets(await stack.enter_async_context(_as(cluster, "admin")))
            for index in range(2):
                nc = await stack.enter_async_context(_as(cluster, "worker"))
                config = WorkerConfig(
                    worker_id=f"cluster-{index}-{os.getpid()}",
                    slots=10,
                    workspace_root=tmp_path / "workers" / f"w{index}",
                    heartbeat_s=2.0,
                    min_free_disk_mb=0,
                    spare_slots=0,
                )
                await stack.enter_async_context(SandboxWorker(nc, config))
            for _ in range(2):
                nc = await stack.enter_async_context(_as(cluster, "executor"))
                await stack.enter_async_context(ExecutorService(nc))
            # A call lost with the node is noticed 5 s past its timeout (not 45), then sent again.
            client = ToolbusClient(
                await stack.enter_async_context(_as(cluster, "client")), execute_margin_s=5
            )

            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w:gz") as tar:
                data = os.urandom(300_000)
                member = tarfile.TarInfo("data.bin")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            stored = await client.put_archive(archive.getvalue())

            tids = [trajectory() for _ in range(16)]
            for tid in tids:
                wrote = await client.execute(tid, "write_file", {"path": "mine", "content": tid})
                assert wrote.success, wrote.error
            calls: list[_Call] = []
            stop = asyncio.Event()

            async def loop(tid: str) -> None:
                # As a trainer does: a call that gets no answer is sent again, with its id.
                for number in itertools.count():
                    if stop.is_set():
                        return
                    call = _Call(tid, time.monotonic())
                    calls.append(call)
                    while call.result is None:
                        call.attempts += 1
                        try:
                            call.result = await client.execute(
                                tid, "terminal", {"command": "cat mine"},
                                uniq_id=f"{tid}-{number}", timeout_s=5,
                            )  # fmt: skip
                        except Exception as exc:  # no answer in time, no responders
                            call.errors.append(repr(exc))
                            await asyncio.sleep(0.2)
                    call.ended = time.monotonic()

            loops = [asyncio.create_task(loop(tid)) for tid in tids]
            await asyncio.sleep(2.0)
            cluster.kill(0)
            lost_at = time.monotonic()
            await asyncio.sleep(12)
            stop.set()
            await asyncio.gather(*loops)

            fetched = io.BytesIO()  # put before the loss, fetched after it
            await client.fetch_artifact(stored, fetched)
            assert fetched.getvalue() == archive.getvalue()

    for call in calls:
        assert call.result is not None
        assert not call.result.metadata.get("workspace_lost"), call  # every workspace intact
        assert call.result.success and call.result.output == call.tid, call
    after = [call for call in calls if call.started > lost_at]
    assert {call.tid for call in after} == set(tids)  # every trajectory went on
    # From a few seconds after the loss on, calls are answered at once, at their first try.
    late = [call for call in after if call.started > lost_at + _CARRIES_ON_WITHIN_S]
    assert late and all(call.attempts == 1 for call in late), [c for c in late if c.attempts > 1]
    assert max(call.ended - call.started for call in late) < 3, max(
        call.ended - call.started for call in late
    )


@dataclass(eq=False)
class _Call:
    tid: str
    started: float
    ended: float = 0.0
    attempts: int = 0
    result: ToolResult | None = None
    errors: list[str] = field(default_factory=list)
