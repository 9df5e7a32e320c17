"""A sandbox worker's configuration: one value object, built from the settings in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from schemas.subjects import Subjects

from ._artifacts import ArtifactLimits
from ._sandbox import SandboxLimits
from .settings import (
    DEFAULT_ARTIFACTS_BUCKET,
    DEFAULT_ARTIFACTS_TTL_S,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_IMAGE_CACHE_MB,
    DEFAULT_MAX_FILE_CHARS,
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_MIN_FREE_DISK_MB,
    DEFAULT_RETRY_MEMORY_MB,
    DEFAULT_RETRY_WINDOW_S,
    DEFAULT_SANDBOX_UID_BASE,
    DEFAULT_SLOT_IDLE_TIMEOUT_S,
    DEFAULT_SPARE_SLOTS,
    DEFAULT_WARM_SLOTS,
    Settings,
)

DEFAULT_DRAIN_TIMEOUT_S = 10.0
DEFAULT_RELEASE_WAIT_S = 10.0  # a release answers by then, clean or not (the clean-up goes on)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    worker_id: str
    slots: int
    workspace_root: Path
    warm_slots: int = DEFAULT_WARM_SLOTS  # free slots whose sandbox is started ahead
    spare_slots: int = DEFAULT_SPARE_SLOTS  # slots beyond ``slots``: at most ``slots`` held
    subjects: Subjects = Subjects()
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    max_file_chars: int = DEFAULT_MAX_FILE_CHARS
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    release_wait_s: float = DEFAULT_RELEASE_WAIT_S
    allow_network: bool = True
    require_sandbox: bool = False
    limits: SandboxLimits = SandboxLimits()
    sandbox_uid_base: int = DEFAULT_SANDBOX_UID_BASE
    min_free_disk_mb: int = DEFAULT_MIN_FREE_DISK_MB
    pids_cgroup: bool = True
    slot_idle_timeout_s: float = DEFAULT_SLOT_IDLE_TIMEOUT_S
    retry_window_s: float = DEFAULT_RETRY_WINDOW_S  # a retry (same uniq_id) gets the result
    retry_memory_bytes: int = DEFAULT_RETRY_MEMORY_MB * 1024 * 1024  # for those results
    artifacts_bucket: str = DEFAULT_ARTIFACTS_BUCKET
    artifacts_ttl_s: float = DEFAULT_ARTIFACTS_TTL_S
    artifact_limits: ArtifactLimits = ArtifactLimits()
    image_cache_mb: int = DEFAULT_IMAGE_CACHE_MB
    registry_auth_file: Path | None = None
    insecure_registries: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings, worker_id: str) -> WorkerConfig:
        return cls(
            worker_id=worker_id,
            slots=settings.slots,
            warm_slots=settings.warm_slots,
            spare_slots=settings.spare_slots,
            workspace_root=settings.data_dir / "workers" / worker_id,
            subjects=Subjects(prefix=settings.prefix),
            heartbeat_s=settings.heartbeat_s,
            max_output_chars=settings.max_output_chars,
            max_file_chars=settings.max_file_chars,
            allow_network=settings.allow_network,
            require_sandbox=settings.require_sandbox,
            limits=SandboxLimits(
                max_processes=settings.max_processes,
                max_memory_mb=settings.max_memory_mb,
                max_cpu_s=settings.max_cpu_s,
                max_file_mb=settings.max_file_mb,
                max_tmp_mb=settings.max_tmp_mb,
            ),
            sandbox_uid_base=settings.sandbox_uid_base,
            image_cache_mb=settings.image_cache_mb,
            registry_auth_file=settings.registry_auth_file,
            insecure_registries=frozenset(
                host.strip() for host in settings.insecure_registries.split(",") if host.strip()
            ),
            min_free_disk_mb=settings.min_free_disk_mb,
            pids_cgroup=settings.pids_cgroup,
            slot_idle_timeout_s=settings.slot_idle_timeout_s,
            retry_window_s=settings.retry_window_s,
            retry_memory_bytes=settings.retry_memory_mb * 1024 * 1024,
            artifacts_bucket=settings.artifacts_bucket,
            artifacts_ttl_s=settings.artifacts_ttl_s,
            artifact_limits=ArtifactLimits(
                max_bytes=settings.max_artifact_bytes,
                max_entries=settings.max_artifact_entries,
                inline_bytes=settings.artifact_inline_bytes,
                max_upload_bytes=settings.max_upload_mb * 1024 * 1024,
                max_upload_entries=settings.max_upload_entries,
            ),
        )
