"""Every NATS subject, queue group, bucket and header name toolbus uses, defined once.

Public subjects start with a configurable prefix (``tools`` by default); internal ones, between
executors and sandbox workers, with ``toolbus``.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "tools"
DEFAULT_INTERNAL_PREFIX = "toolbus"
QUEUE_GROUP = "toolbus"
SERVICE_NAME = "toolbus"

LEASES_BUCKET = "toolbus-leases"
WORKERS_BUCKET = "toolbus-workers"
SCALER_BUCKET = "toolbus-scaler"  # the autoscalers' leader lease
# Trajectories waiting for a slot (a work-queue stream), and the workers' one shared consumer.
WAITING_STREAM = "toolbus-waiting"
WAITING_CONSUMER = "slot-waiters"

# ADR-32 error headers, and the header that carries a bearer token when auth is on.
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
AUTHORIZATION_HEADER = "Authorization"


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subject names for one deployment (prefixes are settings)."""

    prefix: str = DEFAULT_PREFIX
    internal: str = DEFAULT_INTERNAL_PREFIX

    # -- public: what clients call ------------------------------------------------------------
    def execute(self, tool: str) -> str:
        return f"{self.prefix}.execute.{tool}"

    @property
    def execute_wildcard(self) -> str:
        return f"{self.prefix}.execute.*"

    @property
    def execute_token_index(self) -> int:
        """Index of the tool name among the dot-separated tokens of an execute subject."""
        return self.prefix.count(".") + 2

    def artifacts(self, operation: str) -> str:
        """``read``, ``list``, ``archive`` or ``upload``."""
        return f"{self.prefix}.artifacts.{operation}"

    @property
    def artifacts_wildcard(self) -> str:
        return f"{self.prefix}.artifacts.*"

    @property
    def external_prefix(self) -> str:
        """Services that provide external tools answer on ``<this>.<tool name>``."""
        return f"{self.prefix}.external"

    @property
    def release(self) -> str:
        return f"{self.prefix}.release"

    @property
    def status(self) -> str:
        return f"{self.prefix}.status"

    @property
    def list_tools(self) -> str:
        return f"{self.prefix}.list"

    # -- internal: executors <-> workers ------------------------------------------------------
    def worker_batch(self, worker_id: str) -> str:
        return f"{self.internal}.worker.{worker_id}.batch"

    def worker_acquire(self, worker_id: str) -> str:
        return f"{self.internal}.worker.{worker_id}.acquire"

    def worker_release(self, worker_id: str) -> str:
        return f"{self.internal}.worker.{worker_id}.release"

    def worker_cancel(self, worker_id: str) -> str:
        return f"{self.internal}.worker.{worker_id}.cancel"

    def worker_drain(self, worker_id: str) -> str:
        """An autoscaler drains the worker before it is stopped (``DrainRequest``)."""
        return f"{self.internal}.worker.{worker_id}.drain"

    def executor_results(self, executor_id: str) -> str:
        return f"{self.internal}.executor.{executor_id}.results"

    def executor_offers(self, executor_id: str) -> str:
        """Where workers offer freed slots to the executor's waiting trajectories."""
        return f"{self.internal}.executor.{executor_id}.offers"

    def is_executor_offers(self, subject: str) -> bool:
        """Whether ``subject`` is some executor's offers subject (a ticket names one)."""
        head, _, rest = subject.partition(f"{self.internal}.executor.")
        executor_id, dot, tail = rest.partition(".")
        valid_id = bool(executor_id) and not any(c in executor_id for c in " \t\r\n*>")
        return head == "" and valid_id and dot == "." and tail == "offers"

    @property
    def waiting(self) -> str:
        """The subject of the waiting stream (``WAITING_STREAM``)."""
        return f"{self.internal}.waiting"
