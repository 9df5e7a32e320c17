"""NATS requests: ``nats_request`` rides out nats-server's brief "no responders" after a new
subscription, and :class:`Requester` makes requests cheaply on a busy connection.

A subscriber's interest can take a moment to be visible to publishers on other connections even
after its flush (nats-io/nats-server#2876), so a 503 right after an executor or worker starts is
retried a few times before it is believed.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import Header

NO_RESPONDER_RETRY_DELAYS_S = (0.01, 0.05, 0.2)
_NO_RESPONDERS_STATUS = "503"


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
        self._sent = 0

    async def request(
        self,
        subject: str,
        payload: bytes,
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        if self._subscribed is None or not self._subscribed.done():
            await self._subscribe()
        loop = asyncio.get_running_loop()
        self._sent += 1
        token = str(self._sent)  # unique within the inbox, which is unique to this requester
        reply: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = reply
        timer = loop.call_later(timeout, _expire, reply)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            msg = await reply
        finally:
            timer.cancel()
            del self._waiting[token]
        if msg.headers and msg.headers.get(Header.STATUS) == _NO_RESPONDERS_STATUS:
            raise NoRespondersError
        return msg

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
        reply = self._waiting.get(msg.subject[len(self._prefix) :])
        if reply is not None and not reply.done():  # else given up on already
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
) -> Msg:
    """A request (on ``requester`` when given, else ``nc.request``) that retries a
    no-responders answer; raises it after the last retry."""
    request = nc.request if requester is None else requester.request
    for delay in NO_RESPONDER_RETRY_DELAYS_S:
        try:
            return await request(subject, payload, timeout=timeout, headers=headers)
        except NoRespondersError:
            await asyncio.sleep(delay)
    return await request(subject, payload, timeout=timeout, headers=headers)
