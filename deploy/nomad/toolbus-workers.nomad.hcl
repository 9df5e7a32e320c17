# toolbus sandbox workers: each allocation is one `toolbus worker` with TOOLBUS_SLOTS slots
# (one workspace each), found by executors over NATS through the toolbus-workers KV bucket.
#
#   nomad var put nomad/jobs/toolbus-sandbox-workers nats_password=<NATS_WORKER_PASSWORD>
#   nomad job run -var 'nats_address=nats.service.consul:4222' -var worker_count=4 \
#       deploy/nomad/toolbus-workers.nomad.hcl
#   nomad job scale toolbus-sandbox-workers workers 8        # within scaling.min..max
#
# The job id matches the default of TOOLBUS_JOB_ID, and the group "workers" is what a Nomad
# backend scales. Each worker's id is its allocation id (TOOLBUS_WORKER_ID below), so the
# `toolbus status` worker list maps one to one onto `nomad alloc status <id>`.
#
# --- bubblewrap inside the container ---------------------------------------------------------
# Every slot's commands run in a bubblewrap sandbox (user, pid, ipc, uts namespaces; fresh /proc
# and /dev). Inside a Docker container that needs:
#   1. user namespaces on the host: user.max_user_namespaces > 0; on Debian kernels before 5.10
#      kernel.unprivileged_userns_clone=1; on Ubuntu 23.10+
#      kernel.apparmor_restrict_unprivileged_userns=0 (or an AppArmor profile allowing bwrap).
#   2. a seccomp profile that allows unshare/clone of namespaces and mount (Docker's default
#      blocks them): security_opt seccomp=unconfined (or a custom profile).
#   3. no AppArmor mount denial: security_opt apparmor=unconfined (Docker's default profile
#      denies mount).
#   4. an unmasked /proc: the kernel refuses a fresh proc mount while paths of the container's
#      /proc are masked (Docker masks /proc/kcore, /proc/keys, ...). The docker CLI's
#      `--security-opt systempaths=unconfined` unmasks them, but the CLI translates it into
#      HostConfig fields for which, as far as we know, the Nomad docker driver has no option.
# `privileged = true` covers 2-4 at once, and is therefore the default here; it requires
# `allow_privileged = true` in the docker plugin config of the Nomad clients:
#     plugin "docker" { config { allow_privileged = true } }
# With privileged = false the container gets only 2 and 3, bwrap fails at its /proc mount, and
# the worker exits at start ("require_sandbox is set but bubblewrap cannot run"), or, with
# require_sandbox = false, runs commands unsandboxed (results say sandboxed=false).
# The worker itself runs as the image's non-root user (uid 10001) either way.

variable "image" {
  type        = string
  default     = "toolbus-sandbox:local"
  description = "toolbus image (deploy/docker/Dockerfile)."
}

variable "nats_address" {
  type        = string
  default     = "nats.service.consul:4222"
  description = "host:port of the NATS cluster; a name that resolves to the live nodes."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "worker_count" {
  type        = number
  default     = 1
  description = "Initial number of workers (TOOLBUS_MIN_WORKERS in the seed's terms)."
}

variable "min_workers" {
  type    = number
  default = 1
}

variable "max_workers" {
  type    = number
  default = 10
}

variable "slots" {
  type        = number
  default     = 10
  description = "Slots (workspaces) per worker: TOOLBUS_SLOTS."
}

variable "allow_network" {
  type        = bool
  default     = true
  description = "Whether sandboxed commands may use the network: TOOLBUS_ALLOW_NETWORK."
}

variable "require_sandbox" {
  type        = bool
  default     = true
  description = "Fail closed when bubblewrap cannot run: TOOLBUS_REQUIRE_SANDBOX."
}

variable "privileged" {
  type        = bool
  default     = true
  description = "Run worker containers privileged (see the header); TOOLBUS_PRIVILEGED in the seed's terms."
}

variable "cpu" {
  type    = number
  default = 500 # MHz, as the seed's sandbox containers
}

variable "memory" {
  type    = number
  default = 512 # MB
}

job "toolbus-sandbox-workers" {
  type        = "service"
  datacenters = var.datacenters

  update {
    max_parallel      = 2
    health_check      = "task_states"
    min_healthy_time  = "10s"
    healthy_deadline  = "3m"
    progress_deadline = "10m"
    auto_revert       = true
  }

  group "workers" {
    count = var.worker_count

    # Bounds for `nomad job scale` and the Nomad API's scale endpoint (what a backend calls).
    scaling {
      enabled = true
      min     = var.min_workers
      max     = var.max_workers
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    reschedule {
      delay          = "30s"
      delay_function = "exponential"
      max_delay      = "10m"
      unlimited      = true
    }

    # Workspaces live in the allocation's data directory (world-writable, so the non-root user
    # can use it). They are not migrated: a replaced allocation is a new worker id, and its
    # trajectories' leases point at a worker that is gone.
    ephemeral_disk {
      size = 2048 # MB
    }

    task "worker" {
      driver = "docker"

      config {
        image      = var.image
        args       = ["worker"]
        privileged = var.privileged
        # Without privileged: the seccomp and AppArmor parts (see the header).
        security_opt = var.privileged ? [] : ["seccomp=unconfined", "apparmor=unconfined"]
      }

      # On stop (scale-down, `nomad alloc stop`, a new version): SIGTERM -> the worker stops
      # accepting, deregisters from toolbus-workers, waits up to 10 s for running calls, then
      # kills the rest. kill_timeout must exceed that; Nomad clients cap it at their
      # max_kill_timeout (30 s by default).
      kill_signal  = "SIGTERM"
      kill_timeout = "20s"

      template {
        destination = "secrets/nats.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/toolbus-sandbox-workers" }}
          TOOLBUS_NATS_URL=nats://worker:{{ .nats_password }}@${var.nats_address}
          {{ end }}
        EOT
      }

      env {
        TOOLBUS_WORKER_ID       = "${NOMAD_ALLOC_ID}"
        TOOLBUS_SLOTS           = var.slots
        TOOLBUS_ALLOW_NETWORK   = var.allow_network
        TOOLBUS_REQUIRE_SANDBOX = var.require_sandbox
        TOOLBUS_DATA_DIR        = "${NOMAD_ALLOC_DIR}/data/toolbus"
        TOOLBUS_LOG_FORMAT      = "json"
        TOOLBUS_LOG_LEVEL       = "info"
      }

      resources {
        cpu    = var.cpu
        memory = var.memory
      }
    }
  }
}
