"""The executor service: takes tool calls from clients and gets them run in their trajectory's slot.

The per-call path, top to bottom: a request comes in (``_serving.py``: its own task, span, auth
and limits, and the reply or error reply); it is validated here; the trajectory's slot is found
or acquired (``_placement.py``: the lease in KV, the one truth); the call is batched to that
worker (``_batcher.py``) and waited for (``_dispatch.py``: run deadlines, cancel on give-up);
the worker runs it in the slot (``_slot_calls.py``); the result is the reply.

It listens on ``tools.execute.*``, ``tools.artifacts.*``, ``tools.release``, ``tools.status``
and ``tools.list`` in queue group ``toolbus`` (so executors share the load) and answers
``$SRV.*`` discovery. An executor keeps nothing that another one could not read again: any
number of them can serve any trajectory, and one can stop mid-load.

Lifecycle (``async with ExecutorService(...)``): enter binds the KV buckets, watches workers and
subscribes; exit stops accepting, waits for calls in flight up to ``drain_timeout_s``, cancels
the rest with a 503 reply, then ends its acquisitions and worker links.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID
from opentelemetry import trace

from observability import tracing
from observability.metrics import ToolbusMetrics
from schemas.artifacts import ARTIFACT_OPERATIONS
from schemas.errors import ErrorKind
from schemas.internal import CancelRequest, ItemResult, WorkerInfo
from schemas.messages import (
    ExecuteRequest,
    ReleaseReply,
    ReleaseRequest,
    StatusReply,
    ToolListReply,
    ToolResult,
    WaitingStatus,
)
from schemas.subjects import LEASES_BUCKET, QUEUE_GROUP, SERVICE_NAME, WORKERS_BUCKET
from schemas.tools import BUILTIN_TOOLS, TOOL_ALIASES, canonical_tool_name

from . import __version__
from ._batcher import WorkerLink
from ._calls import CallRouter, ItemIds
from ._discovery import EndpointStats, ServiceDiscovery
from ._dispatch import Dispatcher
from ._executor_config import ExecutorConfig
from ._external import ExternalTools
from ._failures import infra_failure
from ._fair_share import TrajectoryLimits
from ._image_refs import parse_image_name
from ._kv import KvBucket, open_bucket
from ._leases import LeaseStore
from ._placement import Placement
from ._process import MAX_COMMAND_BYTES
from ._reconnects import ReconnectClock
from ._registration import WORKER_MARKER_TTL_S
from ._registry import WorkerRegistry
from ._replies import parse_request
from ._serving import CallStats, Handler, RequestServer
from ._status import pool_status
from ._waiting import SlotQueue
from .exceptions import BadRequest, NotFound, PayloadTooLarge
from .settings import MIN_TIMEOUT_S

__all__ = ["ExecutorConfig", "ExecutorService"]

log = structlog.get_logger("toolbus.executor")

_MAX_ARTIFACT_TIMEOUT_S = 3600.0
_PING_TIMEOUT_S = 2.0  # a worker that does not answer an empty cancel within this is not alive
_EMPTY_CANCEL = CancelRequest(item_ids=[]).model_dump_json().encode()


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
        self._subjects = self._config.subjects
        # The global meter provider's instruments: no-ops unless metrics are configured.
        self._metrics = metrics or ToolbusMetrics()
        self._stats = CallStats(self._metrics)
        self._unobserve: list[Callable[[], None]] = []
        self._external = ExternalTools(
            nc,
            subject_prefix=self._subjects.external_prefix,
            server_url=self._config.tool_server_url,
            server_token=self._config.tool_server_token,
        )
        self.executor_id = NUID().next().decode()
        self._results_subject = self._subjects.executor_results(self.executor_id)
        self._results_sub: Subscription | None = None
        js = nc.jetstream()
        self._connection = ReconnectClock(nc)
        self._registry = WorkerRegistry(
            KvBucket(js, WORKERS_BUCKET), connection=self._connection, ping=self._ping_worker
        )
        self._queue = SlotQueue(nc, subjects=self._subjects, executor_id=self.executor_id)
        self._placement = Placement(
            nc,
            self._registry,
            LeaseStore.on(js),
            subjects=self._subjects,
            queue=self._queue,
            acquire_timeout_s=self._config.acquire_timeout_s,
            release_wait_s=self._config.worker_release_wait_s,
        )
        self._dispatcher = Dispatcher(
            nc,
            self._registry,
            subjects=self._subjects,
            make_link=self._make_link,
            result_grace_s=self._config.result_grace_s,
            abandoned_grace_s=self._config.abandoned_grace_s,
        )
        self._connection.on_reconnect(self._dispatcher.reconnected)
        self._connection.on_reconnect(self._registry.rewatch)
        self._calls = CallRouter(self._placement, self._dispatcher, ids=ItemIds(self.executor_id))
        self._limits = TrajectoryLimits(max_calls=self._config.max_calls_per_trajectory)
        self._tool_list = (
            ToolListReply(
                tools=[tool.spec() for tool in BUILTIN_TOOLS.values()], aliases=TOOL_ALIASES
            )
            .model_dump_json()
            .encode()
        )
        s = self._subjects
        endpoints = {
            "execute": EndpointStats("execute", s.execute_wildcard, QUEUE_GROUP),
            "artifacts": EndpointStats("artifacts", s.artifacts_wildcard, QUEUE_GROUP),
            "release": EndpointStats("release", s.release, QUEUE_GROUP),
            "status": EndpointStats("status", s.status, QUEUE_GROUP),
            "list": EndpointStats("list", s.list_tools, QUEUE_GROUP),
        }
        discovery = ServiceDiscovery(
            nc,
            name=SERVICE_NAME,
            instance_id=self.executor_id,
            version=__version__,
            description="Runs LLM agents' tool calls in sandboxes",
            endpoints=list(endpoints.values()),
        )
        self._server = RequestServer(
            nc,
            stats=self._stats,
            discovery=discovery,
            endpoints=endpoints,
            token=self._config.token,
            max_pending_calls=self._config.max_pending_calls,
        )

    @property
    def total_requests(self) -> int:
        return self._stats.total_requests

    @property
    def total_errors(self) -> int:
        return self._stats.total_errors

    @property
    def calls_in_flight(self) -> int:
        return self._stats.calls_in_flight

    @property
    def trajectories_waiting(self) -> int:
        """This executor's trajectories in the queue for a slot."""
        return self._queue.waiting

    @property
    def serving(self) -> bool:
        """Entered and not yet exited: it takes requests."""
        return self._server.serving

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
        await self._connection.__aenter__()
        try:
            await self._registry.start(workers)
            await self._queue.start()
            self._results_sub = await self._nc.subscribe(
                self._results_subject, cb=self._dispatcher.on_result
            )
            handlers: dict[str, Handler] = {
                "execute": self._execute,
                "artifacts": self._artifacts,
                "release": self._release,
                "status": self._status,
                "list": self._list_tools,
            }
            await self._server.serve(handlers)
            self._unobserve = [
                self._metrics.observe_slots(self._slots_in_use_and_free),
                self._metrics.observe_queue_depth(lambda: self.calls_in_flight),
            ]
            await self._nc.flush()
        except BaseException:
            # Nothing of a start that failed goes on: what it subscribed (the queue group would
            # route calls here), the watch, the reconnect clock.
            await self._stop(drain_timeout_s=0.0)
            raise
        log.info("executor started", executor_id=self.executor_id, prefix=self._subjects.prefix)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop(drain_timeout_s=self._config.drain_timeout_s)

    async def _stop(self, *, drain_timeout_s: float) -> None:
        """Whatever of the executor was started; each step is a no-op for a part that was not."""
        # 1. stop accepting, 2. wait for calls in flight, 3. cancel the rest (each replies 503).
        await self._server.stop(drain_timeout_s)
        # 4. nothing of this executor goes on: no acquisition, no batch, no result wait.
        await self._queue.stop()  # offers from now on are declined: their slots freed again
        await self._placement.close()
        await self._dispatcher.close()
        if self._results_sub is not None:
            try:
                await self._results_sub.unsubscribe()
            except Exception as exc:  # the connection is gone already
                log.debug("unsubscribe failed", error=str(exc))
        await self._registry.stop()
        await self._connection.__aexit__()
        for unobserve in self._unobserve:
            unobserve()
        log.info("executor stopped", executor_id=self.executor_id)

    async def _ping_worker(self, worker_id: str) -> bool:
        """Whether the worker answers now (an empty cancel, which every worker answers)."""
        try:
            await self._nc.request(
                self._subjects.worker_cancel(worker_id), _EMPTY_CANCEL, timeout=_PING_TIMEOUT_S
            )
        except Exception:  # no responders, a timeout, a connection that is down
            return False
        return True

    # -- tools.execute.* ----------------------------------------------------------------------
    async def _execute(self, msg: Msg) -> bytes:
        request = parse_request(ExecuteRequest, msg.data, max_bytes=self._config.max_request_bytes)
        subject_tool = msg.subject.split(".")[self._subjects.execute_token_index]
        if request.tool.name != subject_tool:
            raise BadRequest(
                f"tool.name {request.tool.name!r} does not match the subject's tool "
                f"{subject_tool!r}"
            )
        tool = canonical_tool_name(request.tool.name)
        requested = request.timeout_s or _number(request.tool.arguments.get("timeout"))
        _annotate_span(request.trajectory_id, tool or request.tool.name)
        # Bound for the rest of this request's own task (see _serving.py), so nothing to undo:
        # bound_contextvars would copy the whole context twice per call to restore it.
        structlog.contextvars.bind_contextvars(
            trajectory_id=request.trajectory_id,
            tool=tool or request.tool.name,
            uniq_id=request.tool.uniq_id,
        )
        with self._limits.admit(request.trajectory_id):
            if tool is None:
                return await self._execute_external(request, requested)
            _check_runnable(tool, request.tool.arguments)
            result = await self.execute(
                request.trajectory_id,
                tool,
                request.tool.arguments,
                timeout_s=self._config.clamp_timeout(requested),
                uniq_id=request.tool.uniq_id,
                allow_network=request.allow_network is not False,
                image=None if request.image is None else str(parse_image_name(request.image)),
            )
        log.debug("call answered", success=result.success)
        return result.model_dump_json().encode()

    async def _execute_external(self, request: ExecuteRequest, requested: float | None) -> bytes:
        """A tool toolbus does not have: whoever provides it (see _external.py), else 404."""
        started = time.perf_counter()
        with self._stats.in_flight():
            result = await self._external.call(
                request,
                timeout_s=self._config.clamp_timeout(requested),
                lease=self._placement.cached(request.trajectory_id),
            )
        if result is None:
            raise NotFound(f"Unknown tool: {request.tool.name}", kind=ErrorKind.UNKNOWN_TOOL)
        log.debug("external call answered", success=result.success)
        # The metric's tool is not the name: callers choose it, and metric series must be few.
        self._stats.result_finished("external", started, result, done=result)
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
        image: str | None = None,
    ) -> ToolResult:
        """Run one call of a built-in tool in the trajectory's slot (a new one made from
        ``image``, a normalized image name, when it has none)."""
        started = time.perf_counter()
        with self._stats.in_flight():
            done = await self._calls.run(
                trajectory_id, tool, arguments, timeout_s, uniq_id, allow_network, image=image
            )
        if isinstance(done, ToolResult):
            result = done
        else:
            result = done.result or infra_failure("The worker's result was empty", uniq_id=uniq_id)
        self._stats.result_finished(tool, started, result, done=done)
        return result

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
        requested = fields.pop("timeout_s") or self._config.artifact_timeout_s
        timeout_s = min(max(requested, MIN_TIMEOUT_S), _MAX_ARTIFACT_TIMEOUT_S)
        tool = f"artifacts.{operation}"
        _annotate_span(trajectory_id, tool)
        started = time.perf_counter()
        with (
            structlog.contextvars.bound_contextvars(trajectory_id=trajectory_id, tool=tool),
            self._limits.admit(trajectory_id),
        ):
            # Only an upload may give a trajectory its first slot; the others need its files.
            with self._stats.in_flight():
                done = await self._calls.run(
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
            self._stats.call_finished(
                tool,
                started,
                succeeded=bool(body.get("success")),
                error=str(error) if error is not None else None,
                error_kind="artifact",
                done=done,
            )
        return reply_model.model_validate(body).model_dump_json().encode()

    # -- tools.release ------------------------------------------------------------------------
    async def _release(self, msg: Msg) -> bytes:
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
        return self._registry.alive()

    async def queue_status(self) -> WaitingStatus:
        """Trajectories waiting for a slot, every executor's (the waiting stream's length)."""
        return await self._queue.status()

    def _slots_in_use_and_free(self) -> tuple[int, int]:
        alive = self.registered_workers()
        free = sum(info.slots_free for info, _ in alive)
        return sum(info.slots_total for info, _ in alive) - free, free

    def status(self) -> StatusReply:
        return pool_status(
            self.executor_id, self.registered_workers(), self._stats, self.calls_in_flight
        )

    async def _status(self, msg: Msg) -> bytes:
        reply = self.status()
        reply.waiting = await self.queue_status()
        return reply.model_dump_json().encode()

    async def _list_tools(self, msg: Msg) -> bytes:
        return self._tool_list


def _annotate_span(trajectory_id: str, tool: str) -> None:
    """Name the call on the request's span (nothing to build when it does not record)."""
    if not tracing.enabled():
        return
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


def _number(value: Any) -> float | None:
    """A positive number, or None (then the default applies, and the tool judges the value)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        try:
            return float(value)
        except OverflowError:  # an integer past float range
            return None
    return None
