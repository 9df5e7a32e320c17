"""A call retried with the same ``uniq_id`` runs once: the retry gets the first run's result.

Failed before the worker kept its calls by id (issue 11, item 1): a client that retried a
timed-out call with the same ``uniq_id``, after its executor was killed, ran it twice in 60 to 83
of 79 to 106 retries; every test here ran the command twice or answered a retry with a run of its
own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from nats.aio.msg import Msg

from schemas.internal import BatchAck, BatchHeader, BatchItem, ItemResult
from services.client import ToolbusClient
from services.exceptions import NoCapacity
from services.executor import ExecutorConfig
from services.worker import SandboxWorker
from tests._processes import executor_process
from tests._waits import until
from tests.conftest import StackFactory

# Counts its runs in the workspace, and says which run it was once it has slept.
_COUNTED = "echo run >> runs; sleep {sleep}; wc -l < runs"
# Says it waits, then waits for the test's word (a file the test makes).
_UNTIL_GO = "touch waiting; while [ ! -e go ]; do sleep 0.05; done"


async def _runs(client: ToolbusClient, tid: str) -> str:
    counted = await client.execute(tid, "terminal", {"command": "wc -l < runs"})
    assert counted.success, counted.error
    return counted.output.strip()


async def test_a_retry_after_its_executor_was_killed_gets_the_first_runs_result(
    make_stack: StackFactory, nats_url: str, trajectory: Callable[[], str]
) -> None:
    # The case: the executor holding the call dies mid-run; the client times out and
    # retries with the same id, and the retry reaches another executor.
    stack = await make_stack(executors=0, workers=1)
    client, worker, tid = stack.client, stack.workers[0], trajectory()

    async def answers() -> bool:
        try:
            await asyncio.wait_for(client.status(), 2)
        except Exception:
            return False
        return True

    async with executor_process(nats_url, ready=answers) as doomed:
        first = asyncio.create_task(
            client.execute(tid, "terminal", {"command": _COUNTED.format(sleep=4)}, uniq_id="c1")
        )
        await until(lambda: _workspace_has(worker, tid, "runs"))
        os.kill(doomed.pid, signal.SIGKILL)
        await doomed.wait()
    first.cancel()  # its executor is gone: it would wait for its own timeout

    survivor = await make_stack(executors=1, workers=0)
    retried = await survivor.client.execute(
        tid, "terminal", {"command": _COUNTED.format(sleep=4)}, uniq_id="c1"
    )
    assert retried.success, retried.error
    assert retried.output == "1\n"  # the first run's own output: it waited for that run
    assert retried.uniq_id == "c1" and retried.metadata["replayed"] is True
    assert await _runs(survivor.client, tid) == "1"


async def test_concurrent_retries_through_two_executors_all_get_the_one_run(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(executors=2, workers=1)
    tid = trajectory()
    command = {"command": _COUNTED.format(sleep=1)}
    results = await asyncio.gather(
        *(stack.client.execute(tid, "terminal", command, uniq_id="same") for _ in range(6))
    )
    assert [(r.success, r.output) for r in results] == [(True, "1\n")] * 6, results
    assert await _runs(stack.client, tid) == "1"


async def test_a_retry_after_the_run_gets_its_result_and_a_new_id_runs_again(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(executors=2, workers=1)
    tid = trajectory()
    command = {"command": "echo run >> runs; date +%s%N"}
    first = await stack.client.execute(tid, "terminal", command, uniq_id="a")
    again = await stack.client.execute(tid, "terminal", command, uniq_id="a")
    assert first.success and again.success, (first.error, again.error)
    assert again.output == first.output  # the stored result, not a second run
    assert again.metadata["replayed"] is True
    assert "replayed" not in first.metadata
    other = await stack.client.execute(tid, "terminal", command, uniq_id="b")
    assert other.success and other.output != first.output
    unnamed = [await stack.client.execute(tid, "terminal", command) for _ in range(2)]
    assert all(result.success for result in unnamed)
    assert await _runs(stack.client, tid) == "4"  # a, b and the two calls without an id


async def test_a_failed_run_is_the_answer_to_its_retry_too(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    command = {"command": "echo run >> runs; exit 3"}
    first = await stack.client.execute(tid, "terminal", command, uniq_id="f")
    again = await stack.client.execute(tid, "terminal", command, uniq_id="f")
    assert not first.success and first.metadata["exit_code"] == 3
    assert not again.success and again.metadata["exit_code"] == 3
    assert await _runs(stack.client, tid) == "1"


async def test_after_the_window_a_retry_runs_again(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(worker_options={"retry_window_s": 0.5})
    tid = trajectory()
    command = {"command": "echo run >> runs"}
    assert (await stack.client.execute(tid, "terminal", command, uniq_id="w")).success
    await asyncio.sleep(0.7)
    assert (await stack.client.execute(tid, "terminal", command, uniq_id="w")).success
    assert await _runs(stack.client, tid) == "2"


async def test_a_retry_whose_result_is_no_longer_held_is_refused_not_run(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    # Results are held within a memory budget; past it the oldest go, but their ids stay
    # known for the window, so a retry of one is answered, never run a second time.
    # Room for one result of 2,000 characters (about 2.5 KB held) and a few ids, not two.
    stack = await make_stack(worker_options={"retry_memory_bytes": 4000})
    tid = trajectory()
    command = {"command": "echo run >> runs; head -c 2000 /dev/zero | tr '\\0' a"}
    assert (await stack.client.execute(tid, "terminal", command, uniq_id="old")).success
    assert (await stack.client.execute(tid, "terminal", command, uniq_id="new")).success
    refused = await stack.client.execute(tid, "terminal", command, uniq_id="old")
    assert not refused.success
    assert refused.metadata["error_kind"] == "infra"
    assert refused.metadata["replayed"] is True
    assert "already ran" in refused.error and "no longer held" in refused.error
    assert await _runs(stack.client, tid) == "2"


async def test_a_released_trajectory_starts_afresh_whatever_ids_it_used(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    command = {"command": "echo run >> runs; wc -l < runs"}
    assert (await stack.client.execute(tid, "terminal", command, uniq_id="r")).output == "1\n"
    await stack.client.release(tid, reset_workspace=True)
    again = await stack.client.execute(tid, "terminal", command, uniq_id="r")
    assert again.success and again.output == "1\n"  # ran in its new workspace
    assert "replayed" not in again.metadata


# -- on the worker, item by item ---------------------------------------------------------------
class _Batches:
    """Batches sent straight to a worker's calls, and the results they get, by item id."""

    def __init__(self, worker: SandboxWorker) -> None:
        self.calls = worker._calls  # type: ignore[attr-defined]
        self._nc = worker._nc  # type: ignore[attr-defined]
        self._worker = worker
        self.results: dict[str, ItemResult] = {}
        self.started: set[str] = set()
        self._came = asyncio.Event()
        self.inbox = self._nc.new_inbox()

    async def __aenter__(self) -> _Batches:
        self._subscription = await self._nc.subscribe(self.inbox, cb=self._on_results)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._subscription.unsubscribe()

    async def _on_results(self, msg: Msg) -> None:
        for line in msg.data.split(b"\n"):
            result = ItemResult.model_validate_json(line)
            if result.started:
                self.started.add(result.item_id)
            else:
                self.results[result.item_id] = result
        self._came.set()

    def send(self, tid: str, *items: tuple[str, str | None, dict[str, Any]]) -> BatchAck:
        """(item id, uniq_id, terminal arguments) for each item; the gate opens at once."""
        epoch = self._worker._table.holding(tid).epoch  # type: ignore[attr-defined, union-attr]
        lines = [BatchHeader(reply_to=self.inbox).model_dump_json()] + [
            BatchItem(
                item_id=item_id,
                trajectory_id=tid,
                epoch=epoch,
                tool="terminal",
                arguments=arguments,
                timeout_s=20,
                uniq_id=uniq_id,
            ).model_dump_json()
            for item_id, uniq_id, arguments in items
        ]
        ack, open_gate = self.calls.take_batch("\n".join(lines).encode(), "batch", None)
        open_gate()
        return ack  # type: ignore[no-any-return]

    async def result(self, item_id: str) -> ItemResult:
        async with asyncio.timeout(20):
            while item_id not in self.results:
                self._came.clear()
                await self._came.wait()
        return self.results[item_id]


