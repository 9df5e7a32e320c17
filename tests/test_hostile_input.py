"""Hostile requests through a real stack: each gets a precise, traceback-free answer within a
bound, and none costs the service anything (no 500, no exception in the executor, later calls work).

The fuzz is seeded and deterministic: a failure names its case (``Case.label``). Only the few
cases of ``sandbox_cases`` run commands (harmless ones); the generator of the others is in
tests/_hostile_cases.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError

from schemas.messages import JSON_PARSER_MAX_DEPTH, MAX_JSON_DEPTH, ToolResult
from schemas.subjects import ERROR_CODE_HEADER, ERROR_HEADER
from services._requests import nats_request
from tests._hostile_cases import CODES, Case, Generator, dumps, nested
from tests.conftest import Stack, StackFactory

SEED = 20_240_611
FUZZ_CASES = 2_000
IN_FLIGHT = 50
REPLY_TIMEOUT_S = 30.0  # the bound on every reply; a sandbox case's first call starts a slot

# What must never reach a client: tracebacks, exception reprs, pydantic's own error text.
_LEAK = re.compile(
    r"Traceback|File \"|\bat 0x[0-9a-fA-F]+|\b[A-Z]\w*(?:Error|Exception)\(|input_value=|"
    r"errors\.pydantic\.dev|RecursionError"
)


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)

    def add(self, case: Case, problem: str) -> None:
        self.problems.append(f"{case.label}: {problem}")


# -- valid requests with hostile content ---------------------------------------------------------
def sandbox_cases(live: list[str], odd_trajectories: list[str]) -> list[Case]:
    """Valid requests with hostile content that do run in a sandbox (few, harmless), each
    with the error_kind its ToolResult must have (None: success)."""
    a, b = live

    def call(tid: str, tool: str, arguments: Any, **extra: Any) -> bytes:
        return dumps(
            {"trajectory_id": tid, "tool": {"name": tool, "arguments": arguments}, **extra}
        )

    cases = [
        (call(a, "terminal", {"command": "printf 'caf\\303\\251 \\342\\230\\203 \\377\\n'"}), None),
        (call(a, "terminal", {"command": "true", "timeout": 2, "zzz": [1, {"y": None}]}), None),
        (call(a, "terminal", {"command": "true", "deep": nested(MAX_JSON_DEPTH - 1)}), None),
        (call(a, "terminal", '{"command": "echo from a string"}'), None),
        (call(a, "terminal", {"command": "true"}, timeout_s=1, allow_network=False), None),
        (call(a, "terminal", {"command": ""}), "invalid_arguments"),
        (call(a, "terminal", {"command": 5}), "invalid_arguments"),
        (call(a, "terminal", {"command": "true", "timeout": True}), "invalid_arguments"),
        (call(a, "terminal", {"command": "true", "timeout": "5"}), "invalid_arguments"),
        (call(a, "terminal", {"command": "true", "timeout": 1e308}), None),
        (call(a, "terminal", {"command": "true"}, timeout_s=1e308), None),
        (call(b, "tmux", {"action": "stream", "max_bytes": 10**30}), "invalid_arguments"),
        (
            call(b, "write_file", {"path": "ü/☃\U0001f600.txt", "content": "\u202e\ufeff\u0001"}),
            None,
        ),
        (call(b, "write_file", {"path": "../escape.txt", "content": "x"}), "tool"),
        (call(b, "read_file", {"path": "/etc/passwd"}), "tool"),
        (call(b, "read_file", {"path": "missing-\U0001f600"}), "tool"),
        (call(b, "tmux", {"action": "start", "width": True}), "invalid_arguments"),
        (call(b, "tmux", {"action": "explode"}), "invalid_arguments"),
        (call(b, "terminal_stateful", {"command": "echo $((6 * 7))"}), None),
        *((call(tid, "terminal", {"command": "echo ok"}), None) for tid in odd_trajectories),
        (call(a, "bash", {"command": "true"}, allow_network=None), None),
        (
            dumps(
                {"trajectory_id": a, "tool": {"name": "terminal", "uniq_id": "\U0001f600" * 256}}
            ),
            "invalid_arguments",
        ),
        (call(a, "terminal", {"command": "echo a\u0000b"}), "invalid_arguments"),
        (call(a, "terminal_stateful", {"command": "echo a\u0000b"}), "invalid_arguments"),
        (call(b, "write_file", {"path": "a\u0000b", "content": "x"}), "invalid_arguments"),
        (call(b, "write_file", {"path": "nul.txt", "content": "a\u0000b"}), None),
        (call(b, "read_file", {"path": "\u0000"}), "invalid_arguments"),
        (call(b, "tmux", {"action": "send_keys", "keys": "a\u0000b"}), "invalid_arguments"),
        (call(b, "tmux", {"action": "send_keys", "keys": ["a", "\u0000"]}), "invalid_arguments"),
    ]
    built = [
        Case(
            f"sandbox #{index} {body[:80]!r}",
            "tools.execute." + json.loads(body)["tool"]["name"],
            body,
            None,
            sandboxed=True,
            result_kind=kind,
        )
        for index, (body, kind) in enumerate(cases)
    ]
    artifacts = [
        ("read", {"trajectory_id": b, "path": "../../etc/passwd"}),
        ("list", {"trajectory_id": b, "path": "..", "recursive": True}),
        ("archive", {"trajectory_id": b, "path": "../", "max_entries": 1}),
        ("upload", {"trajectory_id": b, "name": f"absent-{uuid.uuid4().hex}"}),
        ("read", {"trajectory_id": b, "path": "a\u0000b"}),
        ("list", {"trajectory_id": b, "path": "\u0000"}),
        ("archive", {"trajectory_id": b, "path": "x\u0000"}),
        ("upload", {"trajectory_id": b, "name": "a\u0000b"}),
        ("upload", {"trajectory_id": b, "name": "absent", "path": "\u0000"}),
        ("upload", {"trajectory_id": b, "name": "☃ \U0001f600 . > *"}),
        ("read", {"trajectory_id": b, "path": "absent", "max_bytes": 10**30, "timeout_s": 1e308}),
        ("list", {"trajectory_id": b, "path": "absent", "max_entries": 10**400}),
        ("archive", {"trajectory_id": b, "path": "absent", "max_bytes": 10**30}),
    ]
    built += [
        Case(
            f"sandbox artifact {operation} {body}",
            f"tools.artifacts.{operation}",
            dumps(body),
            None,
            sandboxed=True,
            result_kind="artifact-failure",
        )
        for operation, body in artifacts
    ]
    return built


# -- checking replies ---------------------------------------------------------------------------
async def _send(nc: Client, case: Case, findings: Findings) -> tuple[dict[str, str], bytes] | None:
    try:
        reply = await nats_request(
            nc, case.subject, case.body, timeout=REPLY_TIMEOUT_S, headers=case.headers
        )
    except NatsTimeoutError:
        findings.add(case, f"no reply within {REPLY_TIMEOUT_S:g}s")
        return None
    return dict(reply.headers or {}), reply.data


def _check(case: Case, headers: dict[str, str], data: bytes, findings: Findings) -> None:
    text = data.decode("utf-8", "replace") + " ".join(headers.values())
    if _LEAK.search(text):
        findings.add(case, f"reply leaks internals: {text[:300]!r}")
    code_header = headers.get(ERROR_CODE_HEADER)
    if code_header is None:
        if case.error is not None:
            findings.add(case, f"expected error {case.error}, got a normal reply {data[:200]!r}")
        return
    message_header = headers.get(ERROR_HEADER, "")
    try:
        body = json.loads(data)
        code, kind, message = int(body["code"]), body["error"], body["message"]
    except (ValueError, KeyError, TypeError):
        findings.add(case, f"error body is not code/error/message JSON: {data[:200]!r}")
        return
    if not message_header or "\n" in message_header or code_header != str(code):
        findings.add(case, f"bad ADR-32 headers {headers!r} for body {body!r}")
    if code >= 500:
        findings.add(case, f"server error {code} {kind}: {message}")
    elif case.error is None:
        findings.add(case, f"expected a normal reply, got {code} {kind}: {message}")
    elif (code, kind) != (CODES[case.error], case.error) or case.message not in message:
        findings.add(
            case, f"expected {case.error} with {case.message!r}, got {code} {kind}: {message[:300]}"
        )


def _check_sandbox_reply(case: Case, data: bytes, findings: Findings) -> None:
    reply = json.loads(data)
    kind = case.result_kind
    if kind == "artifact-failure":
        if reply.get("success") is not False or not reply.get("error"):
            findings.add(case, f"expected success false with an error: {reply}")
        return
    result = ToolResult.model_validate(reply)
    got = result.metadata.get("error_kind") if not result.success else None
    if got != kind:
        findings.add(case, f"expected error_kind {kind}, got {got}: {result.error[:300]!r}")


async def _run(stack: Stack, cases: list[Case]) -> Findings:
    findings = Findings()
    nc = stack.client.nc
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(case: Case) -> None:
        async with gate:
            answer = await _send(nc, case, findings)
        if answer is None:
            return
        headers, data = answer
        _check(case, headers, data, findings)
        if case.sandboxed and ERROR_CODE_HEADER not in headers:
            _check_sandbox_reply(case, data, findings)

    await asyncio.gather(*(one(case) for case in cases))
    return findings


# -- the tests ----------------------------------------------------------------------------------
async def test_a_seeded_fuzz_of_hostile_requests_gets_precise_answers(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(slots=5)
    live = [trajectory(), trajectory()]
    # Valid ids that take a slot of their own: a NUL, and the longest, all in 4-byte characters.
    odd = [f"nul\u0000-ü-{trajectory()}", trajectory() + "\U0001f600" * 495]
    for tid in live:  # the artifact cases need their slots
        assert (await stack.client.execute(tid, "terminal", {"command": "true"})).success
    generator = Generator(SEED)
    cases = [generator.case() for _ in range(FUZZ_CASES)] + sandbox_cases(live, odd)
    random.Random(SEED).shuffle(cases)  # the sandbox cases among the others

    with structlog.testing.capture_logs() as lines:
        findings = await _run(stack, cases)
    problems = findings.problems
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems[:40])
    failed = [line for line in lines if line["event"] == "request failed"]
    assert not failed, f"{len(failed)} requests raised in the executor"

    executor = stack.executors[0]
    assert executor.calls_in_flight == 0
    for tid in (*live, *odd):
        await stack.client.release(tid)
    after = await stack.client.execute(trajectory(), "terminal", {"command": "echo still here"})
    assert after.success and after.output == "still here\n"


# Inputs the fuzz found whose fix was in the executor: arguments.timeout an integer past float
# range made _number() raise OverflowError, and the call got 500 internal.
TIMEOUTS_PAST_FLOAT_RANGE = [
    pytest.param(
        "terminal",
        {"command": "true", "timeout": 10**400},
        "invalid_arguments",
        id="builtin-tool-timeout-past-float-range",
    ),
    pytest.param(
        "nope", {"timeout": 10**400}, "unknown_tool", id="external-tool-timeout-past-float-range"
    ),
]


@pytest.mark.parametrize(("tool", "arguments", "answer"), TIMEOUTS_PAST_FLOAT_RANGE)
async def test_a_timeout_past_float_range_is_a_precise_error(
    make_stack: StackFactory,
    trajectory: Callable[[], str],
    tool: str,
    arguments: dict[str, Any],
    answer: str,
) -> None:
    """``answer``: the error_kind of the ToolResult, or the kind of the error reply."""
    stack = await make_stack()
    tid = trajectory()
    body = dumps({"trajectory_id": tid, "tool": {"name": tool, "arguments": arguments}})
    reply = await nats_request(stack.client.nc, f"tools.execute.{tool}", body, timeout=30)
    headers = reply.headers or {}
    if ERROR_CODE_HEADER in headers:
        assert json.loads(reply.data)["error"] == answer, reply.data
    else:
        result = ToolResult.model_validate_json(reply.data)
        assert result.metadata.get("error_kind") == answer, result.error
        await stack.client.release(tid)


async def test_deep_arguments_are_refused_and_the_workspace_survives(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    """The executor used to pass arguments the worker's batch parser cannot read: the batch
    went unacknowledged and the call came back as a lost workspace."""
    stack = await make_stack()
    tid = trajectory()
    wrote = await stack.client.execute(tid, "write_file", {"path": "kept.txt", "content": "kept"})
    assert wrote.success, wrote.error
    deep = {"command": "true", "x": nested(197)}
    body = dumps({"trajectory_id": tid, "tool": {"name": "terminal", "arguments": deep}})
    reply = await nats_request(stack.client.nc, "tools.execute.terminal", body, timeout=30)
    headers = reply.headers or {}
    assert headers.get(ERROR_CODE_HEADER) == "400", reply.data[:300]
    assert json.loads(reply.data)["message"] == (
        "invalid ExecuteRequest: tool.arguments: JSON arrays and objects nested too deeply: "
        f"at most {MAX_JSON_DEPTH} levels"
    )
    read = await stack.client.execute(tid, "read_file", {"path": "kept.txt"})
    assert read.success and read.output == "kept", read.error
    await stack.client.release(tid)


@pytest.mark.parametrize("depth", [999, 100_000])
async def test_a_deeply_nested_body_gets_a_400_and_its_bytes_stay_out_of_the_logs(
    make_stack: StackFactory, depth: int
) -> None:
    stack = await make_stack(workers=0)
    marker = f"secret-{uuid.uuid4().hex}"
    body = b'{"trajectory_id": "%s", "x": %s%s}' % (marker.encode(), b"[" * depth, b"]" * depth)
    with structlog.testing.capture_logs() as lines:
        reply = await nats_request(stack.client.nc, "tools.execute.terminal", body, timeout=10)
    headers = reply.headers or {}
    assert headers.get(ERROR_CODE_HEADER) == "400"
    assert json.loads(reply.data) == {
        "code": 400,
        "error": "invalid_json",
        "message": "request body is nested too deeply: JSON arrays and objects may nest at most "
        f"{JSON_PARSER_MAX_DEPTH} levels (tool arguments at most {MAX_JSON_DEPTH})",
    }
    assert marker not in repr(lines)


def test_logged_exceptions_carry_no_local_variables() -> None:
    """A traceback in the logs must not show what a frame held: request bytes, tokens."""
    secret = f"secret-{uuid.uuid4().hex[:8]}"

    def handler(data: str) -> None:
        raise ValueError("boom")

    try:
        handler(secret)
    except ValueError:
        event: Any = {"event": "request failed", "exc_info": sys.exc_info()}
    for processor in structlog.get_config()["processors"]:
        event = processor(None, "error", event)
    assert "boom" in event and "handler" in event  # the traceback itself is still there
    assert secret not in event
