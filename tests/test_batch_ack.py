"""A worker's ack of a batch leaves before the batch's calls run, so the executor can send its
next batch while this one runs.

Failed before the ack went first (issue 10, item 5): the ack was published before the calls'
tasks ran, but nats-py writes what was published from a task of its own, which ran after the
batch's calls; a batch of fast tools (``read_file``, which never yields) was acknowledged only
once every call of it had run, and the worker sat idle while its next batch travelled.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from nats.aio.msg import Msg

from schemas.internal import BatchHeader, BatchItem, ItemResult
from tests.conftest import StackFactory


async def test_a_batch_is_acknowledged_on_the_wire_before_its_calls_run(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(workers=1)
    worker = stack.workers[0]
    wrote = await stack.client.execute("ack-first", "write_file", {"path": "a", "content": "x"})
    assert wrote.success, wrote.error

    events: list[str] = []
    # What the worker's connection writes to its socket, and when its tools run: a white-box
    # look, because the order of the two inside one process is what this is about.
    transport = worker._nc._transport  # type: ignore[attr-defined]
    writelines = transport.writelines

    def recording_writelines(chunks: list[bytes]) -> None:
        if any(b'"rejected":' in chunk for chunk in chunks):  # a BatchAck's JSON
            events.append("ack written")
        writelines(chunks)

    runner = worker._calls._tools  # type: ignore[attr-defined]
    run = runner.run

    async def recording_run(tool: str, *args: Any, **kwargs: Any) -> Any:
        events.append(f"{tool} runs")
        return await run(tool, *args, **kwargs)

    transport.writelines = recording_writelines
    runner.run = recording_run
    try:
        result = await stack.client.execute("ack-first", "read_file", {"path": "a"})
    finally:
        transport.writelines = writelines
        runner.run = run
    assert result.success and result.output == "x", result.error
    assert events[:2] == ["ack written", "read_file runs"], events


@pytest.mark.parametrize("turns_before_cancel", [0, 2], ids=["before-first-step", "at-the-gate"])
async def test_a_cancelled_call_of_a_batch_is_answered_and_spares_the_others(
    make_stack: StackFactory, turns_before_cancel: int
) -> None:
    # Found in review: at the gate, the calls of a batch awaited one shared future, so a cancel
    # of one cancelled that future and every call of the batch ("at-the-gate"); a call
    # cancelled before its task's first step (the batch and the cancel read in one turn)
    # published no result at all ("before-first-step", older than the gate).
    stack = await make_stack(workers=1, slots=2)
    worker = stack.workers[0]
    cancelled_tid, other_tid = f"cancelled-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    epochs = {}
    for tid in (cancelled_tid, other_tid):
        wrote = await stack.client.execute(tid, "write_file", {"path": "f", "content": tid})
        assert wrote.success, wrote.error
        epochs[tid] = worker._table.holding(tid).epoch  # type: ignore[union-attr]
    # On the worker's own connection: a subscription of another connection can take a moment
    # to be seen by the worker's publishes, even after a flush (nats-io/nats-server#2876).
    worker_nc = worker._nc  # type: ignore[attr-defined]
    inbox = worker_nc.new_inbox()
    results: dict[str, ItemResult] = {}
    came = asyncio.Event()

    async def on_results(msg: Msg) -> None:
        for line in msg.data.split(b"\n"):
            result = ItemResult.model_validate_json(line)
            if not result.started:
                results[result.item_id] = result
        came.set()

    subscription = await worker_nc.subscribe(inbox, cb=on_results)
    ids = {tid: f"{tid}-item" for tid in (cancelled_tid, other_tid)}
    lines = [BatchHeader(reply_to=inbox).model_dump_json()] + [
        BatchItem(
            item_id=ids[tid],
            trajectory_id=tid,
            epoch=epochs[tid],
            tool="read_file",
            arguments={"path": "f"},
            timeout_s=10,
        ).model_dump_json()
        for tid in (cancelled_tid, other_tid)
    ]
    calls = worker._calls  # type: ignore[attr-defined]
    ack, open_gate = calls.take_batch("\n".join(lines).encode(), "batch", None)
    assert not ack.rejected and not ack.unreadable
    for _ in range(turns_before_cancel):  # as when the ack's publish yields (a full buffer)
        await asyncio.sleep(0)
    assert calls.cancel([ids[cancelled_tid]]).outcomes[ids[cancelled_tid]] == "cancelled"
    open_gate()
    async with asyncio.timeout(10):
        while len(results) < 2:
            came.clear()
            await came.wait()
    await subscription.unsubscribe()
    cancelled, other = results[ids[cancelled_tid]].result, results[ids[other_tid]].result
    assert cancelled is not None and cancelled.metadata.get("cancelled") is True
    assert other is not None and other.success and other.output == other_tid, other
