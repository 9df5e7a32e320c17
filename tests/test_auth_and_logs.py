"""Bearer-token auth (as the seed had) and per-call log context."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import structlog

from schemas.subjects import ERROR_CODE_HEADER
from services._requests import nats_request
from services.client import ToolbusClient
from services.exceptions import Forbidden, Unauthorized
from services.executor import ExecutorConfig
from tests.conftest import StackFactory


async def test_token_is_required_when_configured(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(
        executor_config=ExecutorConfig(token="s3cret"), client_options={"token": "s3cret"}
    )
    tid = trajectory()
    assert (await stack.client.execute(tid, "terminal", {"command": "echo ok"})).success

    anonymous = ToolbusClient(stack.client.nc)
    with pytest.raises(Unauthorized, match="Missing Authorization header"):
        await anonymous.execute(tid, "terminal", {"command": "echo no"})
    wrong = ToolbusClient(stack.client.nc, token="guess")
    with pytest.raises(Forbidden, match="Invalid token"):
        await wrong.status()
    body = json.dumps({"trajectory_id": tid}).encode()
    malformed = await nats_request(
        stack.client.nc, "tools.release", body, timeout=5, headers={"Authorization": "s3cret"}
    )
    assert (malformed.headers or {})[ERROR_CODE_HEADER] == "401"
    await stack.client.release(tid)


async def test_log_lines_of_a_call_carry_its_ids(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as lines:
        result = await stack.client.execute(tid, "terminal", {"command": "true"}, uniq_id="u-42")
    assert result.success
    events = {line["event"]: line for line in lines if line.get("trajectory_id") == tid}
    assert {"slot leased", "slot acquired", "call done", "call answered"} <= set(events)
    for event in ("slot leased", "call done", "call answered"):
        assert events[event]["tool"] == "terminal"
        assert events[event]["uniq_id"] == "u-42"
    await stack.client.release(tid)
