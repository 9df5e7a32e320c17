"""How an executor serves a request, whatever the request is: the plumbing around a handler.

Each request runs in a task of its own (nats-py runs one callback of a subscription at a time,
and a slow call must never hold back another), inside a span that continues the caller's
trace. Before the handler: the executor's call limit (429) and the bearer token (401/403).
After it: the reply, or an ADR-32 error reply with a precise message and never a traceback;
a reply too large for one message is answered as an error too. Every request is counted (its
endpoint's ``$SRV`` stats, the call rates, the metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from observability import tracing
from observability.metrics import ToolbusMetrics
from schemas.errors import ErrorKind
from schemas.internal import ItemResult
from schemas.messages import CallRates, ToolResult
from schemas.subjects import AUTHORIZATION_HEADER, QUEUE_GROUP

from ._discovery import EndpointStats, ServiceDiscovery
from ._rates import RateWindow
from ._replies import reply_error, reply_json
from .exceptions import (
    Forbidden,
    InternalError,
    NoCapacity,
    Overloaded,
    ServiceError,
    Unauthorized,
)

log = structlog.get_logger("toolbus.executor")

Handler = Callable[[Msg], Awaitable[bytes]]
# A full executor frees up as its calls end, many a second: a second is a fair wait.
_OVERLOADED_RETRY_AFTER_S = 1.0
_CALL_ENDPOINTS = ("execute", "artifacts")  # what the call rates count (not status, list, ...)


class CallStats:
    """What an executor counts of the calls it serves: totals, recent rates, calls in flight."""

    def __init__(self, metrics: ToolbusMetrics) -> None:
        self._metrics = metrics
        self.total_requests = 0
        self.total_errors = 0
        self.calls_in_flight = 0
        self._calls = RateWindow()
        self._errors = RateWindow()
        self._in_flight = _InFlight(self)

    def rates(self) -> CallRates:
        return CallRates(
            calls_per_s_10s=round(self._calls.per_second(10), 3),
            calls_per_s_60s=round(self._calls.per_second(60), 3),
            errors_per_s_60s=round(self._errors.per_second(60), 3),
        )

    def in_flight(self) -> AbstractContextManager[None]:
        """Counts a call in flight for the block (a plain object: no generator per call)."""
        return self._in_flight

    def call_finished(
        self,
        tool: str,
        started: float,
        *,
        succeeded: bool,
        error: str | None,
        error_kind: str,
        status: str | None = None,
        done: ItemResult | ToolResult | None = None,
    ) -> None:
        """Count a finished call (rates, metrics) and mark the request's span when it failed."""
        self._calls.add()
        if not succeeded:
            self._errors.add()
            tracing.mark_error(trace.get_current_span(), error_kind, error)
        timing = done if isinstance(done, ItemResult) else None
        self._metrics.call_finished(
            tool=tool,
            status=status or ("ok" if succeeded else "error"),
            total_s=time.perf_counter() - started,
            queue_wait_s=timing.queue_wait_s if timing else None,
            execution_s=timing.execution_s if timing else None,
            error_type=None if succeeded else error_kind,
        )

    def result_finished(
        self, tool: str, started: float, result: ToolResult, *, done: ItemResult | ToolResult
    ) -> None:
        self.call_finished(
            tool,
            started,
            succeeded=result.success,
            error=result.error,
            error_kind=str(result.metadata.get("error_kind") or "tool"),
            status=result.metadata.get("status"),
            done=done,
        )

    def refused(self, endpoint: str, started_ns: int, error: ServiceError) -> None:
        self.total_errors += 1
        if endpoint in _CALL_ENDPOINTS:  # a refused call still counts in the call rates
            self._calls.add()
            self._errors.add()
        self._metrics.call_finished(
            tool=endpoint,
            status="refused",
            total_s=(time.perf_counter_ns() - started_ns) / 1e9,
            error_type=error.kind,
        )


class _InFlight(AbstractContextManager[None]):
    __slots__ = ("_stats",)

    def __init__(self, stats: CallStats) -> None:
        self._stats = stats

    def __enter__(self) -> None:
        self._stats.calls_in_flight += 1

    def __exit__(self, *exc_info: object) -> None:
        self._stats.calls_in_flight -= 1


