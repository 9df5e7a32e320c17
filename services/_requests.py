"""NATS requests: ``nats_request`` rides out nats-server's brief "no responders" after a new
subscription, and :class:`Requester` makes requests cheaply on a busy connection, and sends
again, when asked to, the requests whose reply a reconnect may have lost.

A subscriber's interest can take a moment to be visible to publishers on other connections even
after its flush (nats-io/nats-server#2876), so a 503 right after an executor or worker starts is
retried a few times before it is believed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import Header

log = structlog.get_logger("toolbus.client")

NO_RESPONDER_RETRY_DELAYS_S = (0.01, 0.05, 0.2)
_NO_RESPONDERS_STATUS = "503"
_RECONNECT_CHECK_S = 0.1  # how often waiting requests look for a reconnect of the connection
# After a reconnect the services' subscriptions come back one by one: a request sent again
# that finds no responder is sent again this often, for this long, before its 503 is believed.
_RESEND_EVERY_S = 0.5
_RESEND_FOR_S = 10.0


@dataclass(slots=True, eq=False)
class _Resendable:
    subject: str
    payload: bytes
    headers: dict[str, str] | None
    reconnects: int  # the connection's reconnect count when it was last sent
    resent_at: float | None = None  # monotonic, of the first resend


class Requester:
    """Request/reply on one wildcard inbox subscription of its own, as ``nc.request`` does, but
    without its per-request extras (random bytes read from the OS for the reply subject, an
    ``asyncio.wait_for`` and a done callback): about half of nats-py's CPU per request, which
    is most of what a client spends on a call.

    Raises as ``nc.request`` does: ``NoRespondersError``, ``nats.errors.TimeoutError``, and the
    connection's own errors from the publish.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._subscribed: asyncio.Future[None] | None = None
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._resendable: dict[str, _Resendable] = {}  # by token, while their reply is awaited
        self._reconnect_watch: asyncio.Task[None] | None = None
        self._resends: set[asyncio.Future[None]] = set()
        self._sent = 0

    async def request(
        self,
        subject: str,
        payload: bytes,
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        resend_on_reconnect: bool = False,
    ) -> Msg:
        """``resend_on_reconnect``: when the connection reconnects before the reply comes, the
        request is sent again (its reply, or the request itself, may have been lost with the
        old connection). Only for a request whose repeat does no harm: a call with a
        ``uniq_id`` (the worker runs it once), a read."""
        if self._subscribed is None or not self._subscribed.done():
            await self._subscribe()
        loop = asyncio.get_running_loop()
        self._sent += 1
        token = str(self._sent)  # unique within the inbox, which is unique to this requester
        reply: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = reply
        timer = loop.call_later(timeout, _expire, reply)
        if resend_on_reconnect:
            reconnects = self._nc.stats["reconnects"]
            self._resendable[token] = _Resendable(subject, payload, headers, reconnects)
            if self._reconnect_watch is None or self._reconnect_watch.done():
                self._reconnect_watch = asyncio.create_task(self._watch_reconnects())
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            msg = await reply
        finally:
            timer.cancel()
            del self._waiting[token]
            self._resendable.pop(token, None)
        if msg.headers and msg.headers.get(Header.STATUS) == _NO_RESPONDERS_STATUS:
            raise NoRespondersError
        return msg

    async def _watch_reconnects(self) -> None:
        """While resendable requests wait: after each reconnect, send them again."""
        seen = -1  # a first look at once: a reconnect may have come before this task began
        while self._resendable:
            await asyncio.sleep(_RECONNECT_CHECK_S)
            reconnects = self._nc.stats["reconnects"]
            if reconnects == seen or not self._nc.is_connected:
                continue
            seen = reconnects
            for token, request in list(self._resendable.items()):
                if request.reconnects < reconnects:
                    request.reconnects = reconnects
                    request.resent_at = time.monotonic()  # its 503s are doubted from now
                    await self._resend(token, request)

    async def _resend(self, token: str, request: _Resendable) -> None:
        if self._resendable.get(token) is not request:
            return  # answered meanwhile
        log.debug("sending a request again after a reconnect", subject=request.subject)
        try:
            await self._nc.publish(
                request.subject,
                request.payload,
                reply=self._prefix + token,
                headers=request.headers,
            )
        except Exception as exc:  # disconnected again: the next reconnect sends it again
            log.debug("a request could not be sent again", error=repr(exc))

    def _coming_back(self, request: _Resendable) -> bool:
        """A no-responders answer to a request sent across a reconnect: doubted for a while."""
        if request.reconnects < self._nc.stats["reconnects"]:  # sent before it, answered after
            request.reconnects = self._nc.stats["reconnects"]
            request.resent_at = time.monotonic()
        resent_at = request.resent_at
        return resent_at is not None and time.monotonic() - resent_at < _RESEND_FOR_S

    def _resend_later(self, token: str, request: _Resendable) -> None:
        def resend() -> None:
            task = asyncio.ensure_future(self._resend(token, request))
            self._resends.add(task)  # held until done (it logs its own failure)
            task.add_done_callback(self._resends.discard)

        asyncio.get_running_loop().call_later(_RESEND_EVERY_S, resend)

    async def _subscribe(self) -> None:
        """Once, shared by the requests that come before it is done."""
        if self._subscribed is None:
            self._subscribed = asyncio.get_running_loop().create_future()
            try:
                inbox = self._nc.new_inbox()
                await self._nc.subscribe(f"{inbox}.*", cb=self._on_reply)
            except BaseException as exc:
                self._subscribed.set_exception(exc)
                self._subscribed.exception()  # retrieved: the waiters re-raise it
                self._subscribed = None
                raise
            self._prefix = f"{inbox}."
            self._subscribed.set_result(None)
        await asyncio.shield(self._subscribed)

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) :]
        reply = self._waiting.get(token)
        if reply is None or reply.done():  # given up on already
            return
        request = self._resendable.get(token)
        no_responders = msg.headers and msg.headers.get(Header.STATUS) == _NO_RESPONDERS_STATUS
        if no_responders and request is not None and self._coming_back(request):
            self._resend_later(token, request)  # the services are still coming back
            return
        reply.set_result(msg)


def _expire(reply: asyncio.Future[Msg]) -> None:
    if not reply.done():
        reply.set_exception(NatsTimeoutError())


async def nats_request(
    nc: Client,
    subject: str,
    payload: bytes,
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
    requester: Requester | None = None,
    resend_on_reconnect: bool = False,
) -> Msg:
    """A request (on ``requester`` when given, else ``nc.request``) that retries a
    no-responders answer; raises it after the last retry. ``resend_on_reconnect``: see
    :meth:`Requester.request` (needs ``requester``)."""
    if requester is None:
        assert not resend_on_reconnect, "resend_on_reconnect needs a Requester"

        async def request(subject: str, payload: bytes, **options: Any) -> Msg:
            return await nc.request(subject, payload, **options)
    else:

        async def request(subject: str, payload: bytes, **options: Any) -> Msg:
            return await requester.request(
                subject, payload, resend_on_reconnect=resend_on_reconnect, **options
            )

    for delay in NO_RESPONDER_RETRY_DELAYS_S:
        try:
            return await request(subject, payload, timeout=timeout, headers=headers)
        except NoRespondersError:
            await asyncio.sleep(delay)
    return await request(subject, payload, timeout=timeout, headers=headers)
