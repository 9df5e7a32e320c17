"""The settings' defaults and bounds, as plain constants.

``Settings`` (``settings.py``) takes its defaults from here, and so do the executor's and the
worker's configs, the sandbox contract and the client, which default to the same values without
reading any configuration. ``from services.settings import DEFAULT_...`` finds them too.
"""

DEFAULT_PORT = 4222
DEFAULT_SLOTS = 10
# Sandboxes started ahead of trajectories, per worker: a burst of new trajectories' first calls
# start none, at the memory of a few idle sandboxes (README, Configuration).
DEFAULT_WARM_SLOTS = 8
DEFAULT_SPARE_SLOTS = 4
DEFAULT_ACQUIRE_TIMEOUT_S = 30.0
DEFAULT_BATCH_WINDOW_MS = 20
DEFAULT_MAX_BATCH_SIZE = 200
DEFAULT_MAX_BATCH_BYTES = 768 * 1024  # stays under nats-server's default 1 MiB max_payload
DEFAULT_TIMEOUT_S = 30.0
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = 600.0
DEFAULT_MAX_OUTPUT_CHARS = 50_000
DEFAULT_MAX_FILE_CHARS = 100_000
DEFAULT_MAX_ARTIFACT_BYTES = 5_000_000
DEFAULT_MAX_ARTIFACT_ENTRIES = 5_000
DEFAULT_ARTIFACTS_BUCKET = "toolbus-artifacts"
DEFAULT_ARTIFACTS_TTL_S = 24 * 3600.0
DEFAULT_ARTIFACT_INLINE_BYTES = 256 * 1024  # larger reads go to the Object Store
DEFAULT_ARTIFACT_TIMEOUT_S = 300.0
DEFAULT_MAX_UPLOAD_MB = 1024
DEFAULT_MAX_UPLOAD_ENTRIES = 200_000
DEFAULT_MAX_REQUEST_BYTES = 256 * 1024
DEFAULT_MAX_PENDING_CALLS = 10_000
# Calls of one trajectory in flight at one executor; past it 429 (README, Fair share). A slot
# runs one call at a time, so more than an agent's parallel tool calls only wait in its queue.
DEFAULT_MAX_CALLS_PER_TRAJECTORY = 64
# A registration lives 4 beats (registration_ttl_s): a worker killed is known as gone within
# about 4.5 s (README, Failures).
DEFAULT_HEARTBEAT_S = 1.0
DEFAULT_MAX_PROCESSES = 512
DEFAULT_MAX_MEMORY_MB = 4096
DEFAULT_MAX_CPU_S = 600
DEFAULT_MAX_FILE_MB = 1024
DEFAULT_MAX_TMP_MB = 512
DEFAULT_IMAGE_CACHE_MB = 20 * 1024  # a worker's unpacked images (README, Images)
DEFAULT_SANDBOX_UID_BASE = 2_000_000_000
DEFAULT_MIN_FREE_DISK_MB = 1024
DEFAULT_SLOT_IDLE_TIMEOUT_S = 3600.0
# A retry of a call (same uniq_id) within this long gets the first run's result (README, Failures).
DEFAULT_RETRY_WINDOW_S = 600.0
DEFAULT_RETRY_MEMORY_MB = 256  # per worker, for those results
# Autoscaling (README, Autoscaling): free slots kept beyond what is held and waited for, how long
# fewer workers must be wanted before one is drained, and how long a drain waits for its
# trajectories before it gives their slots up.
DEFAULT_SCALE_HEADROOM_SLOTS = 8
DEFAULT_SCALE_COOLDOWN_S = 60.0
DEFAULT_SCALE_DRAIN_TIMEOUT_S = 300.0

__all__ = [
    "DEFAULT_ACQUIRE_TIMEOUT_S",
    "DEFAULT_ARTIFACTS_BUCKET",
    "DEFAULT_ARTIFACTS_TTL_S",
    "DEFAULT_ARTIFACT_INLINE_BYTES",
    "DEFAULT_ARTIFACT_TIMEOUT_S",
    "DEFAULT_BATCH_WINDOW_MS",
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_IMAGE_CACHE_MB",
    "DEFAULT_MAX_ARTIFACT_BYTES",
    "DEFAULT_MAX_ARTIFACT_ENTRIES",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_CALLS_PER_TRAJECTORY",
    "DEFAULT_MAX_CPU_S",
    "DEFAULT_MAX_FILE_CHARS",
    "DEFAULT_MAX_FILE_MB",
    "DEFAULT_MAX_MEMORY_MB",
    "DEFAULT_MAX_OUTPUT_CHARS",
    "DEFAULT_MAX_PENDING_CALLS",
    "DEFAULT_MAX_PROCESSES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_TMP_MB",
    "DEFAULT_MAX_UPLOAD_ENTRIES",
    "DEFAULT_MAX_UPLOAD_MB",
    "DEFAULT_MIN_FREE_DISK_MB",
    "DEFAULT_PORT",
    "DEFAULT_RETRY_MEMORY_MB",
    "DEFAULT_RETRY_WINDOW_S",
    "DEFAULT_SANDBOX_UID_BASE",
    "DEFAULT_SCALE_COOLDOWN_S",
    "DEFAULT_SCALE_DRAIN_TIMEOUT_S",
    "DEFAULT_SCALE_HEADROOM_SLOTS",
    "DEFAULT_SLOTS",
    "DEFAULT_SLOT_IDLE_TIMEOUT_S",
    "DEFAULT_SPARE_SLOTS",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WARM_SLOTS",
    "MAX_TIMEOUT_S",
    "MIN_TIMEOUT_S",
]
