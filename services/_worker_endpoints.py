"""What a sandbox worker answers on NATS: its batch, acquire, release and cancel subjects.

- ``batch``: the calls of a batch are taken in (``_slot_calls.py``) and acknowledged; their runs
  begin once the ack is on its way, so the executor can send its next batch meanwhile.
- ``acquire`` and ``release``: a slot for a trajectory, and back (``_slot_keeper.py``); each
  answered from a task of its own (nats-py runs one callback of a subscription at a time, and a
  slow release must not hold back the next one), and always answered, with a failure reply when
  the handler failed.
- ``cancel``: an executor gives up on calls; always answered.
- ``drain``: an autoscaler takes the worker out of service, or back (``_worker_drain.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel

from schemas.internal import (
    AcquireOutcome,
    AcquireReply,
    AcquireRequest,
    CancelReply,
    CancelRequest,
    DrainReply,
    DrainRequest,
    WorkerReleaseReply,
    WorkerReleaseRequest,
)
from schemas.subjects import Subjects

from ._slot_calls import SlotCalls
from ._slot_keeper import SlotKeeper

log = structlog.get_logger("toolbus.worker")
_MAX_ERROR_CHARS = 500  # of a failed request's exception text in its reply (the log has it all)


class WorkerEndpoints:
    def __init__(
        self,
        nc: Client,
        *,
        subjects: Subjects,
        worker_id: str,
        calls: SlotCalls,
        keeper: SlotKeeper,
        drain: Callable[[DrainRequest], Awaitable[DrainReply]],
        spawn: Callable[[Awaitable[object]], None],
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._worker_id = worker_id
        self._calls = calls
        self._keeper = keeper
        self._drain = drain
        self._spawn = spawn  # runs a handler in a task the worker waits for at shutdown
        self._subscriptions: list[Subscription] = []

    async def subscribe(self) -> None:
        wid, subjects = self._worker_id, self._subjects
        for subject, handler in (
            (subjects.worker_batch(wid), self._on_batch),
            (
                subjects.worker_acquire(wid),
                self._answered(
                    self._on_acquire, lambda _: AcquireReply(outcome=AcquireOutcome.FAILED)
                ),
            ),
            (
                subjects.worker_release(wid),
                self._answered(
                    self._on_release,
                    lambda exc: WorkerReleaseReply(released=False, error=type(exc).__name__),
                ),
            ),
            (subjects.worker_cancel(wid), self._on_cancel),
            (
                subjects.worker_drain(wid),
                self._answered(self._on_drain, lambda exc: DrainReply(error=_error_text(exc))),
            ),
        ):
            self._subscriptions.append(await self._nc.subscribe(subject, cb=handler))
        await self._nc.flush()

    async def unsubscribe(self) -> None:
        for sub in self._subscriptions:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is gone already
                log.debug("unsubscribe failed", error=repr(exc))
        self._subscriptions.clear()

    def _answered(
        self,
        handler: Callable[[Msg], Awaitable[BaseModel]],
        failed: Callable[[Exception], BaseModel],
    ) -> Callable[[Msg], Awaitable[None]]:
        """A request answered from a task of its own, and always answered: ``failed(error)``
        when the handler failed."""

        async def on_request(msg: Msg) -> None:
            async def answer() -> None:
                try:
                    reply = await handler(msg)
                except Exception as exc:
                    log.exception("a worker request failed", subject=msg.subject)
                    reply = failed(exc)
                await msg.respond(reply.model_dump_json().encode())

            self._spawn(answer())

        return on_request

    async def _on_batch(self, msg: Msg) -> None:
        ack, open_gate = self._calls.take_batch(msg.data, msg.subject, msg.headers)
        try:
            await msg.respond(ack.model_dump_json().encode())
        finally:
            # After the publish, so the ack is written before the first of the batch's runs
            # (the connection's flusher was woken first); and whatever happened to the ack.
            open_gate()

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            request = CancelRequest.model_validate_json(msg.data)
            reply = self._calls.cancel(request.item_ids, after_s=request.after_s)
        except Exception:  # answered all the same: no outcome is "ask again"
            log.exception("a cancel request failed")
            reply = CancelReply()
        await msg.respond(reply.model_dump_json().encode())

    async def _on_acquire(self, msg: Msg) -> AcquireReply:
        request = AcquireRequest.model_validate_json(msg.data)
        return await self._keeper.acquire(request.trajectory_id, request.image)

    async def _on_release(self, msg: Msg) -> WorkerReleaseReply:
        request = WorkerReleaseRequest.model_validate_json(msg.data)
        return await self._keeper.release(
            request.trajectory_id, epoch=request.epoch, reset_workspace=request.reset_workspace
        )

    async def _on_drain(self, msg: Msg) -> DrainReply:
        return await self._drain(DrainRequest.model_validate_json(msg.data))


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
