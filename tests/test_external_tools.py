"""Tools toolbus does not have go to whoever provides them: a NATS service on
``tools.external.<name>``, else the HTTP tool server; nobody, and it is still 404."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.messages import ExecuteRequest, ToolResult
from services._embedded import free_port
from services.exceptions import NotFound
from services.executor import ExecutorConfig
from tests.conftest import StackFactory


async def test_a_nats_service_provides_a_tool_in_any_language(
    make_stack: StackFactory, trajectory: Callable[[], str], nc: Client
) -> None:
    stack = await make_stack()
    seen: list[ExecuteRequest] = []

    async def web_search(msg: Msg) -> None:
        request = ExecuteRequest.model_validate_json(msg.data)
        seen.append(request)
        query = request.tool.arguments["query"]
        if query == "fail":  # an ADR-32 error reply, as any NATS micro service sends it
            await nc.publish(
                msg.reply,
                b'{"code": 400, "error": "invalid_request", "message": "bad query"}',
                headers={"Nats-Service-Error": "bad query", "Nats-Service-Error-Code": "400"},
            )
        elif query == "garbage":
            await msg.respond(b"not json")
        else:
            result = ToolResult(success=True, output=f"results for {query}", metadata={"hits": 3})
            await msg.respond(result.model_dump_json().encode())

    subscription = await nc.subscribe("tools.external.web_search", cb=web_search)
    await nc.flush()
    try:
        tid = trajectory()
        found = await stack.client.execute(
            tid, "web_search", {"query": "nats", "timeout": 7}, uniq_id="u1"
        )
        assert found.success and found.output == "results for nats"
        assert found.uniq_id == "u1"
        assert found.metadata == {"hits": 3, "external": True, "tool": "web_search"}
        assert seen[0].trajectory_id == tid and seen[0].timeout_s == 7

        failed = await stack.client.execute(tid, "web_search", {"query": "fail"})
        assert not failed.success and failed.error == "web_search: bad query"
        assert failed.metadata["error_kind"] == "tool"
        assert failed.metadata["provider_error_code"] == 400

        garbage = await stack.client.execute(tid, "web_search", {"query": "garbage"})
        assert not garbage.success and garbage.metadata["error_kind"] == "infra"
        assert "not a tool result" in (garbage.error or "")
        assert stack.workers[0].slots_free == 4  # external tools take no slot
    finally:
        await subscription.unsubscribe()
    with pytest.raises(NotFound, match="Unknown tool: web_search"):
        await stack.client.execute(trajectory(), "web_search", {"query": "gone"})


class _ToolServer(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []  # noqa: RUF012 - one server per test, reset by the fixture

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/execute" or self.headers.get("Authorization") != "Bearer tok":
            self.send_error(403)
            return
        self.received.append(body)
        if body["tool"]["name"] != "web_extract":
            self.send_error(404)
            return
        reply = ToolResult(success=True, output="page text", metadata={"chars": 9})
        data = reply.model_dump_json().encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass


@pytest.fixture
def tool_server() -> Iterator[str]:
    _ToolServer.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ToolServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


async def test_the_http_tool_server_gets_what_no_nats_service_provides(
    make_stack: StackFactory, trajectory: Callable[[], str], tool_server: str
) -> None:
    config = ExecutorConfig(tool_server_url=tool_server + "/", tool_server_token="tok")
    stack = await make_stack(executor_config=config)
    tid = trajectory()
    ran = await stack.client.execute(tid, "terminal", {"command": "true"})  # now it has a slot
    extracted = await stack.client.execute(tid, "web_extract", {"url": "http://x"}, uniq_id="u")
    assert extracted.success and extracted.output == "page text" and extracted.uniq_id == "u"
    body = _ToolServer.received[0]
    assert body["trajectory_id"] == tid
    assert body["tool"] == {"name": "web_extract", "arguments": {"url": "http://x"}, "uniq_id": "u"}
    # Whichever slot it got (a warm one goes first, not necessarily slot 0).
    assert body["slot"] == {"worker_id": stack.workers[0].worker_id, "slot": ran.metadata["slot"]}
    with pytest.raises(NotFound, match="Unknown tool: nope"):
        await stack.client.execute(tid, "nope", {})


async def test_an_unreachable_tool_server_is_an_infra_failure(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    config = ExecutorConfig(tool_server_url=f"http://127.0.0.1:{free_port()}")
    stack = await make_stack(executor_config=config)
    result = await stack.client.execute(trajectory(), "web_extract", {"url": "http://x"})
    assert not result.success and result.metadata["error_kind"] == "infra"
    assert "could not be reached" in (result.error or "")


class _BrokenToolServer(BaseHTTPRequestHandler):
    """Replies that break off or are not HTTP; the tool's name says how."""

    protocol_version = "HTTP/1.1"  # so that a chunked reply is read as chunked

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        how = body["tool"]["name"]
        self.close_connection = True
        data = ToolResult(success=True, output="all of it, supposedly").model_dump_json().encode()
        if how == "short_body":  # a whole tool result, but less than the length announced
            self.send_response(200)
            self.send_header("Content-Length", str(len(data) + 100))
            self.end_headers()
            self.wfile.write(data)
        elif how == "cut_chunk":  # a chunk longer than what is sent of it
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n" % (len(data) + 100) + data)
        else:  # not an HTTP reply at all
            self.wfile.write(b"garbage\r\n\r\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def broken_tool_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BrokenToolServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("short_body", "The tool server's reply for short_body broke off"),
        ("cut_chunk", "The tool server's reply for cut_chunk broke off"),
        ("garbage", "The tool server's reply for garbage is not valid HTTP"),
    ],
)
async def test_a_broken_reply_from_the_tool_server_is_an_infra_failure(
    make_stack: StackFactory,
    trajectory: Callable[[], str],
    broken_tool_server: str,
    how: str,
    message: str,
) -> None:
    stack = await make_stack(executor_config=ExecutorConfig(tool_server_url=broken_tool_server))
    result = await stack.client.execute(trajectory(), how, {})
    assert not result.success and result.metadata["error_kind"] == "infra", result
    assert (result.error or "").startswith(message), result.error
