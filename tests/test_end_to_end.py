"""Execute, release, status and list through a real nats-server, executor and worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from schemas.subjects import ERROR_CODE_HEADER, ERROR_HEADER
from services._requests import nats_request
from services.exceptions import BadRequest, NotFound, StartupError
from services.worker import SandboxWorker, WorkerConfig
from tests.conftest import StackFactory


async def test_terminal_runs_in_the_workspace_and_reports_exit_code(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    ok = await stack.client.execute(tid, "terminal", {"command": "echo hello; pwd"}, uniq_id="u1")
    assert ok.success
    assert ok.uniq_id == "u1"
    assert ok.output == "hello\n/workspace\n"
    assert ok.metadata["exit_code"] == 0
    assert ok.metadata["sandboxed"] is True

    failed = await stack.client.execute(tid, "bash", {"command": "echo out; echo bad >&2; exit 7"})
    assert not failed.success
    assert failed.error == "Exit code: 7"
    assert failed.output == "out\n[stderr]\nbad\n"
    assert failed.metadata["exit_code"] == 7
    assert failed.metadata["error_kind"] == "exit"


async def test_write_read_and_workspace_affinity(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(workers=2, slots=2)
    tid = trajectory()
    wrote = await stack.client.execute(tid, "write_file", {"path": "d/x.txt", "content": "abc"})
    assert wrote.success, wrote.error
    read = await stack.client.execute(tid, "read_file", {"path": "d/x.txt"})
    assert read.output == "abc"
    cat = await stack.client.execute(tid, "terminal", {"command": "cat d/x.txt"})
    assert cat.output == "abc"
    assert {wrote.metadata["worker_id"], read.metadata["worker_id"], cat.metadata["worker_id"]} == {
        wrote.metadata["worker_id"]
    }


async def test_a_command_killed_by_a_signal_names_it(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    killed = await stack.client.execute(tid, "terminal", {"command": "kill -TERM $$"})
    assert killed.error == "Exit code: -15 (killed by SIGTERM)"
    assert killed.metadata["signal"] == "SIGTERM"
    unnamed = await stack.client.execute(tid, "terminal", {"command": "kill -40 $$"})
    assert unnamed.error == "Exit code: -40 (killed by signal 40)"
    assert unnamed.metadata["error_kind"] == "exit"


async def test_timeout_kills_the_command_and_keeps_output(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    result = await stack.client.execute(
        trajectory(), "terminal", {"command": "echo before; sleep 30 & sleep 30"}, timeout_s=1
    )
    assert not result.success
    assert result.metadata["status"] == "timeout"
    assert result.metadata["timeout"] is True
    assert result.output == "before\n"
    assert result.error == "Command timed out after 1s"


async def test_file_paths_are_confined_to_the_workspace(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    for path in ("../escape.txt", "/etc/passwd", "a/../../b"):
        result = await stack.client.execute(tid, "read_file", {"path": path})
        assert not result.success
        assert "outside the workspace" in result.error
    await stack.client.execute(tid, "terminal", {"command": "ln -s /etc link"})
    escaped = await stack.client.execute(tid, "read_file", {"path": "link/hostname"})
    assert not escaped.success
    assert "outside the workspace" in escaped.error
    inside = await stack.client.execute(
        tid, "write_file", {"path": "/workspace/in.txt", "content": "x"}
    )
    assert inside.success


async def test_invalid_tool_arguments_are_a_failed_result_not_an_error(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    result = await stack.client.execute(trajectory(), "terminal", {"cmd": "ls"})
    assert not result.success
    assert result.metadata["error_kind"] == "invalid_arguments"
    assert result.error == "Invalid arguments for terminal: command: Field required"
    background = await stack.client.execute(
        trajectory(), "terminal", {"command": "ls", "background": True}
    )
    assert not background.success
    assert "background=true is not supported" in background.error


async def test_openai_style_string_arguments_are_accepted(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    call = {"name": "terminal", "arguments": json.dumps({"command": "echo 42"})}
    body = json.dumps({"trajectory_id": trajectory(), "tool": call}).encode()
    data = await stack.client.request_raw("tools.execute.terminal", body)
    assert b'"output":"42\\n"' in data


async def test_release_with_and_without_reset(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=1)
    worker = stack.workers[0]
    first = trajectory()
    await stack.client.execute(first, "write_file", {"path": "keep.txt", "content": "1"})
    reply = await stack.client.release(first)
    assert reply.status == "ok"
    assert reply.slot == 0
    # Without reset the files stay on disk until the slot is needed again ...
    workspace = worker.workspace_of(0)
    assert (workspace / "keep.txt").read_text() == "1"
    assert worker.slot_states()["dirty"] == 1

    # ... and the next trajectory still starts in an empty workspace.
    second = trajectory()
    kept = await stack.client.execute(second, "read_file", {"path": "keep.txt"})
    assert not kept.success and kept.error == "No such file: keep.txt"
    assert kept.metadata["slot"] == 0
    await stack.client.release(second, reset_workspace=True)
    assert worker.slot_states()["free"] == 1  # wiped at once

    third = trajectory()
    gone = await stack.client.execute(third, "terminal", {"command": "ls -A | wc -l"})
    assert gone.output.strip() == "0"
    await stack.client.release(third)

    with pytest.raises(NotFound, match="No active slot for trajectory"):
        await stack.client.release(third)


async def test_release_cancels_a_running_call(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    await stack.client.execute(tid, "terminal", {"command": "true"})
    running = asyncio.create_task(stack.client.execute(tid, "terminal", {"command": "sleep 20"}))
    await asyncio.sleep(0.3)
    await stack.client.release(tid, reset_workspace=True)
    result = await asyncio.wait_for(running, 5)
    assert not result.success
    assert result.metadata["error_kind"] == "infra"
    assert result.metadata["cancelled"] is True


async def test_status_and_tool_list(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(workers=2, slots=3)
    tid = trajectory()
    await stack.client.execute(tid, "terminal", {"command": "true"})
    status = await stack.client.status()
    mine = {w.worker_id for w in stack.workers}
    listed = {w.worker_id: w for w in status.workers if w.worker_id in mine}
    assert set(listed) == mine
    assert sum(w.slots_total for w in listed.values()) == 6
    assert status.pool.total_slots >= 6
    assert status.pool.acquired_slots >= 1
    assert status.total_requests >= 1
    await stack.client.release(tid)

    tools = await stack.client.list_tools()
    names = [spec.function.name for spec in tools.tools]
    assert names == ["terminal", "terminal_stateful", "tmux", "read_file", "write_file"]
    assert tools.aliases == {"bash": "terminal"}
    assert tools.tools[0].function.parameters["required"] == ["command"]


# -- every error case, each followed by a call that still succeeds -------------------------------

ERROR_CASES = [
    pytest.param(
        "tools.execute.terminal",
        b"{not json",
        400,
        "invalid_json",
        "not valid JSON",
        id="malformed-json",
    ),
    pytest.param(
        "tools.execute.terminal",
        b'{"trajectory_id": 5, "tool": {"name": "terminal"}}',
        400,
        "invalid_request",
        "trajectory_id: Input should be a valid string",
        id="wrong-type",
    ),
    pytest.param(
        "tools.execute.terminal",
        b'{"trajectory_id": "t"}',
        400,
        "invalid_request",
        "tool: Field required",
        id="missing-field",
    ),
    pytest.param(
        "tools.execute.terminal",
        b'{"trajectory_id": "t", "tool": {"name": "terminal"}, "extra": 1}',
        400,
        "invalid_request",
        "extra: Extra inputs are not permitted",
        id="unknown-field",
    ),
    pytest.param(
        "tools.execute.terminal",
        b'{"trajectory_id": "t", "tool": {"name": "read_file"}}',
        400,
        "invalid_request",
        "does not match the subject",
        id="subject-mismatch",
    ),
    pytest.param(
        "tools.execute.frobnicate",
        b'{"trajectory_id": "t", "tool": {"name": "frobnicate"}}',
        404,
        "unknown_tool",
        "Unknown tool: frobnicate",
        id="unknown-tool",
    ),
    pytest.param(
        "tools.execute.write_file",
        json.dumps(
            {
                "trajectory_id": "t",
                "tool": {"name": "write_file", "arguments": {"content": "a" * 300_000}},
            }
        ).encode(),
        413,
        "payload_too_large",
        "the limit is 262144",
        id="oversized",
    ),
    pytest.param(
        "tools.release",
        b'{"trajectory_id": "never-seen"}',
        404,
        "no_active_slot",
        "No active slot for trajectory 'never-seen'",
        id="release-unknown",
    ),
    pytest.param(
        "tools.release",
        b"[]",
        400,
        "invalid_request",
        "body: Input should be an object",
        id="release-not-an-object",
    ),
]


@pytest.mark.parametrize(("subject", "body", "code", "kind", "message"), ERROR_CASES)
async def test_bad_requests_get_adr32_errors_and_the_service_keeps_serving(
    make_stack: StackFactory,
    trajectory: Callable[[], str],
    subject: str,
    body: bytes,
    code: int,
    kind: str,
    message: str,
) -> None:
    import json

    stack = await make_stack()
    reply = await nats_request(stack.client.nc, subject, body, timeout=10)
    headers = reply.headers or {}
    assert headers[ERROR_CODE_HEADER] == str(code)
    assert message in headers[ERROR_HEADER]
    error = json.loads(reply.data)
    assert error["code"] == code
    assert error["error"] == kind
    assert message in error["message"]
    assert "Traceback" not in reply.data.decode()

    after = await stack.client.execute(trajectory(), "terminal", {"command": "echo still here"})
    assert after.success and after.output == "still here\n"


async def test_client_raises_typed_errors(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    with pytest.raises(NotFound) as not_found:
        await stack.client.execute(trajectory(), "nope")
    assert not_found.value.kind == "unknown_tool"
    with pytest.raises(BadRequest, match="timeout_s"):
        await stack.client.request_raw(
            "tools.execute.terminal",
            b'{"trajectory_id": "t", "tool": {"name": "terminal"}, "timeout_s": -1}',
        )


async def test_a_worker_that_must_sandbox_but_cannot_refuses_to_start(
    nc: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bubblewrap that cannot run: the real binary /bin/false in its place.
    monkeypatch.setattr("services._sandbox.find_bwrap", lambda: Path("/bin/false"))
    config = WorkerConfig(
        worker_id="strict", slots=1, workspace_root=tmp_path, require_sandbox=True
    )
    with pytest.raises(StartupError, match="require_sandbox is set but bubblewrap cannot run"):
        async with SandboxWorker(nc, config):
            pass


async def test_without_require_sandbox_a_worker_falls_back_and_says_so(
    make_stack: StackFactory, trajectory: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services._sandbox.find_bwrap", lambda: Path("/bin/false"))
    stack = await make_stack()
    result = await stack.client.execute(trajectory(), "terminal", {"command": "pwd"})
    assert result.success
    assert result.metadata["sandboxed"] is False
    assert result.metadata["network_isolated"] is False
    assert result.output.strip().endswith("/slot_0")
