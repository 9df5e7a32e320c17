"""OpenTelemetry metrics of toolbus: set-up from the standard variables, and the instruments.

An operator sees throughput, failures, where a call's time goes and how full the pool is, in any
OTLP backend, without parsing logs. The instruments:

- ``toolbus.calls``: Counter, ``{call}``; attributes ``tool``, ``status``, and ``error.type``
  when the status is not ``ok``.
- ``toolbus.call.queue_wait``, ``toolbus.call.execution``, ``toolbus.call.duration``:
  Histograms, seconds (buckets from 1 ms to 600 s); attribute ``tool``.
- ``toolbus.batch.size``: Histogram, ``{call}``; attribute ``worker.id``.
- ``toolbus.slots``: ObservableGauge, ``{slot}``; attribute ``state`` (``in_use`` | ``free``).
- ``toolbus.queue.depth``: ObservableUpDownCounter, ``{call}``; no attributes.

``toolbus.calls`` counts finished tool calls; ``status`` is ``ok`` for a success, else what went
wrong (``exit``, ``timeout``, ``disk_full``, ``error``, ``infra``, ...), and then ``error.type``
says the same or something finer. ``queue_wait`` runs from the executor receiving a call to the
worker starting its tool, ``execution`` is the tool's run on the worker, ``duration`` the whole
call from the executor receiving it to its reply. ``toolbus.slots`` is the pool as one executor
sees it (every executor sees the whole pool, so it is a gauge: adding executors up would count
it twice); ``toolbus.queue.depth`` is the calls one executor holds and has not answered yet (it
adds up across executors).

Metrics are off unless asked for (``OTEL_METRICS_EXPORTER``, or an OTLP endpoint): then the API's
no-op meter is used, and every recording costs a method call.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar
from urllib.parse import unquote

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource

__all__ = [
    "DEFAULT_BATCH_SIZE_BUCKETS",
    "DEFAULT_DURATION_BUCKETS_S",
    "METER_NAME",
    "METRICS_EXPORTERS",
    "ToolbusMetrics",
    "build_meter_provider",
    "configure_metrics",
]

METER_NAME = "toolbus"
METRICS_EXPORTERS = ("otlp", "console", "none")
# Tool calls last from a millisecond (read_file) to the 600 s timeout; roughly 1-2.5-5 steps.
DEFAULT_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
DEFAULT_BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_OTLP_PROTOCOLS = ("http/protobuf",)
_T = TypeVar("_T")
_TRUE = ("true", "1", "yes", "on")


# -- set-up -------------------------------------------------------------------------------------
def configure_metrics(
    *, service_name: str, environ: Mapping[str, str] = os.environ
) -> MeterProvider | None:
    """Build the process's MeterProvider from the environment and make it the global one.

    Returns it so the entry point can ``shutdown()`` it on exit (which exports the last values),
    or None when metrics are off. Instruments made before this call (``ToolbusMetrics()`` at
    import time) still report here: the API's global meters forward to the provider set later.
    """
    provider = build_meter_provider(service_name=service_name, environ=environ)
    if provider is not None:
        metrics.set_meter_provider(provider)
    return provider


def build_meter_provider(
    *, service_name: str, environ: Mapping[str, str] = os.environ
) -> MeterProvider | None:
    """The MeterProvider the standard ``OTEL_*`` variables ask for, without making it global.

    ``OTEL_METRICS_EXPORTER``: ``otlp``, ``console`` or ``none``, or several separated by commas;
    unset, it is ``otlp`` when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``) and ``none`` otherwise, so a process nobody asked
    to export metrics starts no thread and sends nothing. ``OTEL_SDK_DISABLED=true`` turns them
    off whatever else is set. ``OTEL_METRIC_EXPORT_INTERVAL`` and ``OTEL_METRIC_EXPORT_TIMEOUT``
    are in milliseconds. ``service_name`` names the service unless ``OTEL_SERVICE_NAME`` or
    ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES`` does.

    ``environ`` decides whether metrics are on and where OTLP sends them; the OTLP exporter reads
    its other settings (headers, timeout, compression, TLS files) from the process environment.
    Raises ValueError, naming the variable, for a value it does not know.
    """
    exporters = _exporter_names(environ)
    if not exporters:
        return None
    readers: list[MetricReader] = [
        PeriodicExportingMetricReader(
            _exporter(name, environ),
            export_interval_millis=_millis(environ, "OTEL_METRIC_EXPORT_INTERVAL"),
            export_timeout_millis=_millis(environ, "OTEL_METRIC_EXPORT_TIMEOUT"),
        )
        for name in exporters
    ]
    return MeterProvider(resource=_resource(service_name, environ), metric_readers=readers)


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return []
    raw = environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    if not raw:
        has_endpoint = any(
            environ.get(name, "").strip()
            for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        )
        return ["otlp"] if has_endpoint else []
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS_EXPORTERS]
    if unknown:
        raise ValueError(
            f"OTEL_METRICS_EXPORTER={raw!r}: unknown exporter {unknown[0]!r}; "
            f"use one or more of {', '.join(METRICS_EXPORTERS)}"
        )
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"OTEL_METRICS_EXPORTER={raw!r}: 'none' cannot be combined")
        return []
    return list(dict.fromkeys(names))  # once each, in the order given


def _exporter(name: str, environ: Mapping[str, str]) -> MetricExporter:
    if name == "console":
        return ConsoleMetricExporter(out=sys.stdout)
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in _OTLP_PROTOCOLS:
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: toolbus exports metrics over "
            f"{', '.join(_OTLP_PROTOCOLS)} only (port 4318, not gRPC's 4317)"
        )
    # Imported here: the exporter pulls in protobuf and an HTTP stack a process without
    # metrics never needs.
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError as exc:
        raise ImportError(
            "OTLP metrics need the opentelemetry-exporter-otlp-proto-http package "
            f"(pip install opentelemetry-exporter-otlp-proto-http): {exc}"
        ) from exc

    return OTLPMetricExporter(endpoint=_otlp_endpoint(environ))


def _otlp_endpoint(environ: Mapping[str, str]) -> str | None:
    """The URL metrics go to, by the spec's rules: the per-signal variable as it is, or the base
    one with ``v1/metrics`` appended; None lets the exporter use its default (localhost:4318)."""
    specific = environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip()
    if specific:
        return specific
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return base + ("v1/metrics" if base.endswith("/") else "/v1/metrics")
    return None


def _millis(environ: Mapping[str, str], name: str) -> float | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None  # the SDK's default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected milliseconds, a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r}: expected a positive number of milliseconds")
    return value


def _resource(service_name: str, environ: Mapping[str, str]) -> Resource:
    """``service.name`` is ours unless the environment names the service (the SDK's order:
    ``OTEL_SERVICE_NAME``, then ``OTEL_RESOURCE_ATTRIBUTES``, then the default)."""
    attributes: dict[str, str] = {SERVICE_NAME: service_name}
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    if environ.get("OTEL_SERVICE_NAME", "").strip():
        attributes[SERVICE_NAME] = environ["OTEL_SERVICE_NAME"].strip()
    return Resource.create(attributes)


# -- instruments --------------------------------------------------------------------------------
class ToolbusMetrics:
    """toolbus's instruments; one per process (per meter), shared by its executors and workers.

    Recording methods take plain values, so callers do not touch the OpenTelemetry API; on the
    no-op meter they cost a method call each.
    """

    def __init__(self, meter: Meter | None = None) -> None:
        meter = meter if meter is not None else metrics.get_meter(METER_NAME)
        self._calls = meter.create_counter(
            "toolbus.calls", unit="{call}", description="Tool calls finished, by tool and status."
        )
        self._queue_wait = meter.create_histogram(
            "toolbus.call.queue_wait",
            unit="s",
            description="Time a call waited before its tool started: executor receive to "
            "worker start.",
            explicit_bucket_boundaries_advisory=DEFAULT_DURATION_BUCKETS_S,
        )
        self._execution = meter.create_histogram(
            "toolbus.call.execution",
            unit="s",
            description="Time the tool ran on the worker.",
            explicit_bucket_boundaries_advisory=DEFAULT_DURATION_BUCKETS_S,
        )
        self._duration = meter.create_histogram(
            "toolbus.call.duration",
            unit="s",
            description="Whole call: executor receive to reply.",
            explicit_bucket_boundaries_advisory=DEFAULT_DURATION_BUCKETS_S,
        )
        self._batch_size = meter.create_histogram(
            "toolbus.batch.size",
            unit="{call}",
            description="Calls in one batch sent to a worker.",
            explicit_bucket_boundaries_advisory=DEFAULT_BATCH_SIZE_BUCKETS,
        )
        # The SDK calls these from its export thread; registrations come from the event loop.
        self._lock = threading.Lock()
        self._slots: list[Callable[[], tuple[int, int]]] = []
        self._queue_depths: list[Callable[[], int]] = []
        meter.create_observable_gauge(
            "toolbus.slots",
            callbacks=[self._observe_slots],
            unit="{slot}",
            description="Sandbox slots of the pool by state, as an executor sees it.",
        )
        meter.create_observable_up_down_counter(
            "toolbus.queue.depth",
            callbacks=[self._observe_queue_depth],
            unit="{call}",
            description="Calls an executor holds and has not answered yet.",
        )

    # -- recording ------------------------------------------------------------------------------
    def call_finished(
        self,
        *,
        tool: str,
        status: str,
        total_s: float,
        queue_wait_s: float | None = None,
        execution_s: float | None = None,
        error_type: str | None = None,
    ) -> None:
        """One call answered. ``status`` is ``ok`` for a success; otherwise ``error.type`` is
        ``error_type``, or ``status`` when that is not given. Pass the times known: a call that
        never reached a worker has no queue wait or execution."""
        by_tool = {"tool": tool}
        attributes = (
            {"tool": tool, "status": status}
            if status == "ok"
            else {"tool": tool, "status": status, "error.type": error_type or status}
        )
        self._calls.add(1, attributes)
        self._duration.record(total_s, by_tool)
        if queue_wait_s is not None:
            self._queue_wait.record(queue_wait_s, by_tool)
        if execution_s is not None:
            self._execution.record(execution_s, by_tool)

    def batch_sent(self, *, worker_id: str, size: int) -> None:
        """A batch of ``size`` calls went to ``worker_id``."""
        self._batch_size.record(size, {"worker.id": worker_id})

    # -- observing ------------------------------------------------------------------------------
    def observe_slots(self, callback: Callable[[], tuple[int, int]]) -> Callable[[], None]:
        """Report ``toolbus.slots`` from ``callback() -> (in_use, free)`` at each export.

        The latest registration answers (every executor sees the same pool). Returns a function
        that unregisters it, for an executor that stops while the process goes on.
        """
        return self._register(self._slots, callback)

    def observe_queue_depth(self, callback: Callable[[], int]) -> Callable[[], None]:
        """Report ``toolbus.queue.depth`` from ``callback()`` at each export; the callbacks of
        several executors in one process are added up. Returns a function that unregisters it."""
        return self._register(self._queue_depths, callback)

    def _register(self, callbacks: list[_T], callback: _T) -> Callable[[], None]:
        with self._lock:
            callbacks.append(callback)

        def unregister() -> None:
            with self._lock:
                if callback in callbacks:
                    callbacks.remove(callback)

        return unregister

    def _observe_slots(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            callback = self._slots[-1] if self._slots else None
        if callback is None:
            return []
        in_use, free = callback()
        return [
            Observation(in_use, {"state": "in_use"}),
            Observation(free, {"state": "free"}),
        ]

    def _observe_queue_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            callbacks: Sequence[Callable[[], int]] = tuple(self._queue_depths)
        if not callbacks:
            return []
        return [Observation(sum(callback() for callback in callbacks))]
