"""A worker's ack of a batch leaves before the batch's calls run, so the executor can send its
next batch while this one runs.

Failed before the ack went first (issue 10, item 5): the ack was published before the calls'
tasks ran, but nats-py writes what was published from a task of its own, which ran after the
batch's calls; a batch of fast tools (``read_file``, which never yields) was acknowledged only
once every call of it had run, and the worker sat idle while its next batch travelled.
"""

from __future__ import annotations

from typing import Any

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