class _Intake(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # unsubscribed; what the server routed here before is served
    STOPPED = "stopped"  # drained: a request that still comes is refused at once


_QUEUED_TAKE_S = 2.0  # after a failed drain, for the requests a subscription had queued


def _stopping() -> NoCapacity:
    """What a request that the stop cut short, or that came after it, is told."""
    return NoCapacity("the executor is shutting down; retry", kind=ErrorKind.NO_CAPACITY)


class RequestServer:
    def __init__(
        self,
        nc: Client,
        *,
        stats: CallStats,
        discovery: ServiceDiscovery,
        endpoints: dict[str, EndpointStats],
        token: str | None,
        max_pending_calls: int,
    ) -> None:
        self._nc = nc
        self._stats = stats
        self._discovery = discovery
        self._endpoints = endpoints
        self._token = token
        self._max_pending_calls = max_pending_calls
        self._pending_calls = 0
        self._subscriptions: list[Subscription] = []
        self._intake = _Intake.SERVING
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def serving(self) -> bool:
        """Subscribed and taking requests: served, not yet told to stop."""
        return self._intake is _Intake.SERVING and bool(self._subscriptions)

    async def serve(self, handlers: dict[str, Handler]) -> None:
        """Subscribe each endpoint (by name) in the queue group, then answer discovery."""
        for name, handler in handlers.items():
            stats = self._endpoints[name]
            self._subscriptions.append(
                await self._nc.subscribe(
                    stats.subject, queue=QUEUE_GROUP, cb=self._callback(handler, stats)
                )
            )
        await self._discovery.start()

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop accepting, wait for requests in flight, then cancel the rest (each gets 503)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        self._intake = _Intake.DRAINING
        # Drain, not unsubscribe: requests the server routed here before it saw that are served.
        subscriptions, self._subscriptions = self._subscriptions, []
        await asyncio.gather(*(_drain(sub) for sub in subscriptions))
        self._intake = _Intake.STOPPED
        await _quietly(self._discovery.stop())
        # Until every request task has ended: one created after a first look is waited for too.
        while self._tasks and (remaining := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=remaining)
        while self._tasks:
            pending = set(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _callback(self, handler: Handler, stats: EndpointStats) -> Callable[[Msg], Awaitable[None]]:
        async def on_request(msg: Msg) -> None:
            if self._intake is _Intake.STOPPED:
                # After the drain nothing should come; if it does, it is told at once.
                log.warning("a request reached a stopped executor", subject=msg.subject)
                task = asyncio.create_task(
                    self._fail(msg, stats, time.perf_counter_ns(), _stopping())
                )
            else:
                task = asyncio.create_task(self._serve(msg, handler, stats))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_request

    async def _serve(self, msg: Msg, handler: Handler, stats: EndpointStats) -> None:
        # The request's span continues the caller's trace when it sent a traceparent header.
        with tracing.span(
            f"process {stats.subject}",
            kind=SpanKind.CONSUMER,
            parent=msg.headers or {},
            attributes=lambda: tracing.nats_attributes(
                msg.subject,
                "process",
                **{
                    tracing.MESSAGING_DESTINATION_TEMPLATE: stats.subject,
                    tracing.MESSAGING_CONSUMER_GROUP: stats.queue_group,
                    tracing.MESSAGING_BODY_SIZE: len(msg.data),
                },
            ),
        ) as span:
            await self._serve_in_span(msg, handler, stats, span)

    async def _serve_in_span(
        self, msg: Msg, handler: Handler, stats: EndpointStats, span: Span
    ) -> None:
        started = time.perf_counter_ns()
        self._stats.total_requests += 1
        self._pending_calls += 1
        try:
            if self._pending_calls > self._max_pending_calls:
                raise Overloaded(
                    f"executor holds {self._max_pending_calls} calls already; retry later",
                    retry_after_s=_OVERLOADED_RETRY_AFTER_S,
                )
            self._check_auth(msg)
            body = await handler(msg)
        except ServiceError as error:
            tracing.mark_error(span, error.kind, error.message)
            await self._fail(msg, stats, started, error)
        except asyncio.CancelledError:
            tracing.mark_error(span, "cancelled")
            await self._fail(msg, stats, started, _stopping())
            raise
        except Exception as exc:
            tracing.mark_error(span, type(exc).__qualname__)
            log.exception("request failed", subject=msg.subject)
            internal = InternalError("internal error in the executor (logged)")
            await self._fail(msg, stats, started, internal)
        else:
            await self._reply(msg, stats, started, body)
        finally:
            self._pending_calls -= 1

    async def _reply(self, msg: Msg, stats: EndpointStats, started: int, body: bytes) -> None:
        try:
            await reply_json(self._nc, msg, body)
        except MaxPayloadError:
            # Workers keep results under max_payload; a reply that is not is a bug: say so.
            log.error("reply too large for one message", subject=msg.subject, size=len(body))
            error = InternalError(f"the reply ({len(body)} bytes) is larger than max_payload")
            await self._fail(msg, stats, started, error)
        except Exception as exc:  # the client went away: nothing to tell
            log.debug("reply not sent", error=str(exc))
        else:
            stats.record(started)

    async def _fail(
        self, msg: Msg, stats: EndpointStats, started: int, error: ServiceError
    ) -> None:
        self._stats.refused(stats.name, started, error)
        stats.record(started, str(error))
        log.info("request refused", subject=msg.subject, code=int(error.code), reason=error.message)
        await _quietly(reply_error(self._nc, msg, error))

    def _check_auth(self, msg: Msg) -> None:
        if not self._token:
            return
        headers = {key.lower(): value for key, value in (msg.headers or {}).items()}
        value = headers.get(AUTHORIZATION_HEADER.lower())
        if not value:
            raise Unauthorized("Missing Authorization header")
        scheme, _, given = value.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("Invalid Authorization header (expected 'Bearer <token>')")
        if not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise Forbidden("Invalid token")


async def _drain(sub: Subscription) -> None:
    """``sub.drain()``; when it fails (the connection dropped during its round trip), the
    subscription is taken out of the connection by hand: nats-py keeps it in its table, and its
    next reconnect would subscribe it again, routing calls to an executor that has stopped."""
    try:
        await sub.drain()  # type: ignore[no-untyped-call]
    except Exception as exc:
        log.warning("drain failed: unsubscribing", subject=sub.subject, error=repr(exc))
        sub._conn._remove_sub(sub._id)
        await _quietly(sub._conn._send_unsubscribe(sub._id))
        # What it had queued is taken (each gets a task, which answers), then its reader ends:
        # out of the table, the connection's close would not end it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sub._pending_queue.join(), _QUEUED_TAKE_S)
        sub._stop_processing()


async def _quietly(awaitable: Awaitable[Any]) -> None:
    """Best effort: a reply to a client that went away is not an error of ours."""
    try:
        await awaitable
    except Exception as exc:
        log.debug("best-effort operation failed", error=str(exc))
