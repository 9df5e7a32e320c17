"""Drain: SIGTERM to an executor under load stops its intake at once, answers what it holds and
exits when that is done; a rolling restart of two executors under load loses no call (issue 11,
item 5).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.messages import ToolResult
from tests._processes import executor_process
from tests.conftest import StackFactory


async def _executor_ids(nc: Client) -> set[str]:
    """The executors that answer a discovery ping now."""
    inbox = nc.new_inbox()
    ids: set[str] = set()

    async def collect(msg: Msg) -> None:
        ids.add(str(json.loads(msg.data)["id"]))

    subscription = await nc.subscribe(inbox, cb=collect)
    await nc.publish("$SRV.PING.toolbus", b"", reply=inbox)
    await asyncio.sleep(0.3)
    await subscription.unsubscribe()
    return ids


async def test_a_rolling_restart_of_two_executors_under_load_loses_no_call(
    make_stack: StackFactory, nats_url: str, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(executors=0, workers=1, slots=10)
    client = stack.client
    tids = [trajectory() for _ in range(10)]
    answers: list[ToolResult | BaseException] = []
    stop = asyncio.Event()

    async def calls(tid: str) -> None:
        while not stop.is_set():
            try:
                answers.append(
                    await client.execute(tid, "terminal", {"command": "sleep 0.2; echo ok"})
                )
            except Exception as exc:
                answers.append(exc)

    def answering(count: int) -> Callable[[], Awaitable[bool]]:
        async def ready() -> bool:
            return len(await _executor_ids(client.nc)) >= count

        return ready

    stopped_within = []
    async with AsyncExitStack() as processes:
        first = await processes.enter_async_context(executor_process(nats_url, ready=answering(1)))
        second = await processes.enter_async_context(executor_process(nats_url, ready=answering(2)))
        loops = [asyncio.create_task(calls(tid)) for tid in tids]
        await asyncio.sleep(2)
        # Each in turn: SIGTERM, its exit, a new one in its place, as a rolling deploy does.
        for old in (first, second):
            old.send_signal(signal.SIGTERM)
            asked = time.monotonic()
            await asyncio.wait_for(old.wait(), 30)
            stopped_within.append(time.monotonic() - asked)
            await processes.enter_async_context(executor_process(nats_url, ready=answering(2)))
            await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*loops)
    failed = [a for a in answers if not isinstance(a, ToolResult) or not a.success]
    assert not failed, failed[:5]
    assert len(answers) > 50
    # It answered what it held (calls of 0.2 s) and went: no wait for a drain timeout.
    assert all(seconds < 5 for seconds in stopped_within), stopped_within
