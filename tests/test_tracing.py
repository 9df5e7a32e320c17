"""One trace from the caller to the tool: spans, parents, links, attributes and log ids.

Spans go to an in-memory exporter (installed once for the session: OpenTelemetry's global
tracer provider can be set only once per process).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from observability import tracing
from observability.logging import add_trace_ids
from services.exceptions import NotFound
from tests._node import NODE_DIR, NodeClient, run_node
from tests.conftest import StackFactory

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="session")
def _tracer_provider() -> Iterator[None]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)
    yield
    provider.shutdown()


@pytest.fixture
def spans(_tracer_provider: None) -> InMemorySpanExporter:
    _EXPORTER.clear()
    return _EXPORTER


async def _finished(
    exporter: InMemorySpanExporter, *names: str, timeout_s: float = 5.0
) -> dict[str, ReadableSpan]:
    """The finished spans with these names (the worker's may end just after the reply)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        found = {span.name: span for span in exporter.get_finished_spans() if span.name in names}
        if len(found) == len(names) or asyncio.get_running_loop().time() > deadline:
            assert set(found) == set(names), f"missing spans: {set(names) - set(found)}"
            return found
        await asyncio.sleep(0.02)


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def _trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def _linked(span: ReadableSpan) -> Sequence[int]:
    return [link.context.span_id for link in span.links]


async def test_one_trace_runs_from_the_callers_span_to_the_tool(
    make_stack: StackFactory, trajectory: Callable[[], str], spans: InMemorySpanExporter
) -> None:
    stack = await make_stack()
    worker_batch = f"toolbus.worker.{stack.workers[0].worker_id}.batch"
    tid = trajectory()
    with tracing.tracer().start_as_current_span("rollout step") as root:
        result = await stack.client.execute(tid, "terminal", {"command": "echo hi"})
    assert result.success

    found = await _finished(
        spans,
        "send tools.execute.terminal",
        "process tools.execute.*",
        "acquire slot",
        f"send {worker_batch}",
        f"process {worker_batch}",
        "execute_tool terminal",
    )
    client = found["send tools.execute.terminal"]
    executor = found["process tools.execute.*"]
    acquire = found["acquire slot"]
    batch = found[f"send {worker_batch}"]
    worker = found[f"process {worker_batch}"]
    tool = found["execute_tool terminal"]

    # Parents: caller -> client -> executor -> (acquire, worker -> tool), all in one trace.
    assert _parent_id(client) == root.get_span_context().span_id
    assert _parent_id(executor) == _span_id(client)
    assert _parent_id(acquire) == _span_id(executor)
    assert _parent_id(worker) == _span_id(executor)
    assert _parent_id(tool) == _span_id(worker)
    trace_id = root.get_span_context().trace_id
    assert {_trace_id(s) for s in (client, executor, acquire, worker, tool)} == {trace_id}
    # The batch has a trace of its own, linked to every call in it; the worker links back.
    assert batch.parent is None and _trace_id(batch) != trace_id
    assert _span_id(executor) in _linked(batch)
    assert _span_id(batch) in _linked(worker)

    assert client.kind is SpanKind.CLIENT and executor.kind is SpanKind.CONSUMER
    assert batch.kind is SpanKind.PRODUCER and worker.kind is SpanKind.CONSUMER
    assert (
        dict(executor.attributes or {}).items()
        >= {
            "messaging.system": "nats",
            "messaging.destination.name": "tools.execute.terminal",
            "messaging.destination.template": "tools.execute.*",
            "messaging.consumer.group.name": "toolbus",
            "messaging.operation.type": "process",
            "toolbus.trajectory_id": tid,
            "toolbus.tool": "terminal",
        }.items()
    )
    assert (batch.attributes or {})["messaging.batch.message_count"] == 1
    assert (batch.attributes or {})["messaging.destination.name"] == worker_batch
    # Queue wait and execution, separately: the worker span's wait, the tool span's duration.
    assert (worker.attributes or {})["toolbus.queue_wait_s"] >= 0
    assert tool.start_time is not None and worker.start_time is not None
    assert tool.start_time >= worker.start_time
    assert (
        dict(tool.attributes or {}).items()
        >= {
            "gen_ai.tool.name": "terminal",
            "toolbus.status": "ok",
            "process.exit.code": 0,
            "toolbus.sandboxed": True,
            "toolbus.truncated": False,
            "toolbus.output_bytes": 3,
        }.items()
    )
    for span in found.values():
        assert span.status.status_code is not StatusCode.ERROR, span.name


async def test_a_failing_call_marks_its_spans_as_errors(
    make_stack: StackFactory, trajectory: Callable[[], str], spans: InMemorySpanExporter
) -> None:
    stack = await make_stack()
    worker_batch = f"toolbus.worker.{stack.workers[0].worker_id}.batch"
    tid = trajectory()
    result = await stack.client.execute(tid, "terminal", {"command": "exit 3"})
    assert not result.success
    found = await _finished(
        spans,
        "send tools.execute.terminal",
        "process tools.execute.*",
        f"process {worker_batch}",
        "execute_tool terminal",
    )
    for span in found.values():
        assert span.status.status_code is StatusCode.ERROR, span.name
        assert (span.attributes or {})["error.type"] == "exit", span.name
    assert (found["execute_tool terminal"].attributes or {})["process.exit.code"] == 3

    spans.clear()
    with pytest.raises(NotFound):
        await stack.client.execute(tid, "no_such_tool", {})
    refused = await _finished(spans, "send tools.execute.no_such_tool", "process tools.execute.*")
    for span in refused.values():
        assert span.status.status_code is StatusCode.ERROR
        assert (span.attributes or {})["error.type"] == "unknown_tool"


async def test_log_lines_of_a_call_carry_its_trace_ids(
    make_stack: StackFactory, trajectory: Callable[[], str], spans: InMemorySpanExporter
) -> None:
    stack = await make_stack()
    tid = trajectory()
    with (
        tracing.tracer().start_as_current_span("rollout step") as root,
        structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars, add_trace_ids]
        ) as lines,
    ):
        result = await stack.client.execute(tid, "terminal", {"command": "true"}, uniq_id="u-7")
    assert result.success
    trace_id = format(root.get_span_context().trace_id, "032x")
    events = {line["event"]: line for line in lines if line.get("trajectory_id") == tid}
    for event in ("slot leased", "call done", "call answered"):
        assert events[event]["trace_id"] == trace_id, event
        assert len(events[event]["span_id"]) == 16
        assert events[event]["uniq_id"] == "u-7"
    # The worker's line is written in the worker's span, the executor's in its own.
    assert events["call done"]["span_id"] != events["call answered"]["span_id"]


