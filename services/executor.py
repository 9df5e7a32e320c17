"""The executor service: validates calls, keeps trajectory leases, batches calls to workers.

It listens on ``tools.execute.*``, ``tools.artifacts.*``, ``tools.release``, ``tools.status``
and ``tools.list`` in queue group ``toolbus`` (so executors share the load) and answers
``$SRV.*`` discovery. Each request is handled in its own task: a slow call never blocks another.

Lifecycle (``async with ExecutorService(...)``): enter binds the KV buckets, watches workers and
subscribes; exit stops accepting (unsubscribe), waits for calls in flight up to
``drain_timeout_s``, then cancels the rest with a 503 reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError
from nats.nuid import NUID
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from observability import tracing
from observability.metrics import ToolbusMetrics
from schemas.artifacts import ARTIFACT_OPERATIONS
from schemas.errors import ErrorKind
from schemas.internal import BatchItem, ItemResult, Lease, LostReason, RejectReason, WorkerInfo
from schemas.messages import (
    CallRates,
    ErrorKindOfResult,
    ExecuteRequest,
    PoolStatus,
    ReleaseReply,
    ReleaseRequest,
    StatusReply,
    ToolListReply,
    ToolResult,
    WorkerStatus,
)
from schemas.subjects import (
    AUTHORIZATION_HEADER,
    LEASES_BUCKET,
    QUEUE_GROUP,
    SERVICE_NAME,
    WORKERS_BUCKET,
    Subjects,
)
from schemas.tools import BUILTIN_TOOLS, TOOL_ALIASES, canonical_tool_name

from . import __version__
from ._batcher import WorkerLink
from ._discovery import EndpointStats, ServiceDiscovery
from ._dispatch import DEFAULT_RESULT_GRACE_S, CallRejected, Dispatcher, WorkerGone
from ._external import ExternalTools
from ._kv import KvBucket, open_bucket
from ._leases import LeaseStore
from ._placement import Placement, WorkspaceLost
from ._process import MAX_COMMAND_BYTES
from ._rates import RateWindow
from ._registration import WORKER_MARKER_TTL_S
from ._registry import WorkerRegistry
from ._replies import parse_request, reply_error, reply_json
from ._worker_config import DEFAULT_RELEASE_WAIT_S
from .exceptions import (
    BadRequest,
    Forbidden,
    InternalError,
    NoCapacity,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
)
from .settings import (
    DEFAULT_ACQUIRE_TIMEOUT_S,
    DEFAULT_ARTIFACT_TIMEOUT_S,
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_PENDING_CALLS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_TIMEOUT_S,
    MAX_TIMEOUT_S,
    MIN_TIMEOUT_S,
    Settings,
)

log = structlog.get_logger("toolbus.executor")

DEFAULT_DRAIN_TIMEOUT_S = 10.0
_MAX_DISPATCH_ATTEMPTS = 4
_UNDELIVERED_RETRY_S = (0.05, 0.2, 0.5)  # a batch that reached no worker: wait, then try again
_CALL_ENDPOINTS = ("execute", "artifacts")  # what the call rates count (not status, list, ...)

Handler = Callable[[Msg], Awaitable[bytes]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorConfig:
    subjects: Subjects = Subjects()
    token: str | None = None
    acquire_timeout_s: float = DEFAULT_ACQUIRE_TIMEOUT_S
    batch_window_ms: int = DEFAULT_BATCH_WINDOW_MS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    default_timeout_s: float = DEFAULT_TIMEOUT_S
    max_timeout_s: float = MAX_TIMEOUT_S
    artifact_timeout_s: float = DEFAULT_ARTIFACT_TIMEOUT_S
    tool_server_url: str | None = None
    tool_server_token: str | None = None
    result_grace_s: float = DEFAULT_RESULT_GRACE_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    worker_release_wait_s: float = DEFAULT_RELEASE_WAIT_S

    def clamp_timeout(self, requested: float | None) -> float:
        value = self.default_timeout_s if requested is None else requested
        return min(max(value, MIN_TIMEOUT_S), self.max_timeout_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> ExecutorConfig:
        return cls(
            subjects=Subjects(prefix=settings.prefix),
            token=settings.token,
            acquire_timeout_s=settings.acquire_timeout_s,
            batch_window_ms=settings.batch_window_ms,
            max_batch_size=settings.max_batch_size,
            max_batch_bytes=settings.max_batch_bytes,
            max_pending_calls=settings.max_pending_calls,
            max_request_bytes=settings.max_request_bytes,
            default_timeout_s=settings.default_timeout_s,
            max_timeout_s=settings.max_timeout_s,
            artifact_timeout_s=settings.artifact_timeout_s,
            tool_server_url=settings.tool_server_url,
            tool_server_token=settings.tool_server_token,
        )


def _infra_failure(message: str, *, uniq_id: str | None = None, **metadata: Any) -> ToolResult:
    return ToolResult(
        success=False,
        error=message,
        metadata={"error_kind": str(ErrorKindOfResult.INFRA), **metadata},
        uniq_id=uniq_id,
    )


_LOST_BECAUSE = {
    LostReason.EXPIRED: "was released after slot_idle_timeout_s without a call, and its "
    "workspace wiped",
    LostReason.WORKER_STOPPED: "is on a sandbox worker that stopped",
    LostReason.WORKER_EXPIRED: "was given up by a sandbox worker that lost its registration",
    LostReason.WORKER_GONE: "is on a sandbox worker that is gone",
    LostReason.UNREADABLE: "cannot be found (its lease is unreadable)",
}


def _workspace_lost(lease: Lease, uniq_id: str | None) -> ToolResult:
    reason = lease.lost or LostReason.WORKER_GONE
    metadata: dict[str, Any] = {"worker_id": lease.worker_id, "workspace_lost": True}
    if reason is LostReason.EXPIRED:
        metadata["expired"] = True
    return _infra_failure(
        f"This trajectory's slot {_LOST_BECAUSE[reason]}; the workspace is lost and the next "
        "call starts in a new one",
        uniq_id=uniq_id,
        lost_reason=str(reason),
        **metadata,
    )


class ExecutorService:
    def __init__(
        self,
        nc: Client,
        config: ExecutorConfig | None = None,
        *,
        metrics: ToolbusMetrics | None = None,
    ) -> None:
        self._nc = nc
        self._config = config or ExecutorConfig()
        # The global meter provider's instruments: no-ops unless metrics are configured.
        self._metrics = metrics or ToolbusMetrics()
        self._unobserve: list[Callable[[], None]] = []
        self._call_rate = RateWindow()
        self._external = ExternalTools(
            nc,
            subject_prefix=self._config.subjects.external_prefix,
            server_url=self._config.tool_server_url,
            server_token=self._config.tool_server_token,
        )
        self._error_rate = RateWindow()
        self._subjects = self._config.subjects
        self._nuid = NUID()
        self.executor_id = self._nuid.next().decode()
        self._results_subject = self._subjects.executor_results(self.executor_id)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriptions: list[Subscription] = []
        self._results_sub: Subscription | None = None
        self._registry: WorkerRegistry | None = None
        self._placement: Placement | None = None
        self._dispatcher: Dispatcher | None = None
        self._tool_list = (
            ToolListReply(
                tools=[tool.spec() for tool in BUILTIN_TOOLS.values()], aliases=TOOL_ALIASES
            )
            .model_dump_json()
            .encode()
        )
        s = self._subjects
        self._endpoints = {
            "execute": EndpointStats("execute", s.execute_wildcard, QUEUE_GROUP),
            "artifacts": EndpointStats("artifacts", s.artifacts_wildcard, QUEUE_GROUP),
            "release": EndpointStats("release", s.release, QUEUE_GROUP),
            "status": EndpointStats("status", s.status, QUEUE_GROUP),
            "list": EndpointStats("list", s.list_tools, QUEUE_GROUP),
        }
        self._discovery = ServiceDiscovery(
            nc,
            name=SERVICE_NAME,
            instance_id=self.executor_id,
            version=__version__,
            description="Runs LLM agents' tool calls in sandboxes",
            endpoints=list(self._endpoints.values()),
        )
        self.total_requests = 0
        self.total_errors = 0
        self._pending_calls = 0
        self.calls_in_flight = 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> ExecutorService:
        js = self._nc.jetstream()
        workers = await open_bucket(
            js,
            WORKERS_BUCKET,
            description="toolbus sandbox workers",
            marker_ttl_s=WORKER_MARKER_TTL_S,
        )
        await open_bucket(js, LEASES_BUCKET, description="toolbus trajectory leases")
        self._registry = WorkerRegistry(workers, KvBucket(js, WORKERS_BUCKET))
        await self._registry.start()
        self._placement = Placement(
            self._nc,
            self._registry,
            LeaseStore(KvBucket(js, LEASES_BUCKET)),
            subjects=self._subjects,
            acquire_timeout_s=self._config.acquire_timeout_s,
            release_wait_s=self._config.worker_release_wait_s,
        )
        self._dispatcher = Dispatcher(
            self._nc,
            self._registry,
            subjects=self._subjects,
            results_subject=self._results_subject,
            make_link=self._make_link,
            result_grace_s=self._config.result_grace_s,
        )
        self._results_sub = await self._nc.subscribe(
            self._results_subject, cb=self._dispatcher.on_result
        )
        s = self._subjects
        for subject, name, handler in (
            (s.execute_wildcard, "execute", self._execute),
            (s.artifacts_wildcard, "artifacts", self._artifacts),
            (s.release, "release", self._release),
            (s.status, "status", self._status),
            (s.list_tools, "list", self._list_tools),
        ):
            callback = self._request_callback(handler, self._endpoints[name])
            self._subscriptions.append(
                await self._nc.subscribe(subject, queue=QUEUE_GROUP, cb=callback)
            )
        await self._discovery.start()
        self._unobserve = [
            self._metrics.observe_slots(self._slots_in_use_and_free),
            self._metrics.observe_queue_depth(lambda: self.calls_in_flight),
        ]
        await self._nc.flush()
        log.info("executor started", executor_id=self.executor_id, prefix=s.prefix)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # 1. stop accepting: the queue group sends new requests to other executors. Drain, not
        #    unsubscribe: requests the server routed here before it saw that are still served.
        await asyncio.gather(*(_quietly(sub.drain()) for sub in self._subscriptions))  # type: ignore[no-untyped-call]
        self._subscriptions.clear()
        await _quietly(self._discovery.stop())
        # 2. wait for calls in flight, 3. cancel the rest (each replies 503).
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self._config.drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._placement is not None:
            await self._placement.close()
        if self._dispatcher is not None:
            await self._dispatcher.close()
        if self._results_sub is not None:
            await _quietly(self._results_sub.unsubscribe())
        if self._registry is not None:
            await self._registry.stop()
        for unobserve in self._unobserve:
            unobserve()
        log.info("executor stopped", executor_id=self.executor_id)

    # -- request plumbing ---------------------------------------------------------------------
    def _request_callback(
        self, handler: Handler, stats: EndpointStats
    ) -> Callable[[Msg], Awaitable[None]]:
        async def on_request(msg: Msg) -> None:
            # nats-py runs one callback at a time per subscription: hand off at once.
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
        self.total_requests += 1
        self._pending_calls += 1
        try:
            if self._pending_calls > self._config.max_pending_calls:
                raise Overloaded(
                    f"executor holds {self._config.max_pending_calls} calls already; retry later"
                )
            self._check_auth(msg)
            body = await handler(msg)
        except ServiceError as error:
            tracing.mark_error(span, error.kind, error.message)
            await self._fail(msg, stats, started, error)
        except asyncio.CancelledError:
            tracing.mark_error(span, "cancelled")
            await self._fail(
                msg,
                stats,
                started,
                NoCapacity("the executor is shutting down; retry", kind=ErrorKind.NO_CAPACITY),
            )
            raise
        except Exception as exc:
            tracing.mark_error(span, type(exc).__qualname__)
            log.exception("request failed", subject=msg.subject)
            await self._fail(
                msg, stats, started, InternalError("internal error in the executor (logged)")
            )
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
        self.total_errors += 1
        if stats.name in _CALL_ENDPOINTS:  # a refused call still counts in the call rates
            self._call_rate.add()
            self._error_rate.add()
        self._metrics.call_finished(
            tool=stats.name,
            status="refused",
            total_s=(time.perf_counter_ns() - started) / 1e9,
            error_type=error.kind,
        )
        stats.record(started, str(error))
        log.info("request refused", subject=msg.subject, code=int(error.code), reason=error.message)
        await _quietly(reply_error(self._nc, msg, error))

    def _check_auth(self, msg: Msg) -> None:
        token = self._config.token
        if not token:
            return
        headers = {key.lower(): value for key, value in (msg.headers or {}).items()}
        value = headers.get(AUTHORIZATION_HEADER.lower())
        if not value:
            raise Unauthorized("Missing Authorization header")
        scheme, _, given = value.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("Invalid Authorization header (expected 'Bearer <token>')")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Forbidden("Invalid token")

    # -- tools.execute.* ----------------------------------------------------------------------
    async def _execute(self, msg: Msg) -> bytes:
        request = parse_request(ExecuteRequest, msg.data, max_bytes=self._config.max_request_bytes)
        tokens = msg.subject.split(".")
        subject_tool = tokens[self._subjects.execute_token_index]
        if request.tool.name != subject_tool:
            raise BadRequest(
                f"tool.name {request.tool.name!r} does not match the subject's tool "
                f"{subject_tool!r}"
            )
        tool = canonical_tool_name(request.tool.name)
        if tool is None:
            return await self._execute_external(request)
        _annotate_span(request.trajectory_id, tool)
        _check_runnable(tool, request.tool.arguments)
        requested = request.timeout_s
        if requested is None:
            requested = _number(request.tool.arguments.get("timeout"))
        with structlog.contextvars.bound_contextvars(
            trajectory_id=request.trajectory_id, tool=tool, uniq_id=request.tool.uniq_id
        ):
            result = await self.execute(
                request.trajectory_id,
                tool,
                request.tool.arguments,
                timeout_s=self._config.clamp_timeout(requested),
                uniq_id=request.tool.uniq_id,
                allow_network=request.allow_network is not False,
            )
            log.debug("call answered", success=result.success)
        return result.model_dump_json().encode()

    async def _execute_external(self, request: ExecuteRequest) -> bytes:
        """A tool toolbus does not have: whoever provides it (see _external.py), else 404."""
        name = request.tool.name
        _annotate_span(request.trajectory_id, name)
        requested = request.timeout_s or _number(request.tool.arguments.get("timeout"))
        assert self._placement is not None
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(
            trajectory_id=request.trajectory_id, tool=name, uniq_id=request.tool.uniq_id
        ):
            with self._in_flight():
                result = await self._external.call(
                    request,
                    timeout_s=self._config.clamp_timeout(requested),
                    lease=self._placement.cached(request.trajectory_id),
                )
            if result is None:
                raise NotFound(f"Unknown tool: {name}", kind=ErrorKind.UNKNOWN_TOOL)
            log.debug("external call answered", success=result.success)
        # The metric's tool is not the name: callers choose it, and metric series must be few.
        self._call_finished("external", started, result.success, result.error, _error_kind(result))
        return result.model_dump_json().encode()

    async def execute(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any],
        *,
        timeout_s: float,
        uniq_id: str | None,
        allow_network: bool = True,
    ) -> ToolResult:
        """Run one call of a built-in tool in the trajectory's slot."""
        started = time.perf_counter()
        with self._in_flight():
            done = await self._dispatch(
                trajectory_id, tool, arguments, timeout_s, uniq_id, allow_network
            )
        if isinstance(done, ToolResult):
            result = done
        else:
            result = done.result or _infra_failure("The worker's result was empty", uniq_id=uniq_id)
        self._call_finished(
            tool,
            started,
            result.success,
            result.error,
            _error_kind(result),
            status=result.metadata.get("status"),
            done=done,
        )
        return result

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        self.calls_in_flight += 1
        try:
            yield
        finally:
            self.calls_in_flight -= 1

    def _call_finished(
        self,
        tool: str,
        started: float,
        succeeded: bool,
        error: str | None,
        error_kind: str,
        *,
        status: str | None = None,
        done: ItemResult | ToolResult | None = None,
    ) -> None:
        """Count a finished call (rates, metrics) and mark the request's span when it failed."""
        self._call_rate.add()
        if not succeeded:
            self._error_rate.add()
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

    async def _dispatch(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any],
        timeout_s: float,
        uniq_id: str | None,
        allow_network: bool = True,
        *,
        acquire: bool = True,
    ) -> ItemResult | ToolResult:
        """The worker's answer, or an infra failure result when there was none.

        ``acquire=False``: a trajectory without a slot gets NotFound instead of a new slot.
        """
        assert self._placement is not None and self._dispatcher is not None
        rejected: tuple[Lease, RejectReason | None] | None = None
        undelivered = iter(_UNDELIVERED_RETRY_S)
        for _ in range(_MAX_DISPATCH_ATTEMPTS + len(_UNDELIVERED_RETRY_S)):
            try:
                lease = await self._placement.lease(
                    trajectory_id, acquire=acquire, rejected=rejected
                )
            except WorkspaceLost as lost:
                return _workspace_lost(lost.lease, uniq_id)
            item = BatchItem(
                item_id=self._nuid.next().decode(),
                trajectory_id=trajectory_id,
                epoch=lease.epoch,
                tool=tool,
                arguments=arguments,
                timeout_s=timeout_s,
                uniq_id=uniq_id,
                allow_network=allow_network,
                trace_context=tracing.current_trace_headers(),
                created_at=time.time(),
            )
            try:
                return await self._dispatcher.run(lease, item)
            except CallRejected as rejection:
                if rejection.reason is RejectReason.UNREADABLE:
                    return _infra_failure(
                        "The sandbox worker could not read this call (logged); it did not run",
                        uniq_id=uniq_id,
                    )
                if rejection.reason is None:  # reached no worker: it may be restarting
                    await asyncio.sleep(next(undelivered, 1.0))
                rejected = (lease, rejection.reason)
            except WorkerGone:
                await self._placement.forget_lost(trajectory_id, lease)
                gone = lease.model_copy(update={"lost": LostReason.WORKER_GONE})
                return _workspace_lost(gone, uniq_id)
        raise NoCapacity(
            f"could not place the call: the slot of trajectory {trajectory_id!r} kept moving",
            kind=ErrorKind.WORKER_UNAVAILABLE,
        )

    def _make_link(self, worker_id: str) -> WorkerLink:
        return WorkerLink(
            self._nc,
            on_batch=functools.partial(self._metrics.batch_sent, worker_id=worker_id),
            subject=self._subjects.worker_batch(worker_id),
            reply_to=self._results_subject,
            window_s=self._config.batch_window_ms / 1000,
            max_items=self._config.max_batch_size,
            max_bytes=self._config.max_batch_bytes,
        )

    # -- tools.artifacts.* --------------------------------------------------------------------
    async def _artifacts(self, msg: Msg) -> bytes:
        operation = msg.subject.rsplit(".", 1)[-1]
        models = ARTIFACT_OPERATIONS.get(operation)
        if models is None:
            raise NotFound(
                f"Unknown artifact operation: {operation} "
                f"(one of {', '.join(ARTIFACT_OPERATIONS)})",
                kind=ErrorKind.UNKNOWN_TOOL,
            )
        request_model, reply_model = models
        request = parse_request(request_model, msg.data, max_bytes=self._config.max_request_bytes)
        fields = request.model_dump()
        trajectory_id: str = fields.pop("trajectory_id")
        requested = fields.pop("timeout_s")
        timeout_s = min(max(requested or self._config.artifact_timeout_s, MIN_TIMEOUT_S), 3600.0)
        tool = f"artifacts.{operation}"
        _annotate_span(trajectory_id, tool)
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(trajectory_id=trajectory_id, tool=tool):
            # Only an upload may give a trajectory its first slot; the others need its files.
            with self._in_flight():
                done = await self._dispatch(
                    trajectory_id, tool, fields, timeout_s, None, acquire=operation == "upload"
                )
            if isinstance(done, ItemResult) and done.reply is not None:
                body = done.reply
            else:  # no answer from the worker: an infra failure, in this operation's shape
                failure = done if isinstance(done, ToolResult) else done.result
                error = failure.error if failure is not None else None
                body = {"success": False, "error": error or "The worker's reply was empty"}
            log.debug("artifact operation answered", success=body.get("success"))
            error = body.get("error")
            self._call_finished(
                tool,
                started,
                bool(body.get("success")),
                str(error) if error is not None else None,
                "artifact",
                done=done,
            )
        return reply_model.model_validate(body).model_dump_json().encode()

    # -- tools.release ------------------------------------------------------------------------
    async def _release(self, msg: Msg) -> bytes:
        assert self._placement is not None
        request = parse_request(ReleaseRequest, msg.data, max_bytes=self._config.max_request_bytes)
        trajectory_id = request.trajectory_id
        with structlog.contextvars.bound_contextvars(trajectory_id=trajectory_id, tool="release"):
            lease = await self._placement.release(
                trajectory_id, reset_workspace=request.reset_workspace
            )
            log.info("trajectory released", worker_id=lease.worker_id, slot=lease.slot)
        return ReleaseReply(worker_id=lease.worker_id, slot=lease.slot).model_dump_json().encode()

    # -- tools.status / tools.list ------------------------------------------------------------
    def registered_workers(self) -> list[tuple[WorkerInfo, float]]:
        """The workers registered now, and seconds since each was last heard."""
        return self._registry.alive() if self._registry is not None else []

    def _slots_in_use_and_free(self) -> tuple[int, int]:
        alive = self.registered_workers()
        free = sum(info.slots_free for info, _ in alive)
        return sum(info.slots_total for info, _ in alive) - free, free

    def status(self) -> StatusReply:
        alive = self.registered_workers()
        total = sum(info.slots_total for info, _ in alive)
        free = sum(info.slots_free for info, _ in alive)
        broken = sum(info.slots_out_of_service for info, _ in alive)
        return StatusReply(
            executor_id=self.executor_id,
            queue_size=self.calls_in_flight,
            total_requests=self.total_requests,
            total_errors=self.total_errors,
            rates=CallRates(
                calls_per_s_10s=round(self._call_rate.per_second(10), 3),
                calls_per_s_60s=round(self._call_rate.per_second(60), 3),
                errors_per_s_60s=round(self._error_rate.per_second(60), 3),
            ),
            pool=PoolStatus(
                total_slots=total,
                available_slots=free,
                acquired_slots=total - free - broken,
                containers=len(alive),
                slots_by_state={
                    "free": free,
                    "acquired": total - free - broken,
                    "out_of_service": broken,
                },
                started=bool(alive),
            ),
            workers=[
                WorkerStatus(
                    worker_id=info.worker_id,
                    host=info.host,
                    slots_total=info.slots_total,
                    slots_free=info.slots_free,
                    age_s=round(age, 3),
                )
                for info, age in sorted(alive, key=lambda pair: pair[0].worker_id)
            ],
        )

    async def _status(self, msg: Msg) -> bytes:
        return self.status().model_dump_json().encode()

    async def _list_tools(self, msg: Msg) -> bytes:
        return self._tool_list


