"""A nats-server restart under load is not a disaster (issue 11, item 3).

Failed before: the calls in flight when the server stopped waited for their client's timeout
(their replies were lost with the connection), and an outage longer than the workers'
registration TTL (6 s at the default 2 s heartbeat) made every trajectory's next call a false
``workspace_lost``: the workers were alive and every workspace intact, but the server expired
their registrations as it came back, before they could beat.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.messages import ToolResult
from tests._nats_server import NatsServerProcess
from tests.conftest import StackFactory

_SERVED_AGAIN_WITHIN_S = 5.0  # of the server being back: every trajectory's calls succeed


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[NatsServerProcess]:
    server = NatsServerProcess(tmp_path / "nats-store")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(restartable: NatsServerProcess) -> str:  # the stack's server is this one
    return restartable.url


@pytest.mark.parametrize("outage_s", [2.0, 10.0], ids=["2s", "past-the-ttl"])
async def test_a_server_restart_loses_no_workspace_and_calls_succeed_again_soon(
    make_stack: StackFactory,
    restartable: NatsServerProcess,
    trajectory: Callable[[], str],
    outage_s: float,
) -> None:
    stack = await make_stack(executors=2, workers=2, slots=10, worker_options={"heartbeat_s": 2.0})
    client = stack.client
    tids = [trajectory() for _ in range(20)]
    for tid in tids:
        wrote = await client.execute(tid, "write_file", {"path": "mine", "content": tid})
        assert wrote.success, wrote.error
    answers: dict[str, list[tuple[float, ToolResult]]] = {tid: [] for tid in tids}
    stop = asyncio.Event()

    async def calls(tid: str) -> None:  # a trajectory's calls, one after the other
        while not stop.is_set():
            try:
                answer = await client.execute(tid, "terminal", {"command": "cat mine"}, timeout_s=5)
            except Exception as exc:  # while the server is down: no connection, no responders
                answer = ToolResult(success=False, error=repr(exc))
                await asyncio.sleep(0.2)
            answers[tid].append((time.monotonic(), answer))

    loops = [asyncio.create_task(calls(tid)) for tid in tids]
    await asyncio.sleep(1.0)
    restartable.stop()
    await asyncio.sleep(outage_s)
    restartable.start()
    back_at = time.monotonic()
    await asyncio.sleep(15)  # beyond every registration's TTL
    stop.set()
    await asyncio.gather(*loops)

    for tid in tids:
        lost = [a for _, a in answers[tid] if a.metadata.get("workspace_lost")]
        assert not lost, lost  # the workers were alive, every workspace intact
        after = [(at - back_at, a) for at, a in answers[tid] if at > back_at]
        wrong = [a for _, a in after if a.success and a.output != tid]
        assert not wrong, wrong
        # Calls succeed again soon, and from then on every call does.
        failed_late = [
            (at, a.error) for at, a in after if at > _SERVED_AGAIN_WITHIN_S and not a.success
        ]
        assert not failed_late, failed_late
        assert any(a.success for at, a in after if at <= _SERVED_AGAIN_WITHIN_S), after[:5]


async def test_an_executor_stopped_while_the_server_is_down_takes_no_call_after(
    make_stack: StackFactory, restartable: NatsServerProcess, trajectory: Callable[[], str]
) -> None:
    """Its drain cannot finish while the server is down; the interest it had must not come back
    with the reconnect and take calls it can no longer serve."""
    stack = await make_stack(
        executors=2, workers=1, slots=8, client_options={"execute_margin_s": 5.0}
    )
    leaving = stack.executors.pop(0)
    restartable.stop()
    stopping = asyncio.create_task(leaving.__aexit__(None, None, None))
    await asyncio.sleep(1.0)
    restartable.start()
    await asyncio.wait_for(stopping, 60)
    await asyncio.sleep(3.0)  # every connection is back, with its subscriptions
    answers = await asyncio.gather(
        *(
            stack.client.execute(trajectory(), "terminal", {"command": "echo ok"}, timeout_s=5)
            for _ in range(8)
        ),
        return_exceptions=True,
    )
    failed = [a for a in answers if not isinstance(a, ToolResult) or not a.success]
    assert not failed, failed
    assert leaving.total_requests == 0
