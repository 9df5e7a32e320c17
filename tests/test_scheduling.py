"""Slots, leases and batching across executors and workers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.internal import BatchAck, BatchItem
from services._batcher import Accepted, OutgoingItem, WorkerLink
from services._requests import nats_request
from services.exceptions import NoCapacity, Overloaded
from services.executor import ExecutorConfig
from tests.conftest import StackFactory


async def test_fifty_trajectories_on_two_executors_and_two_workers_see_only_their_own_files(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(executors=2, workers=2, slots=25)
    client = stack.client

    async def rollout(tid: str) -> set[tuple[str, int]]:
        secret = f"content of {tid}"
        wrote = await client.execute(tid, "write_file", {"path": "mine.txt", "content": secret})
        read = await client.execute(tid, "read_file", {"path": "mine.txt"})
        cat = await client.execute(tid, "terminal", {"command": "cat mine.txt; ls | wc -l"})
        assert wrote.success, wrote.error
        assert read.output == secret
        assert cat.output == f"{secret}1\n"  # no newline in the file; one file in the workspace
        return {(r.metadata["worker_id"], r.metadata["slot"]) for r in (wrote, read, cat)}

    ids = [trajectory() for _ in range(50)]
    placements = await asyncio.gather(*(rollout(tid) for tid in ids))
    # Each trajectory kept one slot for all its calls, and no two trajectories shared one.
    assert all(len(placement) == 1 for placement in placements)
    assert len({next(iter(placement)) for placement in placements}) == 50
    # Both executors served requests (the queue group spread them) and both workers ran calls.
    assert all(executor.total_requests > 0 for executor in stack.executors)
    assert all(worker.calls_completed > 0 for worker in stack.workers)
    await asyncio.gather(*(client.release(tid, reset_workspace=True) for tid in ids))
    await asyncio.gather(*(worker.wait_settled() for worker in stack.workers))
    assert sum(worker.slots_free for worker in stack.workers) == 50


async def test_a_slow_call_does_not_hold_back_another_trajectory(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(workers=1, slots=2)
    slow_tid, quick_tid = trajectory(), trajectory()
    await asyncio.gather(
        stack.client.execute(slow_tid, "terminal", {"command": "true"}),
        stack.client.execute(quick_tid, "terminal", {"command": "true"}),
    )
    slow = asyncio.create_task(stack.client.execute(slow_tid, "terminal", {"command": "sleep 5"}))
    await asyncio.sleep(0.2)  # the slow call is running on the worker
    started = time.monotonic()
    quick = await stack.client.execute(quick_tid, "terminal", {"command": "echo quick"})
    elapsed = time.monotonic() - started
    assert quick.output == "quick\n"
    assert not slow.done()
    # Generous bound on a noisy machine; the point is "not 5 seconds".
    assert elapsed < 1.0, f"a trivial call waited {elapsed:.2f}s behind another trajectory"
    assert (await slow).success


async def test_calls_of_one_trajectory_run_in_order(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    await stack.client.execute(tid, "terminal", {"command": "true"})
    calls = [
        stack.client.execute(tid, "terminal", {"command": f"echo {i} >> order.txt"})
        for i in range(20)
    ]
    # Sent one after another on one connection, they arrive in order; each appends a line.
    tasks = [asyncio.create_task(call) for call in calls]
    await asyncio.gather(*tasks)
    result = await stack.client.execute(tid, "read_file", {"path": "order.txt"})
    assert result.output.split() == [str(i) for i in range(20)]


async def test_acquiring_a_slot_has_a_deadline_and_fails_with_503(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(
        workers=1, slots=1, executor_config=ExecutorConfig(acquire_timeout_s=0.5)
    )
    holder, waiter = trajectory(), trajectory()
    await stack.client.execute(holder, "terminal", {"command": "true"})
    started = time.monotonic()
    with pytest.raises(NoCapacity, match=r"no free slot within 0\.5s") as refused:
        await stack.client.execute(waiter, "terminal", {"command": "true"})
    assert refused.value.code == 503
    assert time.monotonic() - started < 5
    # Once the slot is released the waiting trajectory gets it.
    await stack.client.release(holder)
    assert (await stack.client.execute(waiter, "terminal", {"command": "echo in"})).output == "in\n"
    await stack.client.release(waiter)


async def test_a_waiting_trajectory_gets_a_slot_freed_before_its_deadline(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(
        workers=1, slots=1, executor_config=ExecutorConfig(acquire_timeout_s=10)
    )
    holder, waiter = trajectory(), trajectory()
    await stack.client.execute(holder, "terminal", {"command": "true"})
    waiting = asyncio.create_task(stack.client.execute(waiter, "terminal", {"command": "echo ok"}))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await stack.client.release(holder)
    assert (await asyncio.wait_for(waiting, 5)).output == "ok\n"
    await stack.client.release(waiter)


async def test_two_executors_racing_for_a_new_trajectory_agree_on_one_slot(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(executors=2, workers=2, slots=3)
    first, second = stack.executors
    w1, w2 = stack.workers
    # Steer each executor to a different worker so that both acquire, and one must give way.
    first._registry.note_full(w2.worker_id)
    second._registry.note_full(w1.worker_id)
    tid = trajectory()
    results = await asyncio.gather(
        first.execute(tid, "terminal", {"command": "echo a"}, timeout_s=10, uniq_id=None),
        second.execute(tid, "terminal", {"command": "echo b"}, timeout_s=10, uniq_id=None),
    )
    placements = {(r.metadata["worker_id"], r.metadata["slot"]) for r in results}
    assert len(placements) == 1, placements
    # The loser gave its slot back: exactly one slot is taken across both workers.
    assert w1.slots_free + w2.slots_free == 5
    await stack.client.release(tid)
    assert w1.slots_free + w2.slots_free == 6


async def test_service_discovery_reports_true_counts(
    make_stack: StackFactory, trajectory: Callable[[], str], nc: Client
) -> None:
    stack = await make_stack(executors=2)
    tid = trajectory()
    ids = {executor.executor_id for executor in stack.executors}

    inbox = nc.new_inbox()
    replies: list[dict[str, object]] = []

    async def collect(msg: Msg) -> None:
        replies.append(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=collect)
    # A fresh subscription may be missed by one publish (nats-server#2876): ping until both
    # executors have answered, as a discovering client would.
    for _ in range(20):
        await nc.publish("$SRV.PING.toolbus", b"", reply=inbox)
        await asyncio.sleep(0.1)
        if {reply["id"] for reply in replies} >= ids:
            break
    await sub.unsubscribe()
    mine = {str(reply["id"]): reply for reply in replies if reply["id"] in ids}
    assert set(mine) == ids
    assert all(reply["type"] == "io.nats.micro.v1.ping_response" for reply in mine.values())

    executor = stack.executors[0]
    subject = f"$SRV.STATS.toolbus.{executor.executor_id}"
    for _ in range(3):
        await executor.execute(tid, "terminal", {"command": "true"}, timeout_s=5, uniq_id=None)
    info = json.loads(
        (await nats_request(nc, f"$SRV.INFO.toolbus.{executor.executor_id}", b"", timeout=5)).data
    )
    assert info["type"] == "io.nats.micro.v1.info_response"
    assert [e["subject"] for e in info["endpoints"]] == [
        "tools.execute.*",
        "tools.artifacts.*",
        "tools.release",
        "tools.status",
        "tools.list",
    ]
    assert {e["queue_group"] for e in info["endpoints"]} == {"toolbus"}

    before = json.loads((await nats_request(nc, subject, b"", timeout=5)).data)
    before_execute = before["endpoints"][0]
    # Requests through NATS are what the endpoint counts; send them to this executor only by
    # making it the only one listening.
    await stack.executors[1].__aexit__(None, None, None)
    stack.executors.pop()
    await asyncio.gather(
        *(stack.client.execute(tid, "terminal", {"command": "true"}) for _ in range(4))
    )
    with pytest.raises(Exception, match="Unknown tool"):
        await stack.client.execute(tid, "nope")
    after = json.loads((await nats_request(nc, subject, b"", timeout=5)).data)["endpoints"][0]
    assert after["num_requests"] - before_execute["num_requests"] == 5
    assert after["num_errors"] - before_execute["num_errors"] == 1
    assert "Unknown tool: nope" in after["last_error"]
    assert after["processing_time"] > before_execute["processing_time"]
    assert after["average_processing_time"] > 0


async def test_worker_link_sends_at_once_when_idle_and_coalesces_while_in_flight(
    nc: Client,
) -> None:
    subject = nc.new_inbox()
    sizes: list[int] = []

    async def slow_worker(msg: Msg) -> None:
        _header, *items = msg.data.split(b"\n")  # JSON lines: the header, then one per item
        sizes.append(len([BatchItem.model_validate_json(line) for line in items]))
        await asyncio.sleep(0.1)  # the batch stays in flight for a while
        await msg.respond(BatchAck().model_dump_json().encode())

    sub = await nc.subscribe(subject, cb=slow_worker)
    link = WorkerLink(
        nc, subject=subject, reply_to="unused", window_s=1.0, max_items=8, max_bytes=1 << 20
    )

    def item(i: int) -> OutgoingItem:
        return OutgoingItem.of(
            BatchItem(
                item_id=str(i),
                trajectory_id="t",
                epoch=1,
                tool="terminal",
                arguments={},
                timeout_s=1,
            )
        )

    started = time.monotonic()
    first = link.submit(item(0))
    assert await first is Accepted.RUNNING
    assert time.monotonic() - started < 0.5  # idle link: sent at once, not after the window
    assert sizes == [1]

    # While one batch is in flight the next ones wait and go together (bounded by max_items).
    in_flight = link.submit(item(1))
    await asyncio.sleep(0.01)
    rest = [link.submit(item(i)) for i in range(2, 22)]
    await asyncio.gather(in_flight, *rest)
    assert sizes[1] == 1
    assert sum(sizes) == 22
    assert max(sizes) == 8
    assert len(sizes) < 22 - 5  # coalesced, not one message per call
    await link.close()
    await sub.unsubscribe()


async def test_an_executor_past_its_call_limit_answers_429(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=8, executor_config=ExecutorConfig(max_pending_calls=2))
    tids = [trajectory() for _ in range(5)]
    outcomes = await asyncio.gather(
        *(stack.client.execute(tid, "terminal", {"command": "sleep 0.5"}) for tid in tids),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(served) == 2
    assert len(refused) == 3
    assert "retry later" in refused[0].message
    assert (await stack.client.execute(tids[0], "terminal", {"command": "echo ok"})).success


async def test_a_lost_worker_is_an_infra_failure_and_the_next_call_gets_a_new_slot(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(workers=2, slots=2)
    tid = trajectory()
    first = await stack.client.execute(tid, "write_file", {"path": "f", "content": "x"})
    lost = next(w for w in stack.workers if w.worker_id == first.metadata["worker_id"])
    await lost.__aexit__(None, None, None)  # the worker goes away (deregisters)
    stack.workers.remove(lost)

    after = await stack.client.execute(tid, "read_file", {"path": "f"}, uniq_id="u")
    assert not after.success
    assert after.uniq_id == "u"
    assert after.metadata["error_kind"] == "infra"
    assert after.metadata["workspace_lost"] is True
    assert "workspace is lost" in after.error
    again = await stack.client.execute(tid, "terminal", {"command": "echo fresh"})
    assert again.success
    assert again.metadata["worker_id"] == stack.workers[0].worker_id
    # The executor does not keep a link to the gone worker once it links to another one.
    links = stack.executors[0]._dispatcher.links
    assert set(links) == {stack.workers[0].worker_id}


async def test_an_idle_slot_expires_and_the_next_call_says_so(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=2, worker_options={"slot_idle_timeout_s": 1.0})
    worker = stack.workers[0]
    idle, busy = trajectory(), trajectory()
    assert (await stack.client.execute(idle, "write_file", {"path": "f", "content": "x"})).success
    # A call that runs longer than the timeout keeps its slot: idle means between calls.
    long_call = await stack.client.execute(busy, "terminal", {"command": "sleep 2.5; echo done"})
    assert long_call.success and long_call.output == "done\n"
    assert worker.slots_free == 1  # the idle trajectory's slot expired meanwhile

    expired = await stack.client.execute(idle, "read_file", {"path": "f"}, uniq_id="u")
    assert not expired.success and expired.uniq_id == "u"
    assert expired.metadata["error_kind"] == "infra"
    assert expired.metadata["expired"] is True and expired.metadata["workspace_lost"] is True
    assert "slot_idle_timeout_s" in (expired.error or "")
    fresh = await stack.client.execute(idle, "terminal", {"command": "ls -A | wc -l"})
    assert fresh.success and fresh.output.strip() == "0"  # a new, empty workspace
    after_busy = await stack.client.execute(busy, "terminal", {"command": "echo still"})
    assert after_busy.success
