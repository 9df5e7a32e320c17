"""The sandbox worker: N slots, one workspace each, running the calls executors send it.

Calls of one slot run in arrival order (an asyncio lock is FIFO); different slots run at once.
A batch request is acknowledged at once and each call's result is published on its own as soon
as it is done, so a slow call never holds back another's reply.

Lifecycle (``async with SandboxWorker(...)``): enter prepares workspaces, subscribes and
registers; exit stops accepting (unsubscribe, deregister), waits for running calls up to
``drain_timeout_s``, then cancels the rest (killing their processes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue
from opentelemetry.trace import Span, SpanKind

from observability import tracing
from schemas.internal import (
    AcquireReply,
    AcquireRequest,
    BatchAck,
    BatchItem,
    BatchRequest,
    ItemResult,
    RejectReason,
    WorkerInfo,
    WorkerReleaseReply,
    WorkerReleaseRequest,
)
from schemas.messages import ErrorKindOfResult, ToolResult
from schemas.subjects import WORKERS_BUCKET, Subjects

from ._artifacts import ArtifactLimits, ArtifactRunner
from ._cgroups import CgroupProbe, PidsCgroups
from ._diskguard import DiskGuard
from ._kv import open_bucket
from ._sandbox import SandboxFactory, SandboxLimits
from ._tools import SlotTools, ToolLimits, ToolRunner
from .settings import (
    DEFAULT_ARTIFACTS_BUCKET,
    DEFAULT_ARTIFACTS_TTL_S,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_FILE_CHARS,
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_MIN_FREE_DISK_MB,
    DEFAULT_SANDBOX_UID_BASE,
    DEFAULT_SLOT_IDLE_TIMEOUT_S,
    Settings,
)

log = structlog.get_logger("toolbus.worker")

DEFAULT_DRAIN_TIMEOUT_S = 10.0
_MAX_EXPIRED_REMEMBERED = 10_000
_ARTIFACTS = "artifacts."  # batch items of artifact operations, e.g. "artifacts.read"


def new_worker_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:8]}".replace("_", "-")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    worker_id: str
    slots: int
    workspace_root: Path
    subjects: Subjects = Subjects()
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    max_file_chars: int = DEFAULT_MAX_FILE_CHARS
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    allow_network: bool = True
    require_sandbox: bool = False
    limits: SandboxLimits = SandboxLimits()
    sandbox_uid_base: int = DEFAULT_SANDBOX_UID_BASE
    min_free_disk_mb: int = DEFAULT_MIN_FREE_DISK_MB
    pids_cgroup: bool = True
    slot_idle_timeout_s: float = DEFAULT_SLOT_IDLE_TIMEOUT_S
    artifacts_bucket: str = DEFAULT_ARTIFACTS_BUCKET
    artifacts_ttl_s: float = DEFAULT_ARTIFACTS_TTL_S
    artifact_limits: ArtifactLimits = ArtifactLimits()

    @classmethod
    def from_settings(cls, settings: Settings, worker_id: str) -> WorkerConfig:
        return cls(
            worker_id=worker_id,
            slots=settings.slots,
            workspace_root=settings.data_dir / "workers" / worker_id,
            subjects=Subjects(prefix=settings.prefix),
            heartbeat_s=settings.heartbeat_s,
            max_output_chars=settings.max_output_chars,
            max_file_chars=settings.max_file_chars,
            allow_network=settings.allow_network,
            require_sandbox=settings.require_sandbox,
            limits=SandboxLimits(
                max_processes=settings.max_processes,
                max_memory_mb=settings.max_memory_mb,
                max_cpu_s=settings.max_cpu_s,
                max_file_mb=settings.max_file_mb,
                max_tmp_mb=settings.max_tmp_mb,
            ),
            sandbox_uid_base=settings.sandbox_uid_base,
            min_free_disk_mb=settings.min_free_disk_mb,
            pids_cgroup=settings.pids_cgroup,
            slot_idle_timeout_s=settings.slot_idle_timeout_s,
            artifacts_bucket=settings.artifacts_bucket,
            artifacts_ttl_s=settings.artifacts_ttl_s,
            artifact_limits=ArtifactLimits(
                max_bytes=settings.max_artifact_bytes,
                max_entries=settings.max_artifact_entries,
                inline_bytes=settings.artifact_inline_bytes,
                max_upload_bytes=settings.max_upload_mb * 1024 * 1024,
                max_upload_entries=settings.max_upload_entries,
            ),
        )


@dataclass(slots=True, eq=False)
class _Slot:
    index: int
    workspace: Path
    tools: SlotTools
    trajectory_id: str | None = None
    last_used: float = 0.0  # monotonic time of its last call's start or end
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class SandboxWorker:
    def __init__(self, nc: Client, config: WorkerConfig) -> None:
        self._nc = nc
        self._config = config
        self._subjects = config.subjects
        self._disk_guard = DiskGuard(config.workspace_root, min_free_mb=config.min_free_disk_mb)
        self._runner = ToolRunner(
            limits=ToolLimits(
                max_output_chars=config.max_output_chars, max_file_chars=config.max_file_chars
            ),
            disk_guard=self._disk_guard,
        )
        self._cgroup_probe = (
            PidsCgroups.create(config.worker_id)
            if config.pids_cgroup
            else CgroupProbe(None, "pids_cgroup is off")
        )
        self._cgroups = self._cgroup_probe.cgroups
        self._sandboxes = SandboxFactory(
            allow_network=config.allow_network,
            require_sandbox=config.require_sandbox,
            limits=config.limits,
            cgroups=self._cgroups,
            uid_base=config.sandbox_uid_base,
        )
        self._artifacts = ArtifactRunner(
            nc.jetstream(),
            scratch=config.workspace_root / ".scratch",
            bucket=config.artifacts_bucket,
            ttl_s=config.artifacts_ttl_s,
            limits=config.artifact_limits,
        )
        self._slots: list[_Slot] = []
        self._by_trajectory: dict[str, _Slot] = {}
        # Trajectories whose slots expired, so their next call hears why (bounded, oldest out).
        self._expired: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._subscriptions: list[Subscription] = []
        self._registry: KeyValue | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._announce_soon: asyncio.TimerHandle | None = None
        self._started_at = time.time()
        self._accepting = False
        self.calls_completed = 0

    @property
    def worker_id(self) -> str:
        return self._config.worker_id

    @property
    def process_limit(self) -> str:
        """How ``max_processes`` is enforced on this worker's slots."""
        return self._sandboxes.process_limit

    @property
    def slots_free(self) -> int:
        return len(self._slots) - len(self._by_trajectory)

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> SandboxWorker:
        root = self._config.workspace_root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o711)  # sandbox users pass through to their own slot; they cannot list it
        try:
            # Fails closed here when require_sandbox is set and bubblewrap cannot run.
            await self._sandboxes.probe(root / ".probe")
        except BaseException:
            if self._cgroups is not None:
                await self._cgroups.remove()
            raise
        if not self._sandboxes.sandboxed:
            log.warning(
                "commands run WITHOUT a sandbox: results say sandboxed=false",
                reason=self._sandboxes.reason_unsandboxed,
                network_isolated=False,
            )
        if self._disk_guard.free_bytes() < self._config.min_free_disk_mb * 1024 * 1024:
            log.warning(
                "the workspaces' disk is already below min_free_disk_mb: commands will be stopped",
                free_mb=self._disk_guard.free_bytes() // (1024 * 1024),
                min_free_disk_mb=self._config.min_free_disk_mb,
            )
        if self._sandboxes.sandboxed and self._sandboxes.reason_not_separate_user:
            log.warning(
                "sandboxes run as root, not as separate users: make the workspace directory "
                "reachable by other users (e.g. under /var/lib/toolbus)",
                reason=self._sandboxes.reason_not_separate_user,
            )
        for index in range(self._config.slots):
            workspace = root / f"slot_{index}"
            workspace.mkdir(parents=True, exist_ok=True)
            workspace = workspace.resolve()  # once, not on every file call
            sandbox = self._sandboxes.make(index, workspace)
            offline = functools.partial(self._sandboxes.make_offline, index, workspace)
            self._slots.append(_Slot(index, workspace, SlotTools.for_sandbox(sandbox, offline)))
        self._registry = await open_bucket(
            self._nc.jetstream(), WORKERS_BUCKET, description="toolbus sandbox workers"
        )
        await self._artifacts.start()
        wid = self.worker_id
        for subject, handler in (
            (self._subjects.worker_batch(wid), self._on_batch),
            (self._subjects.worker_acquire(wid), self._on_acquire),
            (self._subjects.worker_release(wid), self._on_release),
        ):
            self._subscriptions.append(await self._nc.subscribe(subject, cb=handler))
        await self._nc.flush()
        self._accepting = True
        await self._announce()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat-{wid}")
        log.info(
            "worker started",
            worker_id=wid,
            slots=len(self._slots),
            workspace_root=str(self._config.workspace_root),
            sandboxed=self._sandboxes.sandboxed,
            network_isolated=self._sandboxes.sandboxed and not self._config.allow_network,
            process_limit=self._sandboxes.process_limit,
            no_pids_cgroup_because=self._cgroup_probe.reason or None,
            runs_as=self._sandboxes.identity,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # 1. stop accepting: no new batches, and executors stop choosing this worker.
        self._accepting = False
        for sub in self._subscriptions:  # drained: what was already routed here gets an answer
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
        self._subscriptions.clear()
        if self._heartbeat:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._announce_soon:
            self._announce_soon.cancel()
        if self._registry is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._registry.delete(self.worker_id)
        # 2. wait for running calls, 3. then cancel what is left (their processes are killed).
        running = [task for slot in self._slots for task in slot.tasks]
        if running:
            _, pending = await asyncio.wait(running, timeout=self._config.drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # 4. end every sandbox and what still runs in it.
        await asyncio.gather(*(slot.tools.close() for slot in self._slots))
        await self._disk_guard.close()
        if self._cgroups is not None:
            await self._cgroups.remove()
        log.info("worker stopped", worker_id=self.worker_id)

    # -- registration -------------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            slots_total=len(self._slots),
            slots_free=self.slots_free,
            started_at=self._started_at,
            updated_at=time.time(),
            heartbeat_s=self._config.heartbeat_s,
        )

    async def _announce(self) -> None:
        assert self._registry is not None
        await self._registry.put(self.worker_id, self.info().model_dump_json().encode())

    def _announce_change(self) -> None:
        """Publish free slots soon, coalescing a burst of acquires/releases into one put."""
        if self._announce_soon is None and self._accepting:
            loop = asyncio.get_running_loop()
            self._announce_soon = loop.call_later(0.05, self._fire_announce)

    def _fire_announce(self) -> None:
        self._announce_soon = None
        task = asyncio.create_task(self._announce())
        task.add_done_callback(_log_task_failure)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat_s)
            try:
                await self._expire_idle_slots()
                await self._announce()
            except Exception as exc:  # a missed heartbeat is logged, the next one retries
                log.warning("heartbeat failed", worker_id=self.worker_id, error=str(exc))

    # -- slots --------------------------------------------------------------------------------
    async def _on_acquire(self, msg: Msg) -> None:
        request = AcquireRequest.model_validate_json(msg.data)
        reply = self.acquire(request.trajectory_id)
        await msg.respond(reply.model_dump_json().encode())

    def acquire(self, trajectory_id: str) -> AcquireReply:
        """Give the trajectory a slot (the one it has, if any); ``slot=None`` when full."""
        if not self._accepting:
            return AcquireReply()
        slot = self._by_trajectory.get(trajectory_id)
        if slot is not None:
            return AcquireReply(slot=slot.index)
        for slot in self._slots:
            if slot.trajectory_id is None:
                self._expired.pop(trajectory_id, None)
                slot.trajectory_id = trajectory_id
                slot.last_used = time.monotonic()
                self._by_trajectory[trajectory_id] = slot
                self._announce_change()
                log.info("slot acquired", trajectory_id=trajectory_id, slot=slot.index)
                return AcquireReply(slot=slot.index, created=True)
        return AcquireReply()

    async def _on_release(self, msg: Msg) -> None:
        request = WorkerReleaseRequest.model_validate_json(msg.data)
        reply = await self.release(request.trajectory_id, reset_workspace=request.reset_workspace)
        await msg.respond(reply.model_dump_json().encode())

    async def release(self, trajectory_id: str, *, reset_workspace: bool) -> WorkerReleaseReply:
        """Free the trajectory's slot: cancel its calls, end every process it left, maybe wipe."""
        slot = self._by_trajectory.pop(trajectory_id, None)
        if slot is None:
            return WorkerReleaseReply(released=False)
        slot.trajectory_id = None  # no new call can reach it from here on
        for task in list(slot.tasks):
            task.cancel()
        await asyncio.gather(*slot.tasks, return_exceptions=True)
        await slot.tools.close()  # background processes (&, nohup, setsid, tmux) end here too
        if reset_workspace:
            await asyncio.to_thread(_wipe_directory, slot.workspace)
        self._announce_change()
        log.info(
            "slot released", trajectory_id=trajectory_id, slot=slot.index, reset=reset_workspace
        )
        return WorkerReleaseReply(released=True, slot=slot.index)

    async def _expire_idle_slots(self) -> None:
        """Release, and wipe, slots whose trajectory has made no call for slot_idle_timeout_s:
        a trainer that crashed or forgot to release must not hold them for ever."""
        timeout = self._config.slot_idle_timeout_s
        if timeout <= 0:
            return
        now = time.monotonic()
        for slot in self._slots:
            trajectory_id = slot.trajectory_id
            if trajectory_id is None or slot.tasks or now - slot.last_used < timeout:
                continue
            log.info("slot expired", trajectory_id=trajectory_id, slot=slot.index, idle_s=timeout)
            self._expired[trajectory_id] = None
            while len(self._expired) > _MAX_EXPIRED_REMEMBERED:
                self._expired.popitem(last=False)
            await self.release(trajectory_id, reset_workspace=True)

    # -- calls --------------------------------------------------------------------------------
    async def _on_batch(self, msg: Msg) -> None:
        batch = BatchRequest.model_validate_json(msg.data)
        batch_headers = msg.headers
        ack = BatchAck()
        for item in batch.items:
            slot = self._by_trajectory.get(item.trajectory_id)
            if not self._accepting:
                ack.rejected[item.item_id] = RejectReason.STOPPING
            elif slot is None and item.trajectory_id in self._expired:
                ack.rejected[item.item_id] = RejectReason.EXPIRED
            elif slot is None:
                ack.rejected[item.item_id] = RejectReason.NO_SLOT
            else:
                slot.last_used = time.monotonic()
                task = asyncio.create_task(
                    self._run_item(slot, item, batch.reply_to, batch_headers, msg.subject)
                )
                slot.tasks.add(task)
                task.add_done_callback(slot.tasks.discard)
        await msg.respond(ack.model_dump_json().encode())

    async def _run_item(
        self,
        slot: _Slot,
        item: BatchItem,
        reply_to: str,
        batch_headers: dict[str, str] | None,
        subject: str,
    ) -> None:
        """Run one call in its slot (after the calls before it) and publish its result.

        Its span continues the executor's trace (the item carries its context) and links to the
        batch it came in; the tool's own span inside it is the execution time, what comes
        before it the queue wait.
        """
        outcome = ItemResult(item_id=item.item_id)
        with (
            tracing.span(
                f"process {subject}",
                kind=SpanKind.CONSUMER,
                parent=item.trace_context or {},
                links=lambda: tracing.link_to(batch_headers),
                attributes=lambda: tracing.nats_attributes(
                    subject,
                    "process",
                    **{"toolbus.trajectory_id": item.trajectory_id, "toolbus.slot": slot.index},
                ),
            ) as span,
            structlog.contextvars.bound_contextvars(
                trajectory_id=item.trajectory_id, tool=item.tool, uniq_id=item.uniq_id
            ),
        ):
            try:
                async with slot.lock:
                    started = time.time()
                    if item.created_at is not None:
                        outcome.queue_wait_s = max(started - item.created_at, 0.0)
                        span.set_attribute("toolbus.queue_wait_s", outcome.queue_wait_s)
                    await self._run_tool(slot, item, outcome)
                    outcome.execution_s = time.time() - started
            except asyncio.CancelledError:
                outcome.result = ToolResult(
                    success=False,
                    error="Call cancelled: the trajectory was released or the worker stopped",
                    metadata={"error_kind": str(ErrorKindOfResult.INFRA), "cancelled": True},
                )
                tracing.mark_error(span, "cancelled")
                await self._publish_outcome(item, outcome, reply_to, slot)
                raise
            except Exception as exc:
                log.exception("tool crashed")
                outcome.result = ToolResult(
                    success=False,
                    error="Internal error in the sandbox worker",
                    metadata={"error_kind": str(ErrorKindOfResult.INFRA)},
                )
                tracing.mark_error(span, type(exc).__qualname__)
            else:
                if not _succeeded(outcome):
                    tracing.mark_error(span, _error_type(outcome))
            await self._publish_outcome(item, outcome, reply_to, slot)

    async def _run_tool(self, slot: _Slot, item: BatchItem, outcome: ItemResult) -> None:
        with tracing.span(
            f"execute_tool {item.tool}",
            attributes=lambda: {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": item.tool,
            },
        ) as span:
            if item.tool.startswith(_ARTIFACTS):
                outcome.reply = await self._run_artifact_operation(slot, item)
            else:
                outcome.result = await self._runner.run(
                    item.tool,
                    item.arguments,
                    slot.tools,
                    timeout_s=item.timeout_s,
                    allow_network=item.allow_network,
                )
                _describe_result(span, outcome.result)
            if not _succeeded(outcome):
                tracing.mark_error(span, _error_type(outcome), _error_message(outcome))

    async def _run_artifact_operation(self, slot: _Slot, item: BatchItem) -> dict[str, Any]:
        operation = item.tool.removeprefix(_ARTIFACTS)
        try:
            async with asyncio.timeout(item.timeout_s):
                reply = await self._artifacts.run(
                    operation, item.arguments, slot.tools.sandbox, item.trajectory_id
                )
        except TimeoutError:
            reply = {
                "success": False,
                "error": f"artifact {operation} timed out after {item.timeout_s:g}s",
            }
        log.debug("artifact operation done", success=reply.get("success"), slot=slot.index)
        return reply

    async def _publish_outcome(
        self, item: BatchItem, outcome: ItemResult, reply_to: str, slot: _Slot
    ) -> None:
        slot.last_used = time.monotonic()
        if outcome.result is not None:
            outcome.result.uniq_id = item.uniq_id
            outcome.result.metadata.update(worker_id=self.worker_id, slot=slot.index)
        log.debug("call done", success=_succeeded(outcome), slot=slot.index)
        await self._publish(reply_to, outcome)

    async def _publish(self, reply_to: str, item_result: ItemResult) -> None:
        self.calls_completed += 1
        payload = item_result.model_dump_json().encode()
        with contextlib.suppress(Exception):  # the executor may be gone; nothing to tell
            await self._nc.publish(reply_to, payload)


