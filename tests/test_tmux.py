"""tmux: an interactive terminal inside the slot's sandbox."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services._tmux import tmux_key_args
from tests.conftest import StackFactory


def test_key_names_are_keys_and_the_rest_is_text() -> None:
    assert tmux_key_args("ls -la") == [["-l", "ls -la"]]
    assert tmux_key_args(["echo hi", "Enter", "C-c"]) == [["-l", "echo hi"], ["Enter"], ["C-c"]]


async def test_start_send_capture_stream_stop(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()

    async def tmux(**arguments: Any) -> Any:
        return await stack.client.execute(tid, "tmux", arguments)

    before = await tmux(action="capture")
    assert not before.success
    assert "call tmux with action=start first" in before.error

    started = await tmux(action="start")
    assert started.success, started.error
    assert (await tmux(action="start")).output == "tmux session already running"

    typed = await tmux(
        action="send_keys",
        keys=["echo $((6*7)) > answer; pwd", "Enter"],
        block=True,
        min_wait_s=0.2,
        max_wait_s=5,
    )
    assert typed.success, typed.error
    assert "/workspace" in typed.output
    answer = await stack.client.execute(tid, "read_file", {"path": "answer"})
    assert answer.output == "42\n"  # the session runs in the slot's workspace

    screen = await tmux(action="capture")
    assert "/workspace" in screen.output
    streamed = await tmux(action="stream")
    assert "/workspace" in streamed.output
    assert (await tmux(action="stream")).output == ""  # nothing new since

    await tmux(action="send_keys", keys=["sleep 100", "Enter"])
    await tmux(action="send_keys", keys="C-c", block=True, min_wait_s=0.2, max_wait_s=3)
    assert (await tmux(action="stop")).success
    after = await tmux(action="capture")
    assert not after.success
    await stack.client.release(tid, reset_workspace=True)
