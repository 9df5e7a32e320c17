"""observability.metrics: the instruments on an in-memory reader, and the set-up from OTEL_*.

No test sets the global MeterProvider: instruments get their meter passed in, and the set-up is
tested through build_meter_provider, which leaves the global alone.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from opentelemetry.metrics import NoOpMeter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    Gauge,
    InMemoryMetricReader,
    Metric,
    PeriodicExportingMetricReader,
)

from observability import metrics as toolbus_metrics
from observability.metrics import (
    DEFAULT_BATCH_SIZE_BUCKETS,
    DEFAULT_DURATION_BUCKETS_S,
    ToolbusMetrics,
    build_meter_provider,
    configure_metrics,
)
from tests.conftest import StackFactory


def _instruments(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    if data is None:  # nothing was measured at all
        return {}
    return {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def _points(metric: Metric) -> dict[frozenset[tuple[str, Any]], Any]:
    return {frozenset((point.attributes or {}).items()): point for point in metric.data.data_points}


def test_call_counter_and_duration_histograms() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        recorder = ToolbusMetrics(provider.get_meter("toolbus"))
        recorder.call_finished(
            tool="terminal", status="ok", total_s=0.3, queue_wait_s=0.002, execution_s=0.25
        )
        recorder.call_finished(
            tool="terminal", status="ok", total_s=0.5, queue_wait_s=0.004, execution_s=0.45
        )
        recorder.call_finished(
            tool="terminal", status="timeout", total_s=30.5, queue_wait_s=0.01, execution_s=30.0
        )
        recorder.call_finished(
            tool="read_file", status="error", total_s=0.001, error_type="invalid_arguments"
        )
        instruments = _instruments(reader)
    finally:
        provider.shutdown()

    calls = instruments["toolbus.calls"]
    assert calls.unit == "{call}"
    assert calls.data.is_monotonic
    assert {attrs: point.value for attrs, point in _points(calls).items()} == {
        frozenset({("tool", "terminal"), ("status", "ok")}): 2,
        frozenset({("tool", "terminal"), ("status", "timeout"), ("error.type", "timeout")}): 1,
        frozenset(
            {("tool", "read_file"), ("status", "error"), ("error.type", "invalid_arguments")}
        ): 1,
    }

    expected = {
        "toolbus.call.duration": {"terminal": (3, 31.3), "read_file": (1, 0.001)},
        # A call that never reached a worker records no queue wait nor execution.
        "toolbus.call.queue_wait": {"terminal": (3, 0.016)},
        "toolbus.call.execution": {"terminal": (3, 30.7)},
    }
    for name, by_tool in expected.items():
        histogram = instruments[name]
        assert histogram.unit == "s", name
        points = _points(histogram)
        assert set(points) == {frozenset({("tool", tool)}) for tool in by_tool}, name
        for tool, (count, total) in by_tool.items():
            point = points[frozenset({("tool", tool)})]
            assert point.count == count, name
            assert point.sum == pytest.approx(total), name
            assert tuple(point.explicit_bounds) == DEFAULT_DURATION_BUCKETS_S, name
    assert DEFAULT_DURATION_BUCKETS_S[0] == 0.001 and DEFAULT_DURATION_BUCKETS_S[-1] == 600


def test_batch_size_histogram_by_worker() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        recorder = ToolbusMetrics(provider.get_meter("toolbus"))
        recorder.batch_sent(worker_id="w1", size=3)
        recorder.batch_sent(worker_id="w1", size=5)
        recorder.batch_sent(worker_id="w2", size=1)
        batch = _instruments(reader)["toolbus.batch.size"]
    finally:
        provider.shutdown()
    assert batch.unit == "{call}"
    points = _points(batch)
    assert {attrs: (point.count, point.sum) for attrs, point in points.items()} == {
        frozenset({("worker.id", "w1")}): (2, 8),
        frozenset({("worker.id", "w2")}): (1, 1),
    }
    assert tuple(next(iter(points.values())).explicit_bounds) == DEFAULT_BATCH_SIZE_BUCKETS


def test_slots_and_queue_depth_are_observed_at_collection() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        recorder = ToolbusMetrics(provider.get_meter("toolbus"))
        # Nothing registered yet: the instruments report nothing (not zeros).
        assert "toolbus.slots" not in _instruments(reader)

        slots = {"in_use": 1, "free": 7}
        depths = [2, 3]
        recorder.observe_slots(lambda: (99, 99))
        unregister_latest = recorder.observe_slots(lambda: (slots["in_use"], slots["free"]))
        recorder.observe_queue_depth(lambda: depths[0])
        unregister_second = recorder.observe_queue_depth(lambda: depths[1])
        first = _instruments(reader)

        slots.update(in_use=4, free=4)
        depths[0] = 10
        second = _instruments(reader)

        unregister_latest()
        unregister_second()
        unregister_second()  # twice is harmless
        third = _instruments(reader)
    finally:
        provider.shutdown()

    gauge = first["toolbus.slots"]
    assert gauge.unit == "{slot}"
    assert isinstance(gauge.data, Gauge)

    def slot_values(instruments: dict[str, Metric]) -> dict[str, int]:
        return {
            dict(attrs)["state"]: point.value
            for attrs, point in _points(instruments["toolbus.slots"]).items()
        }

    def depth(instruments: dict[str, Metric]) -> int:
        (point,) = instruments["toolbus.queue.depth"].data.data_points
        assert not point.attributes
        return int(point.value)

    # The latest slots registration answers; queue depths of several executors add up.
    assert slot_values(first) == {"in_use": 1, "free": 7}
    assert depth(first) == 5
    depth_metric = first["toolbus.queue.depth"]
    assert depth_metric.unit == "{call}"
    assert not depth_metric.data.is_monotonic  # an up-down counter
    assert slot_values(second) == {"in_use": 4, "free": 4}
    assert depth(second) == 13
    assert slot_values(third) == {"in_use": 99, "free": 99}
    assert depth(third) == 10


def test_the_no_op_meter_costs_nothing_and_fails_nothing() -> None:
    recorder = ToolbusMetrics(MeterProvider().get_meter("unused"))  # no reader: nothing kept
    recorder.call_finished(tool="terminal", status="ok", total_s=0.1)
    noop = ToolbusMetrics(NoOpMeter("toolbus"))
    noop.call_finished(tool="terminal", status="exit", total_s=0.1, queue_wait_s=0, execution_s=0)
    noop.batch_sent(worker_id="w", size=2)
    noop.observe_slots(lambda: (0, 0))()
    noop.observe_queue_depth(lambda: 0)()


# -- set-up -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_METRICS_EXPORTER": "none"},
        {"OTEL_METRICS_EXPORTER": " None "},
        {"OTEL_SDK_DISABLED": "true", "OTEL_METRICS_EXPORTER": "console"},
        {"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
        {"OTEL_METRICS_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
    ],
)
def test_metrics_are_off_unless_asked_for(environ: dict[str, str]) -> None:
    assert build_meter_provider(service_name="toolbus", environ=environ) is None
    assert configure_metrics(service_name="toolbus", environ=environ) is None


def _exporters(provider: MeterProvider) -> list[object]:
    readers = provider._metric_readers
    assert all(isinstance(reader, PeriodicExportingMetricReader) for reader in readers)
    return [reader._exporter for reader in readers]


def test_console_exporter_with_the_service_name_and_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    environ = {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "250"}
    provider = build_meter_provider(service_name="toolbus-executor", environ=environ)
    assert provider is not None
    try:
        (exporter,) = _exporters(provider)
        assert isinstance(exporter, ConsoleMetricExporter)
        (reader,) = provider._metric_readers
        assert reader._export_interval_millis == 250
        assert provider._sdk_config.resource.attributes["service.name"] == "toolbus-executor"
        ToolbusMetrics(provider.get_meter("toolbus")).call_finished(
            tool="terminal", status="ok", total_s=0.2
        )
    finally:
        provider.shutdown()  # exports what is left
    assert '"name": "toolbus.calls"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"OTEL_SERVICE_NAME": "rollouts"}, "rollouts"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from%20attrs,team=rl"}, "from attrs"),
        (
            {"OTEL_RESOURCE_ATTRIBUTES": "service.name=attrs", "OTEL_SERVICE_NAME": "wins"},
            "wins",
        ),
        ({"OTEL_RESOURCE_ATTRIBUTES": "team=rl"}, "toolbus-worker"),
    ],
)
def test_the_environment_names_the_service_first(environ: dict[str, str], expected: str) -> None:
    provider = build_meter_provider(
        service_name="toolbus-worker", environ={"OTEL_METRICS_EXPORTER": "console", **environ}
    )
    assert provider is not None
    try:
        attributes = provider._sdk_config.resource.attributes
        assert attributes["service.name"] == expected
        if "team=rl" in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
            assert attributes["team"] == "rl"
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"OTEL_METRICS_EXPORTER": "prometheus"},
            "OTEL_METRICS_EXPORTER='prometheus': unknown exporter 'prometheus'; "
            "use one or more of otlp, console, none",
        ),
        ({"OTEL_METRICS_EXPORTER": "console,none"}, "'none' cannot be combined"),
        (
            {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "5s"},
            "OTEL_METRIC_EXPORT_INTERVAL='5s': expected milliseconds",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_TIMEOUT": "0"},
            "OTEL_METRIC_EXPORT_TIMEOUT='0': expected a positive number",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL='grpc'",
        ),
    ],
)
def test_values_it_does_not_know_are_refused_by_name(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build_meter_provider(service_name="toolbus", environ=environ)


def test_configure_metrics_sets_the_global_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    installed: list[MeterProvider] = []
    monkeypatch.setattr(toolbus_metrics.metrics, "set_meter_provider", installed.append)
    provider = configure_metrics(
        service_name="toolbus", environ={"OTEL_METRICS_EXPORTER": "console"}
    )
    assert provider is not None
    provider.shutdown()
    assert installed == [provider]


class _Collector(BaseHTTPRequestHandler):
    """A stand-in OTLP/HTTP collector: keeps what it is sent."""

    received: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "METRICS_ENDPOINT"])
def test_an_otlp_endpoint_turns_metrics_on_and_they_arrive_there(
    collector: tuple[str, list[tuple[str, str, bytes]]], variable: str
) -> None:
    url, received = collector
    environ = (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": url + "/"}
        if variable == "OTEL_EXPORTER_OTLP_ENDPOINT"
        else {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": url + "/custom/path"}
    )
    provider = build_meter_provider(service_name="toolbus-executor", environ=environ)
    assert provider is not None
    (exporter,) = _exporters(provider)
    assert type(exporter).__name__ == "OTLPMetricExporter"
    try:
        recorder = ToolbusMetrics(provider.get_meter("toolbus"))
        recorder.call_finished(tool="terminal", status="ok", total_s=0.2)
        recorder.observe_slots(lambda: (1, 3))
    finally:
        provider.shutdown()  # the last export goes out now

    assert received, "the collector got nothing"
    path, content_type, body = received[-1]
    assert path == ("/v1/metrics" if variable == "OTEL_EXPORTER_OTLP_ENDPOINT" else "/custom/path")
    assert content_type == "application/x-protobuf"
    request = ExportMetricsServiceRequest.FromString(body)
    (resource_metrics,) = request.resource_metrics
    resource = {attr.key: attr.value.string_value for attr in resource_metrics.resource.attributes}
    assert resource["service.name"] == "toolbus-executor"
    names = {metric.name for scope in resource_metrics.scope_metrics for metric in scope.metrics}
    assert {"toolbus.calls", "toolbus.call.duration", "toolbus.slots"} <= names


async def test_an_executor_records_calls_batches_slots_and_queue_depth(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("toolbus")
    stack = await make_stack(slots=3, executor_options={"metrics": ToolbusMetrics(meter)})
    tid = trajectory()
    assert (await stack.client.execute(tid, "terminal", {"command": "true"})).success
    assert not (await stack.client.execute(tid, "terminal", {"command": "exit 2"})).success
    assert (await stack.client.list_artifacts(tid)).success

    found = _instruments(reader)
    calls = _points(found["toolbus.calls"])
    assert calls[frozenset({("tool", "terminal"), ("status", "ok")})].value == 1
    assert (
        calls[frozenset({("tool", "terminal"), ("status", "exit"), ("error.type", "exit")})].value
        == 1
    )
    assert calls[frozenset({("tool", "artifacts.list"), ("status", "ok")})].value == 1
    for name in ("toolbus.call.queue_wait", "toolbus.call.execution", "toolbus.call.duration"):
        assert _points(found[name])[frozenset({("tool", "terminal")})].count == 2, name
    batches = _points(found["toolbus.batch.size"])
    worker_id = stack.workers[0].worker_id
    assert batches[frozenset({("worker.id", worker_id)})].sum == 3
    slots = _points(found["toolbus.slots"])
    assert slots[frozenset({("state", "in_use")})].value == 1
    assert slots[frozenset({("state", "free")})].value == 2
    assert _points(found["toolbus.queue.depth"])[frozenset()].value == 0
    status = await stack.client.status()
    assert status.rates.calls_per_s_60s > 0 and status.rates.errors_per_s_60s > 0
