"""NATS requests that ride out nats-server's brief "no responders" after a new subscription.

A subscriber's interest can take a moment to be visible to publishers on other connections even
after its flush (nats-io/nats-server#2876), so a 503 right after an executor or worker starts is
retried a few times before it is believed.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

NO_RESPONDER_RETRY_DELAYS_S = (0.01, 0.05, 0.2)


async def nats_request(
    nc: Client,
    subject: str,
    payload: bytes,
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> Msg:
    """``nc.request`` that retries a no-responders answer; raises it after the last retry."""
    for delay in NO_RESPONDER_RETRY_DELAYS_S:
        try:
            return await nc.request(subject, payload, timeout=timeout, headers=headers)
        except NoRespondersError:
            await asyncio.sleep(delay)
    return await nc.request(subject, payload, timeout=timeout, headers=headers)
