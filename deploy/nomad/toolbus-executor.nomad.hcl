# toolbus executors: stateless NATS services (queue group "toolbus") that validate requests,
# lease trajectories to workers (JetStream KV) and batch calls to the sandbox workers.
# Run as many as load needs; any executor can serve any trajectory.
#
#   nomad var put nomad/jobs/toolbus-executor nats_password=<NATS_EXECUTOR_PASSWORD>
#   nomad job run -var 'nats_address=nats.service.consul:4222' -var executor_count=3 \
#       deploy/nomad/toolbus-executor.nomad.hcl
#
# Executors listen on no port: they dial out to NATS only.

variable "image" {
  type        = string
  default     = "toolbus-sandbox:local"
  description = "toolbus image (deploy/docker/Dockerfile); executors and workers share it."
}

variable "nats_address" {
  type        = string
  default     = "nats.service.consul:4222"
  description = "host:port of the NATS cluster; a name that resolves to the live nodes (see deploy/README.md)."
}

variable "executor_count" {
  type        = number
  default     = 2
  description = "Number of executors."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "acquire_timeout_s" {
  type    = number
  default = 30
}

variable "batch_window_ms" {
  type    = number
  default = 20
}

variable "max_batch_size" {
  type    = number
  default = 200
}

job "toolbus-executor" {
  type        = "service"
  datacenters = var.datacenters

  update {
    max_parallel      = 1
    health_check      = "task_states"
    min_healthy_time  = "10s"
    healthy_deadline  = "2m"
    progress_deadline = "5m"
    auto_revert       = true
  }

  group "executors" {
    count = var.executor_count

    # Spread executors over client nodes, so one node's loss leaves the others serving.
    spread {
      attribute = "${node.unique.id}"
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    reschedule {
      delay          = "30s"
      delay_function = "exponential"
      max_delay      = "5m"
      unlimited      = true
    }

    task "executor" {
      driver = "docker"

      config {
        image = var.image
        args  = ["executor"]
      }

      # On stop: SIGTERM -> the executor leaves the queue group, waits up to 10 s for calls in
      # flight, answers the rest with 503; kill_timeout leaves room for that.
      kill_signal  = "SIGTERM"
      kill_timeout = "20s"

      # TOOLBUS_NATS_URL carries the executor user's password, read from Nomad Variables
      # (the path nomad/jobs/<job id> is readable by this job's tasks without a policy).
      template {
        destination = "secrets/nats.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/toolbus-executor" }}
          TOOLBUS_NATS_URL=nats://executor:{{ .nats_password }}@${var.nats_address}
          {{ end }}
        EOT
      }

      # Optional bearer token clients must send (Authorization header); unset = off:
      #   add `token=...` to the Nomad variable and a line `TOOLBUS_TOKEN={{ .token }}` above.

      env {
        TOOLBUS_ACQUIRE_TIMEOUT_S = var.acquire_timeout_s
        TOOLBUS_BATCH_WINDOW_MS   = var.batch_window_ms
        TOOLBUS_MAX_BATCH_SIZE    = var.max_batch_size
        TOOLBUS_LOG_FORMAT        = "json"
        TOOLBUS_LOG_LEVEL         = "info"
      }

      resources {
        cpu    = 500 # MHz
        memory = 512 # MB
      }
    }
  }
}
