"""The commands' NATS connection: server URLs, credentials, and how hard to keep trying."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import nats
import nats.errors
import structlog
from nats.aio.client import Client

from .exceptions import ToolbusError
from .settings import Settings

log = structlog.get_logger("toolbus.cli")

_CONNECT_DEADLINE_S = 15.0
# A service keeps trying for ever, a second apart (nats-py adds jitter); a one-shot command
# tries twice (nats-py reads 0 attempts as "no limit").
SERVICE_RECONNECT: dict[str, Any] = {
    "allow_reconnect": True,
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": 1,
}
_ONE_SHOT_RECONNECT: dict[str, Any] = {
    "allow_reconnect": False,
    "max_reconnect_attempts": 1,
    "reconnect_time_wait": 0.1,
}


def nats_url(settings: Settings) -> str:
    return settings.nats_url or f"nats://{settings.host}:{settings.port}"


def nats_servers_and_auth(url: str) -> tuple[list[str], dict[str, str]]:
    """The server URLs without credentials, and the credentials as connect options.

    ``url`` may list several servers, comma-separated. nats-py uses credentials written in a
    URL for that server only, not for the cluster's other servers it learns of or fails over
    to; as connect options they go to every server. Percent-escapes in them are decoded, so a
    password may hold any character (``%40`` for ``@``).
    """
    servers: list[str] = []
    auth: dict[str, str] = {}
    for given in (part.strip() for part in url.split(",")):
        if not given:
            continue
        parts = urllib.parse.urlsplit(given if "://" in given else f"nats://{given}")
        if parts.username is not None and not auth:
            username = urllib.parse.unquote(parts.username)
            if parts.password is None:
                auth = {"token": username}
            else:
                auth = {"user": username, "password": urllib.parse.unquote(parts.password)}
        host = parts.hostname or "127.0.0.1"
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        servers.append(urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")))
    return servers, auth


async def connect(settings: Settings, name: str, *, service: bool = True) -> Client:
    """Connect to NATS; a service keeps reconnecting later, a one-shot command does not."""
    servers, auth = nats_servers_and_auth(nats_url(settings))
    url = ",".join(servers)  # for messages: never the credentials

    async def on_error(exc: Exception) -> None:
        if service:  # one line, no traceback: the reconnect loop will try again
            log.warning("nats connection error", url=url, error=str(exc) or type(exc).__name__)

    try:
        return await asyncio.wait_for(
            nats.connect(
                servers,
                name=name,
                **auth,
                connect_timeout=2,
                error_cb=on_error,
                **(SERVICE_RECONNECT if service else _ONE_SHOT_RECONNECT),
            ),
            _CONNECT_DEADLINE_S if service else None,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        detail = (
            "no server answered"
            if isinstance(exc, nats.errors.NoServersError)
            else (str(exc) or type(exc).__name__)
        )
        raise ToolbusError(f"cannot connect to NATS at {url}: {detail}") from None
