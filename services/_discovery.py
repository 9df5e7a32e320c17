"""NATS service discovery (ADR-32): answers ``$SRV.PING|INFO|STATS`` for one instance.

Written here rather than taken from ``nats.micro`` because toolbus handles requests
concurrently and batches them: the counters below are updated per request by the executor, so
``num_requests`` and ``processing_time`` stay true per request.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

_PREFIX = "$SRV"
_VERBS = ("PING", "INFO", "STATS")


@dataclass(slots=True)
class EndpointStats:
    name: str
    subject: str
    queue_group: str
    num_requests: int = 0
    num_errors: int = 0
    last_error: str = ""
    processing_time_ns: int = 0

    def record(self, started_ns: int, error: str | None = None) -> None:
        self.num_requests += 1
        self.processing_time_ns += time.perf_counter_ns() - started_ns
        if error is not None:
            self.num_errors += 1
            self.last_error = error

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "subject": self.subject, "queue_group": self.queue_group}

    def stats(self) -> dict[str, Any]:
        average = self.processing_time_ns // self.num_requests if self.num_requests else 0
        return {
            **self.info(),
            "num_requests": self.num_requests,
            "num_errors": self.num_errors,
            "last_error": self.last_error,
            "processing_time": self.processing_time_ns,
            "average_processing_time": average,
        }


class ServiceDiscovery:
    def __init__(
        self,
        nc: Client,
        *,
        name: str,
        instance_id: str,
        version: str,
        description: str,
        endpoints: list[EndpointStats],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self._nc = nc
        self._name = name
        self._id = instance_id
        self._version = version
        self._description = description
        self._endpoints = endpoints
        self._metadata = metadata or {}
        self._started = datetime.now(UTC)
        self._subscriptions: list[Subscription] = []

    async def start(self) -> None:
        for verb in _VERBS:
            handler = self._handler(verb)
            for subject in (
                f"{_PREFIX}.{verb}",
                f"{_PREFIX}.{verb}.{self._name}",
                f"{_PREFIX}.{verb}.{self._name}.{self._id}",
            ):
                self._subscriptions.append(await self._nc.subscribe(subject, cb=handler))

    async def stop(self) -> None:
        for sub in self._subscriptions:
            await sub.unsubscribe()
        self._subscriptions.clear()

    def _base(self, kind: str) -> dict[str, Any]:
        return {
            "type": f"io.nats.micro.v1.{kind}_response",
            "name": self._name,
            "id": self._id,
            "version": self._version,
            "metadata": self._metadata,
        }

    def ping(self) -> dict[str, Any]:
        return self._base("ping")

    def info(self) -> dict[str, Any]:
        return {
            **self._base("info"),
            "description": self._description,
            "endpoints": [endpoint.info() for endpoint in self._endpoints],
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self._base("stats"),
            "started": self._started.isoformat().replace("+00:00", "Z"),
            "endpoints": [endpoint.stats() for endpoint in self._endpoints],
        }

    def _handler(self, verb: str) -> Any:
        render = {"PING": self.ping, "INFO": self.info, "STATS": self.stats}[verb]

        async def respond(msg: Msg) -> None:
            if msg.reply:
                await self._nc.publish(msg.reply, json.dumps(render()).encode())

        return respond
