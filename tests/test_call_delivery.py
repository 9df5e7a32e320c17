"""Every call gets exactly one true answer: no false failures, no dropped replies, no call that
runs after its caller was told it failed.

Each test here failed on the code before the dispatcher's run deadlines, worker-side cancels,
per-item batch reading and result fitting (shared/issue 9, items 6, 7 and 13).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from nats.aio.client import Client

from schemas.internal import BatchAck, BatchHeader, ItemResult
from services._requests import nats_request
from services.executor import ExecutorConfig
from tests.conftest import StackFactory


# -- 6. a deadline counts the run, not the wait behind the trajectory's earlier calls -----------
async def test_a_call_queued_behind_its_trajectorys_long_call_is_not_failed_early(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(executor_config=ExecutorConfig(result_grace_s=1.0))
    tid = trajectory()
    await stack.client.execute(tid, "terminal", {"command": "true"})
    long = asyncio.create_task(
        stack.client.execute(tid, "terminal", {"command": "sleep 4; echo long >> log"})
    )
    await asyncio.sleep(0.3)  # the long call runs; the next one queues behind it
    queued = await stack.client.execute(
        tid, "terminal", {"command": "echo queued >> log; echo ok"}, timeout_s=1
    )
    assert queued.success and queued.output == "ok\n", queued.error
    assert (await long).success
    log = await stack.client.execute(tid, "read_file", {"path": "log"})
    assert log.output == "long\nqueued\n"  # each ran once, in order


async def test_a_call_given_up_on_is_cancelled_on_the_worker_before_the_caller_hears(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(executor_config=ExecutorConfig(result_grace_s=1.0))
    tid = trajectory()
    started = await stack.client.execute(tid, "tmux", {"action": "start"})
    assert started.success, started.error
    # send_keys with block waits min_wait_s whatever its timeout: past timeout_s + grace the
    # executor gives up on it, and must stop it on the worker first.
    stuck = await stack.client.execute(
        tid,
        "tmux",
        {"action": "send_keys", "keys": "true", "block": True, "min_wait_s": 40},
        timeout_s=1,
    )
    assert not stuck.success
    assert stuck.metadata["error_kind"] == "infra"
    assert stuck.metadata["cancelled"] is True
    assert "cancelled on the worker" in stuck.error
    # The slot is free for the trajectory's next call: nothing of the stuck one still runs.
    after = await stack.client.execute(tid, "terminal", {"command": "echo next"}, timeout_s=5)
    assert after.success and after.output == "next\n", after.error


# -- 7. no reply is ever dropped, however large ------------------------------------------------
async def test_a_result_larger_than_a_nats_message_comes_back_cut_and_flagged(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(
        worker_options={"max_output_chars": 3_000_000},
        client_options={"execute_margin_s": 5.0},
    )
    tid = trajectory()
    # 2 MB of NUL bytes: six JSON characters each, 12 MB as a result.
    result = await stack.client.execute(
        tid, "terminal", {"command": "head -c 2000000 /dev/zero"}, timeout_s=20
    )
    assert result.success, result.error
    assert result.metadata["truncated"] is True
    assert result.metadata["output_cut_to_fit"] is True
    assert result.metadata["stdout_bytes"] == 2_000_000
    assert 0 < len(result.output) < 200_000
    assert set(result.output) == {"\x00"}


async def test_an_artifact_read_of_nul_bytes_as_text_is_answered(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(client_options={"request_timeout_s": 20.0})
    tid = trajectory()
    made = await stack.client.execute(tid, "terminal", {"command": "head -c 200000 /dev/zero > z"})
    assert made.success
    read = await stack.client.read_artifact(tid, "z", timeout_s=10)
    assert read.success and read.bytes == 200_000


# -- 13. one item the worker cannot read never spoils the batch it came in ----------------------
async def test_a_worker_answers_an_unreadable_batch_item_alone(
    make_stack: StackFactory, trajectory: Callable[[], str], nc: Client
) -> None:
    stack = await make_stack()
    worker = stack.workers[0]
    tid = trajectory()
    first = await stack.client.execute(tid, "terminal", {"command": "echo warm"})
    assert first.success
    lease = stack.executors[0]._placement.cached(tid)
    assert lease is not None
    inbox = nc.new_inbox()
    results: asyncio.Queue[ItemResult] = asyncio.Queue()

    async def collect(msg: object) -> None:
        await results.put(ItemResult.model_validate_json(msg.data))  # type: ignore[attr-defined]

    sub = await nc.subscribe(inbox, cb=collect)
    good = {
        "item_id": "good",
        "trajectory_id": tid,
        "epoch": lease.epoch,
        "tool": "terminal",
        "arguments": {"command": "echo fine"},
        "timeout_s": 5,
    }
    too_deep = '{"item_id": "deep", "arguments": ' + "[" * 300 + "]" * 300 + "}"
    body = b"\n".join(
        [
            BatchHeader(reply_to=inbox).model_dump_json().encode(),
            too_deep.encode(),
            b"not json at all",
            json.dumps(good).encode(),
        ]
    )
    reply = await nats_request(nc, f"toolbus.worker.{worker.worker_id}.batch", body, timeout=5)
    ack = BatchAck.model_validate_json(reply.data)
    assert ack.unreadable == [0, 1]
    assert ack.rejected == {}
    done = await asyncio.wait_for(results.get(), 10)
    assert done.item_id == "good"
    assert done.result is not None and done.result.output == "fine\n"
    await sub.unsubscribe()