def _succeeded(outcome: ItemResult) -> bool:
    if outcome.result is not None:
        return outcome.result.success
    return bool((outcome.reply or {}).get("success"))


def _error_type(outcome: ItemResult) -> str:
    """``error.type`` of a failed call: the result's error kind (exit, timeout, ...)."""
    if outcome.result is not None:
        return str(outcome.result.metadata.get("error_kind") or "tool")
    return "artifact"


def _error_message(outcome: ItemResult) -> str | None:
    if outcome.result is not None:
        return outcome.result.error
    error = (outcome.reply or {}).get("error")
    return str(error) if error is not None else None


def _describe_result(span: Span, result: ToolResult) -> None:
    if not span.is_recording():
        return
    metadata = result.metadata
    attributes = {
        "toolbus.status": metadata.get("status"),
        "process.exit.code": metadata.get("exit_code"),
        "toolbus.sandboxed": metadata.get("sandboxed"),
        "toolbus.truncated": metadata.get("truncated"),
        "toolbus.output_bytes": (metadata.get("stdout_bytes") or 0)
        + (metadata.get("stderr_bytes") or 0),
        "toolbus.success": result.success,
    }
    span.set_attributes({key: value for key, value in attributes.items() if value is not None})


def _wipe_directory(directory: Path) -> None:
    """Empty a workspace without removing it (its path stays the slot's)."""
    for entry in list(directory.iterdir()) if directory.exists() else []:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("background task failed", error=str(exc))
