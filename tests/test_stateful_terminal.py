"""terminal_stateful: one persistent shell per slot."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import StackFactory
from tests.test_sandbox_security import _still_serving


async def test_state_carries_over_between_calls(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()

    async def run(command: str) -> tuple[bool, str, int | None]:
        result = await stack.client.execute(tid, "terminal_stateful", {"command": command})
        return result.success, result.output, result.metadata["exit_code"]

    first = await stack.client.execute(
        tid, "terminal_stateful", {"command": "mkdir -p sub && cd sub && export A=1; B=2"}
    )
    assert first.success
    assert first.metadata["new_shell"] is True
    assert await run("pwd; echo $A $B") == (True, "/workspace/sub\n1 2\n", 0)
    assert await run('f() { echo "f:$1"; }; f x') == (True, "f:x\n", 0)
    assert await run("f y; false") == (False, "f:y\n", 1)
    assert await run("echo 'quotes \" and $(subshells)' 'stay' literal") == (
        True,
        'quotes " and $(subshells) stay literal\n',
        0,
    )
    assert await run("echo out; echo err >&2") == (True, "out\n[stderr]\nerr\n", 0)
    reading = await run("cat")  # stdin is /dev/null, not the shell's own input
    assert reading == (True, "", 0)
    await stack.client.release(tid)


async def test_a_timeout_replaces_the_shell_and_says_so(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    await stack.client.execute(tid, "terminal_stateful", {"command": "export KEEP=1; echo ready"})
    slow = await stack.client.execute(
        tid, "terminal_stateful", {"command": "echo partial; sleep 30"}, timeout_s=1
    )
    assert not slow.success
    assert slow.metadata["status"] == "timeout"
    assert slow.metadata["shell_restarted"] is True
    assert slow.output == "partial\n"
    assert "the next call starts a new shell" in slow.error
    after = await stack.client.execute(tid, "terminal_stateful", {"command": "echo ${KEEP:-gone}"})
    assert after.output == "gone\n"
    assert after.metadata["new_shell"] is True
    await _still_serving(stack.client, tid)


async def test_exit_ends_the_shell_with_its_code(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    ended = await stack.client.execute(tid, "terminal_stateful", {"command": "echo bye; exit 5"})
    assert not ended.success
    assert ended.metadata["exit_code"] == 5
    assert ended.metadata["shell_restarted"] is True
    assert ended.output == "bye\n"
    again = await stack.client.execute(tid, "terminal_stateful", {"command": "echo new"})
    assert again.success
    assert again.metadata["new_shell"] is True