def _annotate_span(trajectory_id: str, tool: str) -> None:
    """Name the call on the request's span (nothing to build when it does not record)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({"toolbus.trajectory_id": trajectory_id, "toolbus.tool": tool})


def _check_runnable(tool: str, arguments: dict[str, Any]) -> None:
    """413 for a ``terminal`` command longer than exec takes as one argument (``bash -c``):
    too large to run, as a body over max_request_bytes is too large to read."""
    command = arguments.get("command")
    if tool == "terminal" and isinstance(command, str):
        size = len(command.encode("utf-8", "surrogatepass"))
        if size > MAX_COMMAND_BYTES:
            raise PayloadTooLarge(
                f"the command is {size} bytes of UTF-8; a terminal command can be at most "
                f"{MAX_COMMAND_BYTES} bytes (use terminal_stateful, or write a script with "
                "write_file and run it)"
            )


def _error_kind(result: ToolResult) -> str:
    return str(result.metadata.get("error_kind") or "tool")


def _number(value: Any) -> float | None:
    """A positive number, or None (then the default applies, and the tool judges the value)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        try:
            return float(value)
        except OverflowError:  # an integer past float range
            return None
    return None


async def _quietly(awaitable: Awaitable[Any]) -> None:
    """Best effort: a reply to a client that went away is not an error of ours."""
    try:
        await awaitable
    except Exception as exc:
        log.debug("best-effort operation failed", error=str(exc))