async def _held_trajectory(stack: Any, tid: str) -> None:
    opened = await stack.client.execute(tid, "terminal", {"command": "true"})
    assert opened.success, opened.error


def _ids() -> Callable[[str], str]:
    prefix = uuid.uuid4().hex[:8]
    return lambda name: f"{prefix}-{name}"


async def test_a_retry_waiting_behind_its_trajectorys_call_follows_the_first_run(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid, name = trajectory(), _ids()
    await _held_trajectory(stack, tid)
    async with _Batches(stack.workers[0]) as batches:
        ack = batches.send(
            tid,
            (name("long"), None, {"command": "sleep 1"}),
            (name("first"), "q", {"command": _COUNTED.format(sleep=0)}),
            (name("retry"), "q", {"command": _COUNTED.format(sleep=0)}),
        )
        # Both wait behind the long call: each is told when its run starts.
        assert set(ack.queued) == {name("first"), name("retry")}
        first, retry = await batches.result(name("first")), await batches.result(name("retry"))
        assert {name("first"), name("retry")} <= batches.started
    assert first.result is not None and retry.result is not None
    assert first.result.output == retry.result.output == "1\n"
    assert await _runs(stack.client, tid) == "1"


async def test_a_cancelled_asker_leaves_the_run_to_the_others_and_the_last_one_ends_it(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid, name = trajectory(), _ids()
    await _held_trajectory(stack, tid)
    async with _Batches(stack.workers[0]) as batches:
        command = {"command": f"{_UNTIL_GO}; {_COUNTED.format(sleep=0)}"}
        batches.send(tid, (name("first"), "c", command))
        batches.send(tid, (name("retry"), "c", command))
        await until(lambda: _workspace_has(stack.workers[0], tid, "waiting"))
        # The first asker gives up (its executor's deadline): the run goes on for the retry.
        assert batches.calls.cancel([name("first")]).outcomes[name("first")] == "detached"
        given_up = await batches.result(name("first"))
        assert given_up.result is not None and given_up.result.metadata["still_running"] is True
        _go(stack.workers[0], tid)
        retry = await batches.result(name("retry"))
        assert retry.result is not None and retry.result.output == "1\n"

        # With a single asker, its cancel ends the run, as a call without an id.
        batches.send(tid, (name("alone"), "d", {"command": "sleep 30; echo late >> runs"}))
        await asyncio.sleep(0.3)
        assert batches.calls.cancel([name("alone")]).outcomes[name("alone")] == "cancelled"
        alone = await batches.result(name("alone"))
        assert alone.result is not None and alone.result.metadata["cancelled"] is True
    assert await _runs(stack.client, tid) == "1"


@pytest.mark.parametrize("retry_comes", ["after-its-answer", "in-the-same-turn"])
async def test_a_call_cancelled_before_its_run_began_leaves_its_id_free_for_a_retry(
    make_stack: StackFactory, trajectory: Callable[[], str], retry_comes: str
) -> None:
    # "in-the-same-turn", found in review: the cancelled run stayed joinable until its task
    # ended, so a retry that came in between got "cancelled" for a call none of which had run.
    stack = await make_stack()
    tid, name = trajectory(), _ids()
    await _held_trajectory(stack, tid)
    async with _Batches(stack.workers[0]) as batches:
        batches.send(
            tid,
            (name("long"), None, {"command": "sleep 1"}),
            (name("first"), "n", {"command": _COUNTED.format(sleep=0)}),
        )
        batches.calls.cancel([name("first")])  # queued: none of it ran
        if retry_comes == "after-its-answer":
            cancelled = await batches.result(name("first"))
            assert cancelled.result is not None and cancelled.result.metadata["cancelled"]
        batches.send(tid, (name("retry"), "n", {"command": _COUNTED.format(sleep=0)}))
        retry = await batches.result(name("retry"))
    assert retry.result is not None and retry.result.success, retry
    assert retry.result.output == "1\n" and "replayed" not in retry.result.metadata


def _workspace_has(worker: SandboxWorker, tid: str, name: str) -> bool:
    slot = worker._table.holding(tid)  # type: ignore[attr-defined]
    return slot is not None and (slot.workspace / name).exists()


def _go(worker: SandboxWorker, tid: str) -> None:
    slot = worker._table.holding(tid)  # type: ignore[attr-defined]
    (slot.workspace / "go").touch()


async def test_an_id_reused_by_another_call_is_refused_not_answered_with_the_other_result(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    # Found in review: some agents number their tool calls per turn ("call_0"), so one id can
    # name another call later; that call must not get the first one's output as its own.
    stack = await make_stack()
    tid = trajectory()
    listed = await stack.client.execute(tid, "terminal", {"command": "echo one"}, uniq_id="call_0")
    other = await stack.client.execute(tid, "terminal", {"command": "echo two"}, uniq_id="call_0")
    assert listed.output == "one\n"
    assert not other.success and other.metadata["uniq_id_reused"] is True, other
    assert "did not run" in other.error


async def test_an_executor_that_stops_leaves_a_call_with_an_id_running_for_its_retry(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    # Found in review: a stopping executor cancelled the call on the worker, half-way, so the
    # client's retry got "cancelled" and could never run it.
    stack = await make_stack(executor_config=ExecutorConfig(drain_timeout_s=0.5))
    worker, tid = stack.workers[0], trajectory()
    await _held_trajectory(stack, tid)
    command = {"command": f"{_UNTIL_GO}; {_COUNTED.format(sleep=0)}"}
    first = asyncio.create_task(stack.client.execute(tid, "terminal", command, uniq_id="s"))
    await until(lambda: _workspace_has(worker, tid, "waiting"))
    await stack.executors[0].__aexit__(None, None, None)  # as SIGTERM does
    with pytest.raises(NoCapacity, match="shutting down"):
        await first
    successor = await make_stack(executors=1, workers=0)
    retry = asyncio.create_task(successor.client.execute(tid, "terminal", command, uniq_id="s"))
    await asyncio.sleep(0.3)
    _go(worker, tid)
    retried = await retry
    assert retried.success and retried.output == "1\n", retried


async def test_a_call_a_stopped_executor_left_for_a_retry_that_never_comes_is_cancelled(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    # Else a client that does not retry would find its trajectory's slot busy until the
    # abandoned call's own timeout: its next calls queue behind it.
    config = ExecutorConfig(drain_timeout_s=0.5, abandoned_grace_s=1.0)
    stack = await make_stack(executor_config=config)
    worker, tid = stack.workers[0], trajectory()
    await _held_trajectory(stack, tid)
    command = {"command": f"{_UNTIL_GO}; {_COUNTED.format(sleep=0)}"}
    first = asyncio.create_task(stack.client.execute(tid, "terminal", command, uniq_id="a"))
    await until(lambda: _workspace_has(worker, tid, "waiting"))
    await stack.executors[0].__aexit__(None, None, None)
    with pytest.raises(NoCapacity, match="shutting down"):
        await first
    await until(lambda: not worker._calls.running, 10)  # type: ignore[attr-defined]
    _go(worker, tid)
    successor = await make_stack(executors=1, workers=0)
    retried = await successor.client.execute(tid, "terminal", command, uniq_id="a")
    assert not retried.success and retried.metadata["cancelled"] is True  # ran half: the answer
    assert not _workspace_has(worker, tid, "runs")  # it never got past its wait
