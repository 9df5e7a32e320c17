"""The client's cheap request/reply (services._requests.Requester) answers as nc.request does.

These failed before the Requester existed (shared/issue 10, item 5: an ImportError).
"""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from services._requests import Requester
from services.client import ToolbusClient
from services.exceptions import RequestTimeout


async def test_concurrent_requests_each_get_their_own_reply(nc: Client) -> None:
    async def echo(msg: Msg) -> None:
        await msg.respond(b"re: " + msg.data)

    subject = nc.new_inbox()
    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    requester = Requester(nc)
    replies = await asyncio.gather(
        *(requester.request(subject, str(k).encode(), timeout=10) for k in range(50))
    )
    assert [reply.data for reply in replies] == [f"re: {k}".encode() for k in range(50)]
    assert not requester._waiting  # nothing left behind


async def test_no_responders_and_timeouts_raise_as_nc_request_does(nc: Client) -> None:
    requester = Requester(nc)
    with pytest.raises(NoRespondersError):
        await requester.request(nc.new_inbox(), b"anyone?", timeout=10)
    silent = nc.new_inbox()
    sub = await nc.subscribe(silent)  # takes requests, never answers
    await nc.flush()
    with pytest.raises(NatsTimeoutError):
        await requester.request(silent, b"hello?", timeout=0.2)
    assert not requester._waiting
    await sub.unsubscribe()  # else the connection's drain waits for its unread message


async def test_a_client_timeout_names_the_wait_it_used(nc: Client) -> None:
    """With no ``timeout_s`` the client waits its own ``request_timeout_s`` and says so."""
    client = ToolbusClient(nc, request_timeout_s=0.3)
    subject = nc.new_inbox()
    sub = await nc.subscribe(subject)  # takes the request, never answers
    await nc.flush()
    with pytest.raises(RequestTimeout, match=r"within 0\.3s"):
        await client.request_raw(subject, b"{}")
    with pytest.raises(RequestTimeout, match=r"within 0\.2s"):
        await client.request_raw(subject, b"{}", timeout_s=0.2)
    await sub.unsubscribe()
