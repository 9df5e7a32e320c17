"""tmux: an interactive terminal inside the slot's sandbox."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from services._tmux import _LOG, STREAM_JSON_BUDGET, take_stream_text, tmux_key_args
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


async def test_stream_counts_raw_bytes_whatever_the_encoding(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    # ``stream`` reads the pane's log; writing the log directly makes its content exact.
    wrote = await stack.client.execute(
        tid, "terminal", {"command": f"printf '\\377\\376abc\\303\\251z' > {_LOG}"}
    )
    assert wrote.success, wrote.error

    async def stream(**arguments: Any) -> Any:
        result = await stack.client.execute(tid, "tmux", {"action": "stream", **arguments})
        assert result.success, result.error
        return result

    first = await stream(max_bytes=3)
    assert first.output == "\ufffd\ufffda"
    assert first.metadata["bytes"] == 3
    assert first.metadata["offset"] == 3
    assert first.metadata["more_pending"] is True
    # 3 more bytes would end inside "é": only the whole characters come, the rest stays.
    second = await stream(max_bytes=3)
    assert second.output == "bc"
    assert second.metadata["offset"] == 5
    rest = await stream()
    assert rest.output == "éz"
    assert rest.metadata["offset"] == 8
    assert rest.metadata["more_pending"] is False
    assert (await stream()).output == ""
    await stack.client.release(tid, reset_workspace=True)


async def test_a_long_stream_comes_in_parts_that_each_fit_one_message(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    # Control characters are six bytes each in JSON: a megabyte of them is six in a reply.
    size = 1_000_000
    command = f"head -c {size} /dev/zero | tr '\\0' '\\1' > {_LOG}; printf end >> {_LOG}"
    assert (await stack.client.execute(tid, "terminal", {"command": command})).success
    received: list[str] = []
    for _ in range(100):
        part = await stack.client.execute(tid, "tmux", {"action": "stream", "max_bytes": 1_000_000})
        assert part.success, part.error
        assert len(json.dumps(part.output)) <= STREAM_JSON_BUDGET
        received.append(part.output)
        if not part.metadata["more_pending"]:
            break
    text = "".join(received)
    assert len(received) > 1
    assert text == "\x01" * size + "end"
    await stack.client.release(tid, reset_workspace=True)


def test_stream_text_is_cut_at_characters_and_counted_in_bytes() -> None:
    assert take_stream_text(b"ab\xc3", 100, at_end=True) == ("ab", 2)  # é waits for its byte
    assert take_stream_text(b"\xc3", 100, at_end=False) == ("\ufffd", 1)  # no room for more
    assert take_stream_text(b"\xff\xe2\x82\xac", 100, at_end=True) == ("\ufffd€", 4)
    # 21 bytes of JSON: the quotes, "a" and three control characters (6 each); "b" is out.
    assert take_stream_text(b"a\x01\x02\x03b", 21, at_end=True) == ("a\x01\x02\x03", 4)
    text, used = take_stream_text("€\x01".encode() * 1000, 600, at_end=True)
    assert len(json.dumps(text, ensure_ascii=False).encode()) <= 600
    assert used == len(text.encode())
    assert text == ("€\x01" * 1000)[: len(text)]
