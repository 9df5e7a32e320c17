"""Results go back to the executor several to a message (JSON lines), never dropped or reordered,
each cut to fit on its own; the executor reads each line of such a message on its own.

These failed before results were sent per loop turn (shared/issue 10, item 5): there was no
ResultSender, and the executor read a message as one result only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.internal import ItemResult
from schemas.messages import ToolResult
from services._result_sender import ResultSender
from tests.conftest import StackFactory


async def _collect(nc: Client, subject: str) -> tuple[list[bytes], asyncio.Event, list[str]]:
    """Messages on ``subject``; the event is set each time one comes (with the ids seen)."""
    messages: list[bytes] = []
    seen: list[str] = []
    came = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        messages.append(msg.data)
        seen.extend(ItemResult.model_validate_json(line).item_id for line in msg.data.split(b"\n"))
        came.set()

    await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    return messages, came, seen


async def _until_seen(came: asyncio.Event, seen: list[str], count: int) -> None:
    async with asyncio.timeout(10):
        while len(seen) < count:
            came.clear()
            await came.wait()


async def test_the_results_of_one_loop_turn_go_as_one_message_in_order(nc: Client) -> None:
    inbox = nc.new_inbox()
    messages, came, seen = await _collect(nc, inbox)
    sender = ResultSender(nc)
    ids = [f"item-{k}" for k in range(5)]
    for item_id in ids:
        sender.send(inbox, ItemResult(item_id=item_id, result=ToolResult(success=True, output="x")))
    await sender.flush()
    await _until_seen(came, seen, len(ids))
    assert seen == ids
    assert len(messages) == 1
    assert (sender.messages_sent, sender.results_sent) == (1, 5)


async def test_a_message_of_several_results_one_too_big_stays_under_max_payload(
    nc: Client,
) -> None:
    inbox = nc.new_inbox()
    messages, came, seen = await _collect(nc, inbox)
    sender = ResultSender(nc)
    big = "y" * (2 * nc.max_payload)
    sender.send(inbox, ItemResult(item_id="small", result=ToolResult(success=True, output="a")))
    sender.send(inbox, ItemResult(item_id="big", result=ToolResult(success=True, output=big)))
    sender.send(inbox, ItemResult(item_id="notice", started=True))
    sender.send(inbox, ItemResult(item_id="last", reply={"success": True, "entries": []}))
    await sender.flush()
    await _until_seen(came, seen, 4)
    assert seen == ["small", "big", "notice", "last"]  # each once, in the order queued
    assert 1 < len(messages) < 4  # the big one forced a second message, not one each
    assert all(len(message) <= nc.max_payload for message in messages)
    results = {
        item.item_id: item
        for item in (
            ItemResult.model_validate_json(line)
            for message in messages
            for line in message.split(b"\n")
        )
    }
    cut = results["big"].result
    assert cut is not None and cut.success
    assert cut.metadata["truncated"] is True and cut.metadata["output_cut_to_fit"] is True
    assert 0 < len(cut.output) < len(big) and big.startswith(cut.output)
    assert results["notice"].started and results["notice"].result is None
    assert results["last"].reply == {"success": True, "entries": []}


async def test_the_executor_reads_every_line_of_a_message_of_results(
    make_stack: StackFactory, trajectory: Callable[[], str], nc: Client
) -> None:
    stack = await make_stack(workers=1)
    executor = stack.executors[0]
    first, second = trajectory(), trajectory()
    calls = [
        asyncio.create_task(
            stack.client.execute(tid, "terminal", {"command": "sleep 30"}, timeout_s=60)
        )
        for tid in (first, second)
    ]
    pending = executor._dispatcher._pending
    async with asyncio.timeout(30):
        while len(pending) < 2:  # noqa: ASYNC110 - executor state that has no event to await
            await asyncio.sleep(0.02)
    item_ids = list(pending)
    # What a worker sends: JSON lines; one line that is not a result spoils nothing.
    lines = [
        ItemResult(item_id=item_ids[0], result=ToolResult(success=True, output="one")),
        ItemResult(item_id=item_ids[1], result=ToolResult(success=True, output="two")),
    ]
    body = b"\n".join(
        [lines[0].model_dump_json().encode(), b"not a result", lines[1].model_dump_json().encode()]
    )
    await nc.publish(executor._results_subject, body)
    async with asyncio.timeout(10):
        answered = await asyncio.gather(*calls)
    assert sorted(result.output for result in answered) == ["one", "two"]
    for tid in (first, second):
        await stack.client.release(tid, reset_workspace=True)
