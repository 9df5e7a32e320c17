"""An executor's configuration: one value object, built from the settings in one place."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.subjects import Subjects

from ._dispatch import DEFAULT_ABANDONED_GRACE_S, DEFAULT_RESULT_GRACE_S
from ._worker_config import DEFAULT_RELEASE_WAIT_S
from .settings import (
    DEFAULT_ACQUIRE_TIMEOUT_S,
    DEFAULT_ARTIFACT_TIMEOUT_S,
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CALLS_PER_TRAJECTORY,
    DEFAULT_MAX_PENDING_CALLS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_TIMEOUT_S,
    MAX_TIMEOUT_S,
    MIN_TIMEOUT_S,
    Settings,
)

DEFAULT_DRAIN_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorConfig:
    subjects: Subjects = Subjects()
    token: str | None = None
    acquire_timeout_s: float = DEFAULT_ACQUIRE_TIMEOUT_S
    batch_window_ms: int = DEFAULT_BATCH_WINDOW_MS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS
    max_calls_per_trajectory: int = DEFAULT_MAX_CALLS_PER_TRAJECTORY
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    default_timeout_s: float = DEFAULT_TIMEOUT_S
    max_timeout_s: float = MAX_TIMEOUT_S
    artifact_timeout_s: float = DEFAULT_ARTIFACT_TIMEOUT_S
    tool_server_url: str | None = None
    tool_server_token: str | None = None
    result_grace_s: float = DEFAULT_RESULT_GRACE_S
    abandoned_grace_s: float = DEFAULT_ABANDONED_GRACE_S  # see _dispatch.py
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    worker_release_wait_s: float = DEFAULT_RELEASE_WAIT_S

    def clamp_timeout(self, requested: float | None) -> float:
        value = self.default_timeout_s if requested is None else requested
        return min(max(value, MIN_TIMEOUT_S), self.max_timeout_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> ExecutorConfig:
        return cls(
            subjects=Subjects(prefix=settings.prefix),
            token=settings.token,
            acquire_timeout_s=settings.acquire_timeout_s,
            batch_window_ms=settings.batch_window_ms,
            max_batch_size=settings.max_batch_size,
            max_batch_bytes=settings.max_batch_bytes,
            max_pending_calls=settings.max_pending_calls,
            max_calls_per_trajectory=settings.max_calls_per_trajectory,
            max_request_bytes=settings.max_request_bytes,
            default_timeout_s=settings.default_timeout_s,
            max_timeout_s=settings.max_timeout_s,
            artifact_timeout_s=settings.artifact_timeout_s,
            tool_server_url=settings.tool_server_url,
            tool_server_token=settings.tool_server_token,
        )
