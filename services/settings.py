"""All configuration, read in one place: CLI flags > environment > ``.env`` > defaults.

Every field is settable by a flag (``--batch-window-ms``) and by ``TOOLBUS_<FIELD>``
(``TOOLBUS_BATCH_WINDOW_MS``). The seed service's ``TOOL_EXECUTOR_*`` names are accepted too.
Everything else in toolbus receives the values it needs as arguments; nothing reads the
environment on its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.subjects import DEFAULT_PREFIX

# The defaults and bounds (DEFAULT_*, MIN_TIMEOUT_S, MAX_TIMEOUT_S, listed in the module's
# __all__): the fields below use them, and they are importable from here. mypy checks each
# name used; ruff cannot see through the star.
# ruff: noqa: F405
from ._setting_defaults import *  # noqa: F403


def default_data_dir() -> Path:
    """/var/lib/toolbus for root (sandbox users must be able to reach the workspaces), else
    the user's XDG data directory."""
    if os.geteuid() == 0:
        return Path("/var/lib/toolbus")
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "toolbus"


def _env(field: str, *seed_names: str) -> Any:
    """Accept ``TOOLBUS_<FIELD>``, then the seed's names, and the field name as a keyword."""
    return AliasChoices(f"TOOLBUS_{field.upper()}", *seed_names, field)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    # -- NATS and the embedded server ---------------------------------------------------------
    nats_url: str | None = Field(
        default=None,
        validation_alias=_env("nats_url"),
        description="Join this NATS server; without it `serve` starts an embedded one.",
    )
    host: str = Field(
        default="127.0.0.1", validation_alias=_env("host"), description="Embedded server address."
    )
    port: int = Field(
        default=DEFAULT_PORT,
        ge=0,
        le=65535,
        validation_alias=_env("port"),
        description="Embedded server client port (0 picks a free one).",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        validation_alias=_env("data_dir"),
        description="JetStream storage and slot workspaces live under this directory.",
    )
    prefix: str = Field(
        default=DEFAULT_PREFIX,
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        validation_alias=_env("prefix"),
        description="Prefix of the public subjects (tools.execute.*, tools.release, ...).",
    )
    token: str | None = Field(
        default=None,
        validation_alias=_env("token", "TOOL_EXECUTOR_TOKEN"),
        description="Bearer token clients must send in the Authorization header (off if unset).",
    )

    # -- workers and where they run -----------------------------------------------------------
    workers: int = Field(
        default=1,
        ge=0,
        validation_alias=_env("workers"),
        description="Local sandbox workers `serve` starts.",
    )
    slots: int = Field(
        default=DEFAULT_SLOTS,
        ge=1,
        le=10_000,
        validation_alias=_env("slots", "TOOL_EXECUTOR_SLOTS"),
        description="Slots (workspaces) per worker.",
    )
    warm_slots: int = Field(
        default=DEFAULT_WARM_SLOTS,
        ge=0,
        le=10_000,
        validation_alias=_env("warm_slots"),
        description="Free slots per worker whose sandbox is started before a trajectory asks "
        "(0: none), so a new trajectory's first call does not wait for a sandbox to start.",
    )
    spare_slots: int = Field(
        default=DEFAULT_SPARE_SLOTS,
        ge=0,
        le=1_000,
        validation_alias=_env("spare_slots"),
        description="Slots per worker beyond --slots, kept free (and warm): a trajectory that "
        "takes a released slot's place gets one at once while the released slot is wiped. At "
        "most --slots trajectories hold a slot at once (0: none).",
    )
    worker_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        validation_alias=_env("worker_id"),
        description="Id of a worker started with `toolbus worker` (random if unset).",
    )
    backend: Literal["local", "nomad", "external"] = Field(
        default="local",
        validation_alias=_env("backend"),
        description="Where workers run: local processes, a Nomad job, or started elsewhere.",
    )
    min_workers: int = Field(
        default=1,
        ge=0,
        validation_alias=_env("min_workers", "TOOL_EXECUTOR_MIN_CONTAINERS"),
        description="Fewest workers the backend keeps.",
    )
    max_workers: int = Field(
        default=10,
        ge=1,
        validation_alias=_env("max_workers", "TOOL_EXECUTOR_MAX_CONTAINERS"),
        description="Most workers the backend starts.",
    )
    autoscale: bool = Field(
        default=False,
        validation_alias=_env("autoscale"),
        description="`serve` with a backend (local or nomad) starts and stops workers between "
        "--min-workers and --max-workers to follow the slots held and waited for (README, "
        "Autoscaling); off: --workers local ones, or --min-workers on Nomad.",
    )
    scale_headroom_slots: int = Field(
        default=DEFAULT_SCALE_HEADROOM_SLOTS,
        ge=0,
        validation_alias=_env("scale_headroom_slots"),
        description="Free slots the autoscaler keeps beyond those held and waited for.",
    )
    scale_cooldown_s: float = Field(
        default=DEFAULT_SCALE_COOLDOWN_S,
        ge=0,
        validation_alias=_env("scale_cooldown_s"),
        description="Fewer workers must be wanted this long, with no change meanwhile, before "
        "the autoscaler drains one.",
    )
    scale_drain_timeout_s: float = Field(
        default=DEFAULT_SCALE_DRAIN_TIMEOUT_S,
        ge=0,
        validation_alias=_env("scale_drain_timeout_s"),
        description="How long a worker being drained waits for its trajectories to end; then "
        "their slots are given up (their next call hears workspace_lost) and it is stopped.",
    )
    nomad_address: str = Field(
        default="http://localhost:4646",
        validation_alias=_env("nomad_address", "TOOL_EXECUTOR_NOMAD_ADDRESS"),
        description="Nomad HTTP API address (backend=nomad).",
    )
    nomad_token: str | None = Field(
        default=None,
        validation_alias=_env("nomad_token"),
        description="Nomad ACL token (backend=nomad); not passed to workers.",
    )
    nomad_nats_address: str | None = Field(
        default=None,
        validation_alias=_env("nomad_nats_address"),
        description="host:port of NATS for Nomad workers, which then log in as user 'worker' "
        "with the password in Nomad Variable nomad/jobs/<job_id> (item nats_password); unset: "
        "they get this service's nats_url (backend=nomad).",
    )
    job_id: str = Field(
        default="toolbus-sandbox-workers",
        validation_alias=_env("job_id", "TOOL_EXECUTOR_JOB_ID"),
        description="Nomad job id of the sandbox workers.",
    )
    image: str = Field(
        default="toolbus-sandbox:local",
        validation_alias=_env("image", "TOOL_EXECUTOR_IMAGE"),
        description="Container image of a sandbox worker (backend=nomad).",
    )
    privileged: bool = Field(
        default=False,
        validation_alias=_env("privileged", "TOOL_EXECUTOR_PRIVILEGED"),
        description="Run worker containers privileged (backend=nomad).",
    )
    purge_job_on_shutdown: bool = Field(
        default=True,
        validation_alias=_env("purge_job_on_shutdown", "TOOL_EXECUTOR_PURGE_JOB_ON_SHUTDOWN"),
        description="Purge the Nomad job when the service stops.",
    )
    heartbeat_s: float = Field(
        default=DEFAULT_HEARTBEAT_S,
        gt=0,
        # A registration's TTL (3 beats) stays within the 60 s its expiry marker lives, which
        # is how long a worker cut off can still write it back.
        le=15,
        validation_alias=_env("heartbeat_s"),
        description="Seconds between worker heartbeats (at most 15); 3 missed ones mark a "
        "worker gone.",
    )

    # -- scheduling ---------------------------------------------------------------------------
    acquire_timeout_s: float = Field(
        default=DEFAULT_ACQUIRE_TIMEOUT_S,
        gt=0,
        validation_alias=_env("acquire_timeout_s", "TOOL_EXECUTOR_ACQUIRE_TIMEOUT_S"),
        description="Deadline to get a slot for a new trajectory before a 503.",
    )
    batch_window_ms: int = Field(
        default=DEFAULT_BATCH_WINDOW_MS,
        ge=0,
        validation_alias=_env("batch_window_ms", "TOOL_EXECUTOR_BATCH_WINDOW_MS"),
        description="Longest a call waits to join a batch while one to its worker is in flight.",
    )
    max_batch_size: int = Field(
        default=DEFAULT_MAX_BATCH_SIZE,
        ge=1,
        validation_alias=_env("max_batch_size", "TOOL_EXECUTOR_MAX_BATCH_SIZE"),
        description="Most calls in one batch to a worker.",
    )
    max_batch_bytes: int = Field(
        default=DEFAULT_MAX_BATCH_BYTES,
        ge=1024,
        validation_alias=_env("max_batch_bytes"),
        description="Most bytes in one batch message (keep under the server's max_payload).",
    )
    max_pending_calls: int = Field(
        default=DEFAULT_MAX_PENDING_CALLS,
        ge=1,
        validation_alias=_env("max_pending_calls"),
        description="Calls one executor holds at once; past it new calls get 429.",
    )
    max_calls_per_trajectory: int = Field(
        default=DEFAULT_MAX_CALLS_PER_TRAJECTORY,
        ge=1,
        validation_alias=_env("max_calls_per_trajectory"),
        description="Calls of one trajectory one executor holds at once; past it that "
        "trajectory's new calls get 429 (too_many_calls) and the others are served.",
    )
    max_request_bytes: int = Field(
        default=DEFAULT_MAX_REQUEST_BYTES,
        ge=1024,
        validation_alias=_env("max_request_bytes"),
        description="Largest request body accepted; larger gets 413.",
    )

    # -- execution ----------------------------------------------------------------------------
    default_timeout_s: float = Field(
        default=DEFAULT_TIMEOUT_S,
        gt=0,
        validation_alias=_env("default_timeout_s"),
        description="Timeout of a call that names none (clamped to 1..max_timeout_s).",
    )
    max_timeout_s: float = Field(
        default=MAX_TIMEOUT_S,
        ge=MIN_TIMEOUT_S,
        validation_alias=_env("max_timeout_s"),
        description="Longest timeout a call may ask for.",
    )
    allow_network: bool = Field(
        default=True,
        validation_alias=_env("allow_network", "TOOL_EXECUTOR_ALLOW_NETWORK"),
        description="Whether sandboxed commands may use the network.",
    )
    require_sandbox: bool = Field(
        default=False,
        validation_alias=_env("require_sandbox"),
        description="Fail closed when the sandbox cannot run, instead of a plain process.",
    )
    max_processes: int = Field(
        default=DEFAULT_MAX_PROCESSES,
        ge=1,
        validation_alias=_env("max_processes"),
        description="Processes a slot may have at once (pids cgroup, else RLIMIT_NPROC).",
    )
    max_memory_mb: int = Field(
        default=DEFAULT_MAX_MEMORY_MB,
        ge=16,
        validation_alias=_env("max_memory_mb"),
        description="Address space of one process of a command, in MiB (RLIMIT_AS).",
    )
    max_cpu_s: int = Field(
        default=DEFAULT_MAX_CPU_S,
        ge=1,
        validation_alias=_env("max_cpu_s"),
        description="CPU seconds of one process of a command (RLIMIT_CPU).",
    )
    max_file_mb: int = Field(
        default=DEFAULT_MAX_FILE_MB,
        ge=1,
        validation_alias=_env("max_file_mb"),
        description="Largest file a command may write, in MiB (RLIMIT_FSIZE).",
    )
    max_tmp_mb: int = Field(
        default=DEFAULT_MAX_TMP_MB,
        ge=1,
        validation_alias=_env("max_tmp_mb"),
        description="Size of the sandbox's private /tmp (in memory), in MiB.",
    )
    image_cache_mb: int = Field(
        default=DEFAULT_IMAGE_CACHE_MB,
        ge=1,
        validation_alias=_env("image_cache_mb"),
        description="Disk a worker's unpacked images may take, in MiB; past it the images no "
        "slot uses, least recently used first, are removed.",
    )
    registry_auth_file: Path | None = Field(
        default=None,
        validation_alias=_env("registry_auth_file"),
        description="A Docker config.json with registry credentials (default: "
        "~/.docker/config.json).",
    )
    insecure_registries: str = Field(
        default="",
        validation_alias=_env("insecure_registries"),
        description="Comma-separated registry host[:port]s reached over plain HTTP.",
    )
    min_free_disk_mb: int = Field(
        default=DEFAULT_MIN_FREE_DISK_MB,
        ge=0,
        validation_alias=_env("min_free_disk_mb"),
        description="Running commands are stopped when the workspaces' disk has less free.",
    )
    pids_cgroup: bool = Field(
        default=True,
        validation_alias=_env("pids_cgroup"),
        description="Put each slot in a pids cgroup (v1, or delegated v2) when the host allows.",
    )
    sandbox_uid_base: int = Field(
        default=DEFAULT_SANDBOX_UID_BASE,
        ge=0,
        lt=2**31 - 1_000_000,
        validation_alias=_env("sandbox_uid_base"),
        description="When the worker runs as root, slot i's sandbox runs as host uid/gid "
        "base+i (0: as root, not advised).",
    )
    slot_idle_timeout_s: float = Field(
        default=DEFAULT_SLOT_IDLE_TIMEOUT_S,
        ge=0,
        validation_alias=_env("slot_idle_timeout_s"),
        description="A slot without a call for this long is released and wiped, as if its "
        "trajectory were released (0: never); the trajectory's next call says so.",
    )
    retry_window_s: float = Field(
        default=DEFAULT_RETRY_WINDOW_S,
        gt=0,
        le=86_400,
        validation_alias=_env("retry_window_s"),
        description="A call retried with the same uniq_id within this long of the first run's "
        "end gets that run's result (waiting for it while it runs) instead of running again.",
    )
    retry_memory_mb: int = Field(
        default=DEFAULT_RETRY_MEMORY_MB,
        ge=1,
        le=1_000_000,
        validation_alias=_env("retry_memory_mb"),
        description="Memory per worker for the results retries get; past it the oldest go, and "
        "a retry of one is refused (never run again) until the window ends.",
    )
    max_output_chars: int = Field(
        default=DEFAULT_MAX_OUTPUT_CHARS,
        ge=1,
        validation_alias=_env("max_output_chars"),
        description="Output kept per stream (stdout, stderr) of a command.",
    )
    max_file_chars: int = Field(
        default=DEFAULT_MAX_FILE_CHARS,
        ge=1,
        validation_alias=_env("max_file_chars"),
        description="Most characters read_file returns.",
    )
    max_artifact_bytes: int = Field(
        default=DEFAULT_MAX_ARTIFACT_BYTES,
        ge=1,
        validation_alias=_env("max_artifact_bytes"),
        description="Largest artifact read or archive.",
    )
    max_artifact_entries: int = Field(
        default=DEFAULT_MAX_ARTIFACT_ENTRIES,
        ge=1,
        validation_alias=_env("max_artifact_entries"),
        description="Most entries an artifact list or archive holds.",
    )
    artifacts_bucket: str = Field(
        default=DEFAULT_ARTIFACTS_BUCKET,
        pattern=r"^[A-Za-z0-9_-]+$",
        validation_alias=_env("artifacts_bucket"),
        description="JetStream Object Store bucket for artifacts (created when missing).",
    )
    artifacts_ttl_s: float = Field(
        default=DEFAULT_ARTIFACTS_TTL_S,
        ge=0,
        validation_alias=_env("artifacts_ttl_s"),
        description="How long the bucket keeps an artifact, when toolbus creates it (0: forever).",
    )
    artifact_inline_bytes: int = Field(
        default=DEFAULT_ARTIFACT_INLINE_BYTES,
        ge=0,
        le=512 * 1024,
        validation_alias=_env("artifact_inline_bytes"),
        description="Artifact reads up to this size come back in the reply; larger ones go to "
        "the Object Store.",
    )
    artifact_timeout_s: float = Field(
        default=DEFAULT_ARTIFACT_TIMEOUT_S,
        gt=0,
        validation_alias=_env("artifact_timeout_s"),
        description="Longest an artifact read, list, archive or upload may take.",
    )
    max_upload_mb: int = Field(
        default=DEFAULT_MAX_UPLOAD_MB,
        ge=1,
        validation_alias=_env("max_upload_mb"),
        description="Largest upload: the archive and what it unpacks to, each, in MiB.",
    )
    max_upload_entries: int = Field(
        default=DEFAULT_MAX_UPLOAD_ENTRIES,
        ge=1,
        validation_alias=_env("max_upload_entries"),
        description="Most entries an uploaded archive may unpack.",
    )
    tool_server_url: str | None = Field(
        default=None,
        validation_alias=_env("tool_server_url", "TOOL_EXECUTOR_TOOL_SERVER_URL"),
        description="HTTP server for external tools (web_search, ...).",
    )
    tool_server_token: str | None = Field(
        default=None,
        validation_alias=_env("tool_server_token", "TOOL_EXECUTOR_TOOL_SERVER_TOKEN"),
        description="Bearer token for the external tool server.",
    )

    # -- logging ------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias=_env("log_level"), description="Lowest level logged."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        validation_alias=_env("log_format"),
        description="auto: console on a terminal, JSON lines otherwise.",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> Settings:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) is above max_workers ({self.max_workers})"
            )
        return self
