"""Results on their way back to executors: what one loop turn produced for an executor goes as
one message.

A batch of fast calls finishes in one loop turn. Publishing each result on its own costs the
worker a publish per call and the executor a message per call (parse, queue, callback); here
the results queued for one ``reply_to`` in a turn go together, as JSON lines of ``ItemResult``
(one result alone is just that result, so a reader of single results reads it as before).

Nothing is dropped or reordered: each result is fitted under the message budget on its own
(a tool's output is cut and flagged, see :func:`fit_result`), results that would make a message
too large go in the next one, messages to one ``reply_to`` leave in the order their results
were queued (a ``started`` notice before its result), and a message that cannot be published
is answered, per result in it, with a short infra failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import structlog
from nats.aio.client import Client

from schemas.internal import ItemResult

from ._failures import infra_failure

log = structlog.get_logger("toolbus.worker")

PAYLOAD_HEADROOM = 1024  # below the server's max_payload, for the protocol line


class ResultSender:
    def __init__(self, nc: Client) -> None:
        self._nc = nc
        # Per reply_to: (item_id, is a started notice, payload) waiting for its message.
        self._queued: dict[str, list[tuple[str, bool, bytes]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.messages_sent = 0
        self.results_sent = 0

    @property
    def budget(self) -> int:
        """The most bytes one result message may have."""
        return self._nc.max_payload - PAYLOAD_HEADROOM

    def send(self, reply_to: str, outcome: ItemResult) -> None:
        """Queue a result (or a started notice): it leaves with the others of this loop turn.

        Synchronous, so a call cancelled right after cannot lose its result."""
        self._queue(
            reply_to, (outcome.item_id, _is_notice(outcome), fit_result(outcome, self.budget))
        )

    def send_encoded(self, reply_to: str, item_id: str, payload: bytes) -> None:
        """As :meth:`send`, for a result already encoded with :func:`fit_result`."""
        self._queue(reply_to, (item_id, False, payload))

    def _queue(self, reply_to: str, entry: tuple[str, bool, bytes]) -> None:
        queue = self._queued.get(reply_to)
        if queue is not None:  # a sender for this reply_to is on its way: it takes this one
            queue.append(entry)
            return
        self._queued[reply_to] = [entry]
        # Its first step runs on the next loop turn, once the rest of this turn's results joined.
        task = asyncio.create_task(self._send_queued(reply_to))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Until every result queued so far has been published (or answered as failed)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _send_queued(self, reply_to: str) -> None:
        # The one sender of this reply_to until its queue is empty: messages keep their order.
        queue = self._queued[reply_to]
        try:
            while queue:
                entries = queue[:]
                queue.clear()
                for message, members in _pack(entries, self.budget):
                    await self._publish(reply_to, message, members)
        finally:
            del self._queued[reply_to]

    async def _publish(
        self, reply_to: str, message: bytes, members: list[tuple[str, bool, bytes]]
    ) -> None:
        try:
            await self._nc.publish(reply_to, message)
        except Exception as exc:
            log.error("publishing results failed", results=len(members), error=repr(exc))
            for item_id, notice, _ in members:
                if not notice:  # a start notice needs none: its result follows
                    await self._publish_failure(reply_to, item_id, exc)
        else:
            self.messages_sent += 1
            self.results_sent += len(members)

    async def _publish_failure(self, reply_to: str, item_id: str, exc: Exception) -> None:
        fallback = ItemResult(
            item_id=item_id,
            result=infra_failure(
                f"The worker could not send this call's result ({type(exc).__name__})"
            ),
        )
        try:
            await self._nc.publish(reply_to, fallback.model_dump_json().encode())
        except Exception as again:  # the connection is gone: the executor sees the worker go
            log.error("publishing a failure failed too", error=repr(again))


def _is_notice(outcome: ItemResult) -> bool:
    return outcome.started and outcome.result is None and outcome.reply is None


def _pack(
    entries: list[tuple[str, bool, bytes]], budget: int
) -> Iterator[tuple[bytes, list[tuple[str, bool, bytes]]]]:
    """Messages of JSON lines, each at most ``budget`` bytes (every entry fits on its own)."""
    members: list[tuple[str, bool, bytes]] = []
    size = 0
    for entry in entries:
        added = len(entry[2]) + (1 if members else 0)
        if members and size + added > budget:
            yield b"\n".join(payload for _, _, payload in members), members
            members, added = [], len(entry[2])
            size = 0
        members.append(entry)
        size += added
    if members:
        yield b"\n".join(payload for _, _, payload in members), members


def fit_result(outcome: ItemResult, budget: int) -> bytes:
    """The result as one message of at most ``budget`` bytes: a tool's output is cut (flagged
    ``truncated`` and ``output_cut_to_fit``), anything else too large becomes an infra failure."""
    payload = outcome.model_dump_json().encode()
    if len(payload) <= budget:
        return payload
    result = outcome.result
    original = len(payload)
    if result is not None and result.output:
        fitted = outcome.model_copy(deep=True)
        assert fitted.result is not None
        fitted.result.metadata.update(truncated=True, output_cut_to_fit=True)
        output = result.output
        for _ in range(8):  # each round scales the output down by how far it is over
            over = len(payload) - budget
            if over <= 0:
                return payload
            keep = max(int(len(output) * (1 - over / max(len(payload), 1))) - 64, 0)
            output = output[:keep]
            fitted.result.output = output
            payload = fitted.model_dump_json().encode()
        if len(payload) <= budget:
            return payload
    log.error("a result too large for one message", item_id=outcome.item_id, size=original)
    return (
        ItemResult(
            item_id=outcome.item_id,
            result=infra_failure(
                f"The call's result ({original} bytes) does not fit in one NATS message "
                f"({budget} bytes)"
            ),
            reply=(
                {"success": False, "error": f"The reply ({original} bytes) is too large to send"}
                if outcome.reply is not None
                else None
            ),
        )
        .model_dump_json()
        .encode()
    )