@pytest.mark.node
async def test_a_nodejs_request_with_a_traceparent_lands_in_that_trace(
    make_stack: StackFactory,
    nats_url: str,
    trajectory: Callable[[], str],
    node_client: NodeClient,
    spans: InMemorySpanExporter,
) -> None:
    stack = await make_stack()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    script = NodeClient(node=node_client.node, script=NODE_DIR / "traceparent.mjs")
    code, stdout, stderr = await run_node(
        script, nats_url, trajectory(), f"00-{trace_id}-{parent_id}-01"
    )
    assert code == 0, f"{stdout}\n{stderr}"
    reply = json.loads(stdout.strip().splitlines()[-1])
    assert reply["success"] is True and reply["output"] == "traced-from-node\n"
    assert reply["echoed"] == []  # the reply does not carry the trace headers back

    worker_batch = f"toolbus.worker.{stack.workers[0].worker_id}.batch"
    found = await _finished(
        spans, "process tools.execute.*", f"process {worker_batch}", "execute_tool terminal"
    )
    executor = found["process tools.execute.*"]
    assert format(_trace_id(executor), "032x") == trace_id
    assert executor.parent is not None and executor.parent.is_remote
    assert format(executor.parent.span_id, "016x") == parent_id
    assert {format(_trace_id(span), "032x") for span in found.values()} == {trace_id}


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"},
    ],
)
def test_tracing_is_off_unless_asked_for(environ: dict[str, str]) -> None:
    assert tracing.build_tracer_provider(service_name="toolbus", environ=environ) is None


def test_exporters_come_from_the_otel_variables() -> None:
    console = tracing.build_tracer_provider(
        service_name="toolbus-worker", environ={"OTEL_TRACES_EXPORTER": "console"}
    )
    assert console is not None
    assert console.resource.attributes["service.name"] == "toolbus-worker"
    console.shutdown()
    # An OTLP endpoint alone turns OTLP on (the exporter sends nothing until spans end).
    otlp = tracing.build_tracer_provider(
        service_name="toolbus",
        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SERVICE_NAME": "rl"},
    )
    assert otlp is not None and otlp.resource.attributes["service.name"] == "rl"
    otlp.shutdown()
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin': unknown exporter"):
        tracing.build_tracer_provider(
            service_name="toolbus", environ={"OTEL_TRACES_EXPORTER": "zipkin"}
        )


def test_trace_headers_are_read_whatever_their_case() -> None:
    carrier = {"TRACEPARENT": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    context = trace.get_current_span(tracing.extract_context(carrier)).get_span_context()
    assert context.is_valid and context.is_remote
    assert format(context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.extract_context({"traceparent": "garbage"}) == tracing.extract_context(None)


def test_with_tracing_off_spans_cost_no_attributes(spans: InMemorySpanExporter) -> None:
    """Run where no provider is installed (this test process has one): nothing is built."""
    program = (
        "from observability import tracing\n"
        "built = []\n"
        "with tracing.span('x', attributes=lambda: built.append(1) or {}) as span:\n"
        "    pass\n"
        "assert not tracing.enabled() and not built and not span.is_recording()\n"
        "print('off')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.stdout == "off\n", done.stderr
    assert tracing.enabled()  # here the session's in-memory provider is installed
