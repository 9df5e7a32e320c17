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
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.nuid import NUID
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from observability import tracing
from observability.metrics import ToolbusMetrics
from schemas.artifacts import ARTIFACT_OPERATIONS
from schemas.errors import ErrorKind
from schemas.internal import (
    AcquireReply,
    AcquireRequest,
    BatchItem,
    ItemResult,
    Lease,
    RejectReason,
    WorkerReleaseReply,
    WorkerReleaseRequest,
)
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
from ._batcher import WorkerLink, WorkerUnavailable
from ._discovery import EndpointStats, ServiceDiscovery
from ._external import ExternalTools
from ._kv import open_bucket
from ._leases import LeaseTable
from ._rates import RateWindow
from ._registry import WorkerRegistry
from ._replies import parse_request, reply_error, reply_json
from ._requests import nats_request
from .exceptions import (
    BadRequest,
    Forbidden,
    InternalError,
    NoCapacity,
    NotFound,
    Overloaded,
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

DEFAULT_RESULT_GRACE_S = 10.0  # beyond a call's own timeout, for spawn, transfer and clean-up
DEFAULT_DRAIN_TIMEOUT_S = 10.0
_WORKER_REQUEST_TIMEOUT_S = 5.0
_MAX_DISPATCH_ATTEMPTS = 3
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


def _workspace_lost(lease: Lease, uniq_id: str | None, *, expired: bool = False) -> ToolResult:
    if expired:
        return _infra_failure(
            "This trajectory's slot was released after slot_idle_timeout_s without a call, and "
            "its workspace wiped; the next call starts in a new one",
            uniq_id=uniq_id,
            worker_id=lease.worker_id,
            workspace_lost=True,
            expired=True,
        )
    return _infra_failure(
        f"The sandbox worker {lease.worker_id} holding this trajectory's workspace is gone; "
        "the workspace is lost and the next call starts in a new one",
        uniq_id=uniq_id,
        worker_id=lease.worker_id,
        workspace_lost=True,
    )


class _WorkspaceLost(Exception):
    def __init__(self, lease: Lease) -> None:
        super().__init__(lease.worker_id)
        self.lease = lease


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
        self._results: dict[str, asyncio.Future[ItemResult]] = {}
        self._links: dict[str, WorkerLink] = {}
        self._acquiring: dict[str, asyncio.Task[Lease]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriptions: list[Subscription] = []
        self._results_sub: Subscription | None = None
        self._registry: WorkerRegistry | None = None
        self._leases: LeaseTable | None = None
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
        workers = await open_bucket(js, WORKERS_BUCKET, description="toolbus sandbox workers")
        leases = await open_bucket(js, LEASES_BUCKET, description="toolbus trajectory leases")
        self._registry = WorkerRegistry(workers)
        await self._registry.start()
        self._leases = LeaseTable(leases)
        self._results_sub = await self._nc.subscribe(self._results_subject, cb=self._on_result)
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
        for link in self._links.values():
            await link.close()
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
            await _quietly(reply_json(self._nc, msg, body))
            stats.record(started)
        finally:
            self._pending_calls -= 1

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
        assert self._leases is not None
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(
            trajectory_id=request.trajectory_id, tool=name, uniq_id=request.tool.uniq_id
        ):
            with self._in_flight():
                result = await self._external.call(
                    request,
                    timeout_s=self._config.clamp_timeout(requested),
                    lease=self._leases.cached(request.trajectory_id),
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
        stale: Lease | None = None
        for _ in range(_MAX_DISPATCH_ATTEMPTS):
            try:
                if acquire:
                    lease = await self._lease(trajectory_id, stale=stale)
                else:
                    lease = await self._existing_lease(trajectory_id, stale=stale)
            except _WorkspaceLost as lost:
                return _workspace_lost(lost.lease, uniq_id)
            item = BatchItem(
                item_id=self._nuid.next().decode(),
                trajectory_id=trajectory_id,
                tool=tool,
                arguments=arguments,
                timeout_s=timeout_s,
                uniq_id=uniq_id,
                allow_network=allow_network,
                trace_context=tracing.current_trace_headers(),
                created_at=time.time(),
            )
            result_future: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
            self._results[item.item_id] = result_future
            try:
                try:
                    rejected = await self._link(lease.worker_id).submit(item)
                except WorkerUnavailable:
                    rejected = RejectReason.STOPPING
                if rejected is RejectReason.NO_SLOT:
                    stale = lease  # released meanwhile, or a stale lease: look again
                    continue
                if rejected is RejectReason.EXPIRED:
                    await self._forget_lease(trajectory_id, lease)
                    return _workspace_lost(lease, uniq_id, expired=True)
                if rejected is not None:
                    await self._drop_lost_worker(trajectory_id, lease)
                    return _workspace_lost(lease, uniq_id)
                try:
                    result = await asyncio.wait_for(
                        result_future, timeout_s + self._config.result_grace_s
                    )
                except TimeoutError:
                    return _infra_failure(
                        f"No result from sandbox worker {lease.worker_id} within "
                        f"{timeout_s + self._config.result_grace_s:g}s",
                        uniq_id=uniq_id,
                        worker_id=lease.worker_id,
                    )
                return result
            finally:
                self._results.pop(item.item_id, None)
        raise NoCapacity(
            f"could not place the call: the slot of trajectory {trajectory_id!r} kept moving",
            kind=ErrorKind.WORKER_UNAVAILABLE,
        )

    def _link(self, worker_id: str) -> WorkerLink:
        link = self._links.get(worker_id)
        if link is None:
            self._drop_idle_links_of_gone_workers()
            link = self._links[worker_id] = WorkerLink(
                self._nc,
                on_batch=functools.partial(self._metrics.batch_sent, worker_id=worker_id),
                subject=self._subjects.worker_batch(worker_id),
                reply_to=self._results_subject,
                window_s=self._config.batch_window_ms / 1000,
                max_items=self._config.max_batch_size,
                max_bytes=self._config.max_batch_bytes,
            )
        return link

    def _drop_idle_links_of_gone_workers(self) -> None:
        """Forget links to workers no longer registered (workers come and go over a long run),
        once nothing is queued or in flight on them. Runs when a new worker's link is made."""
        assert self._registry is not None
        for worker_id, link in list(self._links.items()):
            if link.idle and not self._registry.is_alive(worker_id):
                del self._links[worker_id]

    async def _on_result(self, msg: Msg) -> None:
        try:
            item = ItemResult.model_validate_json(msg.data)
        except ValueError:
            log.warning("ignoring malformed result message", size=len(msg.data))
            return
        future = self._results.get(item.item_id)
        if future is not None and not future.done():
            future.set_result(item)

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

    # -- leases -------------------------------------------------------------------------------
    async def _existing_lease(self, trajectory_id: str, *, stale: Lease | None) -> Lease:
        """The trajectory's lease, if it has a live one; NotFound otherwise."""
        assert self._registry is not None and self._leases is not None
        cached = self._leases.cached(trajectory_id)
        if cached is not None and cached != stale and self._registry.is_alive(cached.worker_id):
            return cached
        stored = await self._leases.get(trajectory_id)
        lease = stored[0] if stored is not None else None
        if lease is not None and lease != stale and self._registry.is_alive(lease.worker_id):
            return lease
        raise NotFound(f"No active slot for trajectory {trajectory_id!r}")

    async def _lease(self, trajectory_id: str, *, stale: Lease | None = None) -> Lease:
        """The trajectory's lease: cached, stored, or newly acquired (one acquire at a time)."""
        assert self._registry is not None and self._leases is not None
        cached = self._leases.cached(trajectory_id)
        if cached is not None and cached != stale and self._registry.is_alive(cached.worker_id):
            return cached
        acquiring = self._acquiring.get(trajectory_id)
        if acquiring is None:
            # A task of its own: concurrent calls of one trajectory share it, and a caller
            # that gives up does not cancel the others' acquisition.
            acquiring = asyncio.create_task(self._resolve_or_acquire(trajectory_id, stale))
            self._acquiring[trajectory_id] = acquiring
            acquiring.add_done_callback(lambda task: self._acquired(trajectory_id, task))
        return await asyncio.shield(acquiring)

    def _acquired(self, trajectory_id: str, task: asyncio.Task[Lease]) -> None:
        if self._acquiring.get(trajectory_id) is task:
            del self._acquiring[trajectory_id]
        if not task.cancelled():
            task.exception()  # retrieved here; the callers awaiting it re-raise it

    async def _resolve_or_acquire(self, trajectory_id: str, stale: Lease | None) -> Lease:
        assert self._registry is not None and self._leases is not None
        stored = await self._leases.get(trajectory_id)
        if stored is not None:
            lease, revision = stored
            if lease != stale and self._registry.is_alive(lease.worker_id):
                return lease
            log.warning("dropping stale lease", worker_id=lease.worker_id, slot=lease.slot)
            await self._leases.delete(trajectory_id, revision=revision)
            if lease != stale:
                # Its worker is gone and the workspace with it: say so once, rather than
                # carry on silently in an empty workspace.
                raise _WorkspaceLost(lease)
        return await self._acquire(trajectory_id)

    async def _acquire(self, trajectory_id: str) -> Lease:
        with tracing.span("acquire slot") as span:
            lease = await self._acquire_in_span(trajectory_id)
            span.set_attributes({"toolbus.worker_id": lease.worker_id, "toolbus.slot": lease.slot})
            return lease

    async def _acquire_in_span(self, trajectory_id: str) -> Lease:
        assert self._registry is not None and self._leases is not None
        deadline = time.monotonic() + self._config.acquire_timeout_s
        request = AcquireRequest(trajectory_id=trajectory_id).model_dump_json().encode()
        while True:
            for worker_id in self._registry.candidates():
                # Count the slot as taken before asking, so that concurrent new trajectories
                # spread over the workers instead of all asking the one that looked emptiest.
                self._registry.note_acquired(worker_id)
                try:
                    msg = await nats_request(
                        self._nc,
                        self._subjects.worker_acquire(worker_id),
                        request,
                        timeout=_WORKER_REQUEST_TIMEOUT_S,
                    )
                except (NoRespondersError, NatsTimeoutError):
                    self._registry.note_gone(worker_id)
                    continue
                reply = AcquireReply.model_validate_json(msg.data)
                if reply.slot is None:
                    self._registry.note_full(worker_id)
                    continue
                lease = Lease(worker_id=worker_id, slot=reply.slot, acquired_at=time.time())
                if await self._leases.create(trajectory_id, lease):
                    log.info("slot leased", worker_id=worker_id, slot=reply.slot)
                    return lease
                # Another executor leased this trajectory first: use its lease, give ours back.
                stored = await self._leases.get(trajectory_id)
                if stored is None:
                    continue
                winner = stored[0]
                if winner.worker_id != worker_id:
                    await self._release_on_worker(worker_id, trajectory_id, reset_workspace=True)
                return winner
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                alive = self._registry.alive()
                raise NoCapacity(
                    f"no free slot within {self._config.acquire_timeout_s:g}s "
                    f"({len(alive)} workers, {sum(w.slots_total for w, _ in alive)} slots, "
                    "all in use); release finished trajectories or add workers"
                )
            await self._registry.wait_for_capacity(min(remaining, 0.5))

    async def _drop_lost_worker(self, trajectory_id: str, lease: Lease) -> None:
        assert self._registry is not None
        self._registry.note_gone(lease.worker_id)
        await self._forget_lease(trajectory_id, lease)

    async def _forget_lease(self, trajectory_id: str, lease: Lease) -> None:
        """Delete the trajectory's stored lease if it is still this one."""
        assert self._leases is not None
        stored = await self._leases.get(trajectory_id)
        if stored is not None and stored[0] == lease:
            await self._leases.delete(trajectory_id, revision=stored[1])
        self._leases.forget(trajectory_id)

    async def _release_on_worker(
        self, worker_id: str, trajectory_id: str, *, reset_workspace: bool
    ) -> WorkerReleaseReply | None:
        assert self._registry is not None
        request = WorkerReleaseRequest(trajectory_id=trajectory_id, reset_workspace=reset_workspace)
        try:
            msg = await nats_request(
                self._nc,
                self._subjects.worker_release(worker_id),
                request.model_dump_json().encode(),
                timeout=_WORKER_REQUEST_TIMEOUT_S + 30,  # a wipe of a big workspace takes time
            )
        except (NoRespondersError, NatsTimeoutError):
            log.warning("worker did not answer a release", worker_id=worker_id)
            return None
        reply = WorkerReleaseReply.model_validate_json(msg.data)
        if reply.released:
            self._registry.note_released(worker_id)
        return reply

    # -- tools.release ------------------------------------------------------------------------
    async def _release(self, msg: Msg) -> bytes:
        assert self._leases is not None
        request = parse_request(ReleaseRequest, msg.data, max_bytes=self._config.max_request_bytes)
        trajectory_id = request.trajectory_id
        with structlog.contextvars.bound_contextvars(trajectory_id=trajectory_id, tool="release"):
            stored = await self._leases.get(trajectory_id)
            if stored is None:
                raise NotFound(f"No active slot for trajectory {trajectory_id!r}")
            lease, revision = stored
            # Lease first: a call that races the release gets a fresh slot, not a dying one.
            await self._leases.delete(trajectory_id, revision=revision)
            await self._release_on_worker(
                lease.worker_id, trajectory_id, reset_workspace=request.reset_workspace
            )
            log.info("trajectory released", worker_id=lease.worker_id, slot=lease.slot)
        return ReleaseReply(worker_id=lease.worker_id, slot=lease.slot).model_dump_json().encode()

    # -- tools.status / tools.list ------------------------------------------------------------
    def _slots_in_use_and_free(self) -> tuple[int, int]:
        if self._registry is None:
            return 0, 0
        alive = self._registry.alive()
        free = sum(info.slots_free for info, _ in alive)
        return sum(info.slots_total for info, _ in alive) - free, free

    def status(self) -> StatusReply:
        assert self._registry is not None
        alive = self._registry.alive()
        total = sum(info.slots_total for info, _ in alive)
        free = sum(info.slots_free for info, _ in alive)
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
                acquired_slots=total - free,
                containers=len(alive),
                slots_by_state={"free": free, "acquired": total - free},
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


def _error_kind(result: ToolResult) -> str:
    return str(result.metadata.get("error_kind") or "tool")


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


async def _quietly(awaitable: Awaitable[Any]) -> None:
    """Best effort: a reply to a client that went away is not an error of ours."""
    try:
        await awaitable
    except Exception as exc:
        log.debug("best-effort operation failed", error=str(exc))
