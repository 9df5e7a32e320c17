"""Sandbox workers as a Nomad service job: each allocation of the group ``workers`` runs one
``toolbus worker`` in a Docker container, and its allocation id is its worker id.

The job is the API form of ``deploy/nomad/toolbus-workers.nomad.hcl`` (same job id, group, task,
environment, privileged handling, update, restart and reschedule policies, resources), so a job
an operator ran by hand and one the backend registered are the same job. ``NomadWorkers``
registers it on enter with ``min_workers`` allocations, scales it between ``min_workers`` and
``max_workers``, removes one chosen worker, and purges the job on exit. python-nomad is
synchronous (requests), so every call runs in a thread, one call at a time.

Removing a chosen worker
------------------------
Nomad has no call that lowers a group's count *and* names the allocation to remove: it is an
open feature request (hashicorp/nomad#7876; #10056 was closed in its favour). What it has:

- ``POST /v1/job/:job_id/scale`` sets the count; on a decrease the scheduler's reconciler
  (``computeStop`` in ``scheduler/reconcile*.go``) stops allocations marked to migrate first,
  then those with the highest name index (``<job>.workers[<index>]``).
- ``POST /v1/allocation/:alloc_id/stop`` "stops and reschedules" an allocation (allocations API
  docs): ``Alloc.Stop`` marks it to migrate and creates an evaluation in the same Raft write, and
  that evaluation, with the count unchanged, places a replacement under the same name.

So neither order of the two calls is safe. Stop-then-scale: the stop's evaluation usually runs
before the scale lands and places a replacement, then the scale-down stops the highest-index
worker as well (what the reporter of #7876 saw). Scale-then-stop: the scale-down stops the
highest-index worker, then the stop replaces the chosen one. Either way an unchosen, maybe busy,
worker goes, unless both writes land before a scheduler worker snapshots the state: a race that
no API call lets a client win.

The exact way is a single write whose outcome Nomad fixes: lower the count by one when the chosen
allocation is the one the reconciler removes. ``stop_allocation`` does that, with the job's
``JobModifyIndex`` as a check-and-set, and refuses any other allocation with ``NotNextToStop``,
which names Nomad's choice; ``next_to_stop`` tells a scaler which worker to drain. A scheduler
that puts new trajectories on the lowest-index workers leaves the highest-index one idle first.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, cast
from urllib.parse import urlsplit

import nomad.api
import requests
import structlog
from nomad.api.exceptions import BaseNomadException

from services.exceptions import StartupError, ToolbusError
from services.settings import Settings

log = structlog.get_logger("toolbus.backend.nomad")

DEFAULT_ADDRESS = "http://localhost:4646"
DEFAULT_JOB_ID = "toolbus-sandbox-workers"
DEFAULT_IMAGE = "toolbus-sandbox:local"
DEFAULT_PRIVILEGED = True  # bubblewrap needs it in Docker under Nomad (see the HCL job's header)
DEFAULT_DATACENTERS: tuple[str, ...] = ("*",)
DEFAULT_MIN_WORKERS = 1
DEFAULT_MAX_WORKERS = 10
DEFAULT_PURGE_ON_SHUTDOWN = True
DEFAULT_CPU_MHZ = 500  # per container, as the seed service
DEFAULT_MEMORY_MB = 512
DEFAULT_DISK_MB = 2048  # the allocation's ephemeral disk, where the workspaces live
DEFAULT_HTTP_TIMEOUT_S = 10.0
DEFAULT_READY_TIMEOUT_S = 120.0  # first placements pull the image
DEFAULT_POLL_S = 1.0
DEFAULT_STOP_CONFIRM_S = 30.0

GROUP: Final = "workers"
TASK: Final = "worker"
WORKER_ID_ENV: Final = "${NOMAD_ALLOC_ID}"
DATA_DIR_ENV: Final = "${NOMAD_ALLOC_DIR}/data/toolbus"

#: Variables of this host or of the backend itself, wrong inside a worker's container, and
#: secrets only the executor uses.
NOT_FOR_WORKERS: Final = frozenset(
    {
        "TOOLBUS_DATA_DIR",
        "TOOLBUS_WORKER_ID",
        "TOOLBUS_HOST",
        "TOOLBUS_PORT",
        "TOOLBUS_WORKERS",
        "TOOLBUS_BACKEND",
        "TOOLBUS_MIN_WORKERS",
        "TOOLBUS_MAX_WORKERS",
        "TOOLBUS_NOMAD_ADDRESS",
        "TOOLBUS_NOMAD_TOKEN",
        "TOOLBUS_NOMAD_NATS_ADDRESS",
        "TOOLBUS_JOB_ID",
        "TOOLBUS_IMAGE",
        "TOOLBUS_PRIVILEGED",
        "TOOLBUS_PURGE_JOB_ON_SHUTDOWN",
        "TOOLBUS_TOKEN",
        "TOOLBUS_TOOL_SERVER_URL",
        "TOOLBUS_TOOL_SERVER_TOKEN",
    }
)

_S = 1_000_000_000  # the JSON job API gives durations in nanoseconds
_LIVE_CLIENT_STATUSES = frozenset({"pending", "running"})
_TERMINAL_CLIENT_STATUSES = frozenset({"complete", "failed", "lost"})
_FAILURE_EVENTS = frozenset(
    {
        "Setup Failure",
        "Driver Failure",
        "Failed Validation",
        "Failed Artifact Download",
        "Not Restarting",
        "Terminated",
        "Sibling Task Failed",
    }
)
_EVENT_TEXT_FIELDS = (
    "DisplayMessage",
    "DriverError",
    "SetupError",
    "ValidationError",
    "DownloadError",
    "Message",
)
_NAME_INDEX = re.compile(r"\[(\d+)\]$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_BODY_SHOWN = 500


class BackendError(ToolbusError):
    """A worker backend could not do what was asked of it after start (scale, stop, purge)."""


class NomadApiError(BackendError):
    """Nomad refused a call (``status`` and ``body`` as it answered) or did not answer
    (``status`` None)."""

    def __init__(self, message: str, *, status: int | None, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def deployment_active(self) -> bool:
        """Nomad refuses to scale while a deployment of the job runs, and the job's update block
        starts one on every change of count: retry once it is healthy (min_healthy_time)."""
        return self.status == 400 and "active deployment" in self.body


class NotNextToStop(BackendError):
    """The allocation asked for is not the one Nomad removes on a scale-down by one."""

    def __init__(self, message: str, *, allocation_id: str, next_to_stop: WorkerAllocation | None):
        super().__init__(message)
        self.allocation_id = allocation_id
        self.next_to_stop = next_to_stop


# -- configuration and the job ------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class NomadConfig:
    """Where Nomad is and what the workers job looks like; the defaults are the HCL job's.

    ``worker_env`` goes into the task's ``Env`` as it is: ``TOOLBUS_*`` settings for the worker,
    ``TOOLBUS_NATS_URL`` with the ``worker`` user's credentials among them. Anyone who may read
    the job sees them; with ``nats_address`` set instead, the URL is built inside the allocation
    from the Nomad Variable ``nomad/jobs/<job_id>`` (item ``nats_password``), as the HCL job
    does, and stays out of the job. ``token`` is the ACL token (what ``NOMAD_TOKEN`` holds for
    the CLI), passed here, never read from the environment.
    """

    address: str = DEFAULT_ADDRESS
    job_id: str = DEFAULT_JOB_ID
    image: str = DEFAULT_IMAGE
    privileged: bool = DEFAULT_PRIVILEGED
    datacenters: tuple[str, ...] = DEFAULT_DATACENTERS
    min_workers: int = DEFAULT_MIN_WORKERS
    max_workers: int = DEFAULT_MAX_WORKERS
    purge_on_shutdown: bool = DEFAULT_PURGE_ON_SHUTDOWN
    worker_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    nats_address: str | None = None
    cpu_mhz: int = DEFAULT_CPU_MHZ
    memory_mb: int = DEFAULT_MEMORY_MB
    disk_mb: int = DEFAULT_DISK_MB
    namespace: str | None = None
    region: str | None = None
    token: str | None = field(default=None, repr=False)
    timeout_s: float = DEFAULT_HTTP_TIMEOUT_S

    def __post_init__(self) -> None:
        if not _SAFE_ID.match(self.job_id):
            raise StartupError(f"Nomad job id {self.job_id!r}: use letters, digits, '.', '_', '-'")
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise StartupError(
                f"Nomad workers: need 0 <= min_workers ({self.min_workers}) <= max_workers "
                f"({self.max_workers}) and max_workers >= 1"
            )
        if self.cpu_mhz < 1 or self.memory_mb < 1 or self.disk_mb < 1:
            raise StartupError("Nomad workers: cpu_mhz, memory_mb and disk_mb must be positive")
        if not urlsplit(self.address).scheme.startswith("http"):
            raise StartupError(f"Nomad address {self.address!r} is not an http(s) URL")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        worker_env: Mapping[str, str],
        *,
        token: str | None = None,
        namespace: str | None = None,
        region: str | None = None,
        nats_address: str | None = None,
    ) -> NomadConfig:
        """The service's settings; ``worker_env`` may be all of the service's ``TOOLBUS_*``
        variables: those a worker in a container must not get are left out (``worker_env_from``).
        """
        env = worker_env_from(worker_env)
        if nats_address is not None:
            env.pop("TOOLBUS_NATS_URL", None)
        return cls(
            address=settings.nomad_address,
            job_id=settings.job_id,
            image=settings.image,
            privileged=settings.privileged,
            min_workers=settings.min_workers,
            max_workers=settings.max_workers,
            purge_on_shutdown=settings.purge_job_on_shutdown,
            worker_env=env,
            nats_address=nats_address,
            token=token,
            namespace=namespace,
            region=region,
        )


def worker_env_from(env: Mapping[str, str]) -> dict[str, str]:
    """The ``TOOLBUS_*`` and ``OTEL_*`` variables of ``env`` that suit a worker in a container:
    not the host's PATH or HOME (the image has its own), not ``NOT_FOR_WORKERS``."""
    return {
        name: value
        for name, value in env.items()
        if name.startswith(("TOOLBUS_", "OTEL_")) and name not in NOT_FOR_WORKERS
    }


def worker_job(config: NomadConfig, *, count: int | None = None) -> dict[str, Any]:
    """The workers job in Nomad's JSON job form (``Job`` of ``POST /v1/jobs``), equal to
    ``deploy/nomad/toolbus-workers.nomad.hcl`` run with the same values; ``count`` defaults to
    ``min_workers``."""
    env = dict(config.worker_env)
    for name, default in (
        ("TOOLBUS_REQUIRE_SANDBOX", "true"),
        ("TOOLBUS_LOG_FORMAT", "json"),
        ("TOOLBUS_LOG_LEVEL", "info"),
    ):
        env.setdefault(name, default)
    env["TOOLBUS_WORKER_ID"] = WORKER_ID_ENV
    env["TOOLBUS_DATA_DIR"] = DATA_DIR_ENV
    task: dict[str, Any] = {
        "Name": TASK,
        "Driver": "docker",
        "Config": {
            "image": config.image,
            "args": ["worker"],
            "privileged": config.privileged,
            # Without privileged: the seccomp and AppArmor parts (see the HCL job's header).
            "security_opt": []
            if config.privileged
            else ["seccomp=unconfined", "apparmor=unconfined"],
        },
        # SIGTERM drains a worker for up to 10 s; clients cap this at max_kill_timeout (30 s).
        "KillSignal": "SIGTERM",
        "KillTimeout": 20 * _S,
        "Env": env,
        "Resources": {"CPU": config.cpu_mhz, "MemoryMB": config.memory_mb},
    }
    if config.nats_address is not None:
        env.pop("TOOLBUS_NATS_URL", None)
        task["Templates"] = [
            {
                "DestPath": "secrets/nats.env",
                "Envvars": True,
                "ChangeMode": "restart",
                "EmbeddedTmpl": (
                    f'{{{{ with nomadVar "nomad/jobs/{config.job_id}" }}}}\n'
                    "TOOLBUS_NATS_URL=nats://worker:{{ .nats_password }}@"
                    f"{config.nats_address}\n"
                    "{{ end }}\n"
                ),
            }
        ]
    job: dict[str, Any] = {
        "ID": config.job_id,
        "Name": config.job_id,
        "Type": "service",
        "Datacenters": list(config.datacenters),
        "Update": {
            "MaxParallel": 2,
            "HealthCheck": "task_states",
            "MinHealthyTime": 10 * _S,
            "HealthyDeadline": 180 * _S,
            "ProgressDeadline": 600 * _S,
            "AutoRevert": True,
        },
        "TaskGroups": [
            {
                "Name": GROUP,
                "Count": config.min_workers if count is None else count,
                # Nomad itself refuses counts outside these bounds on scale and register.
                "Scaling": {
                    "Enabled": True,
                    "Min": config.min_workers,
                    "Max": config.max_workers,
                },
                "RestartPolicy": {
                    "Attempts": 3,
                    "Interval": 300 * _S,
                    "Delay": 15 * _S,
                    "Mode": "delay",
                },
                "ReschedulePolicy": {
                    "Delay": 30 * _S,
                    "DelayFunction": "exponential",
                    "MaxDelay": 600 * _S,
                    "Unlimited": True,
                },
                "EphemeralDisk": {"SizeMB": config.disk_mb},
                "Tasks": [task],
            }
        ],
    }
    if config.namespace:
        job["Namespace"] = config.namespace
    if config.region:
        job["Region"] = config.region
    return job


# -- allocations ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class WorkerAllocation:
    """One allocation of the workers group as Nomad lists it; ``id`` is the worker's id."""

    id: str
    name: str  # "<job>.workers[<index>]"
    index: int  # -1 if the name has none
    client_status: str  # pending, running, complete, failed, lost, unknown
    desired_status: str  # run, stop, evict
    migrating: bool  # marked by an allocation stop or a node drain, not moved yet
    replaced_by: str | None  # NextAllocation: the one Nomad placed for it (reschedule, migration)
    create_index: int
    last_failure: str | None  # the latest failure its tasks reported, in Nomad's words

    @property
    def live(self) -> bool:
        return self.desired_status == "run" and self.client_status in _LIVE_CLIENT_STATUSES

    @classmethod
    def from_api(cls, stub: Mapping[str, Any]) -> WorkerAllocation:
        name = str(stub.get("Name") or "")
        match = _NAME_INDEX.search(name)
        transition = stub.get("DesiredTransition") or {}
        return cls(
            id=str(stub["ID"]),
            name=name,
            index=int(match.group(1)) if match else -1,
            client_status=str(stub.get("ClientStatus") or ""),
            desired_status=str(stub.get("DesiredStatus") or ""),
            migrating=bool(transition.get("Migrate")),
            replaced_by=str(stub.get("NextAllocation") or "") or None,
            create_index=int(stub.get("CreateIndex") or 0),
            last_failure=_last_failure(stub),
        )


def _last_failure(stub: Mapping[str, Any]) -> str | None:
    """Per task, the newest event that failed it (driver, setup, exit...), with Nomad's text."""
    found: list[str] = []
    for task, state in sorted((stub.get("TaskStates") or {}).items()):
        for event in reversed((state or {}).get("Events") or []):
            kind = str(event.get("Type") or "")
            if not (event.get("FailsTask") or kind in _FAILURE_EVENTS):
                continue
            if kind == "Terminated" and not event.get("ExitCode"):
                continue  # a clean exit, e.g. after Nomad's own SIGTERM
            text = next((str(event[key]) for key in _EVENT_TEXT_FIELDS if event.get(key)), "")
            found.append(f"task {task}: {kind}" + (f": {text}" if text else ""))
            break
    if found:
        return "; ".join(found)
    if stub.get("ClientStatus") == "failed":
        return str(stub.get("ClientDescription") or "failed")
    return None


def scale_down_victim(
    allocations: Iterable[WorkerAllocation], *, count: int
) -> WorkerAllocation | None:
    """The allocation Nomad stops when the group's count drops from ``count`` by one, or None
    when that is not certain.

    The reconciler's rule: allocations marked to migrate first, then the highest name index.
    Only a settled group is predicted: exactly ``count`` allocations meant to run, each pending
    or running, no two with one name (a failed one already replaced does not count). A failed
    allocation waiting to be rescheduled, one on a lost node or a placement not made yet gives
    Nomad other candidates.
    """
    wanted = [
        allocation
        for allocation in allocations
        if allocation.desired_status == "run"
        and not (allocation.replaced_by and allocation.client_status in _TERMINAL_CLIENT_STATUSES)
    ]
    if not wanted or len(wanted) != count:
        return None
    if any(not allocation.live or allocation.index < 0 for allocation in wanted):
        return None
    if len({allocation.index for allocation in wanted}) != len(wanted):
        return None
    migrating = [allocation for allocation in wanted if allocation.migrating]
    return max(migrating or wanted, key=lambda allocation: allocation.index)


# -- the HTTP API -------------------------------------------------------------------------------
class _NomadApi:
    """python-nomad's endpoints with every setting explicit (its ``Nomad()`` falls back to the
    NOMAD_* environment variables; toolbus reads the environment in services/settings.py only),
    on one requests session, with errors as ``NomadApiError``. Blocking: call from a thread."""

    def __init__(self, config: NomadConfig) -> None:
        self.address = config.address.rstrip("/")
        self._session = requests.Session()
        options: dict[str, Any] = {
            "address": self.address,
            "namespace": config.namespace,
            "token": config.token,
            "region": config.region,
            "timeout": config.timeout_s,
            "verify": True,  # python-nomad's default is False: no unverified TLS here
            "session": self._session,
        }
        self._jobs = nomad.api.Jobs(**options)
        self._job = nomad.api.Job(**options)

    def close(self) -> None:
        self._session.close()

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except BaseNomadException as exc:
            raise _api_error(self.address, what, exc.nomad_resp) from None
        except ValueError as exc:  # a 2xx body that is not JSON
            raise NomadApiError(
                f"Nomad at {self.address}: {what} answered with a body that is not JSON: {exc}",
                status=None,
                body="",
            ) from None

    def register(self, job: Mapping[str, Any]) -> dict[str, Any]:
        reply = self._call("POST /v1/jobs", lambda: self._jobs.register_job({"Job": job}))
        return cast(dict[str, Any], reply)

    def read_job(self, job_id: str) -> dict[str, Any] | None:
        try:
            reply = self._call(f"GET /v1/job/{job_id}", lambda: self._job.get_job(job_id))
        except NomadApiError as exc:
            if exc.status == 404:
                return None
            raise
        return cast(dict[str, Any], reply)

    def scale(self, job_id: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        reply = self._call(
            f"POST /v1/job/{job_id}/scale",
            lambda: self._job.request(job_id, "scale", json=payload, method="post").json(),
        )
        return cast(dict[str, Any], reply)

    def allocations(self, job_id: str) -> list[dict[str, Any]]:
        reply = self._call(
            f"GET /v1/job/{job_id}/allocations", lambda: self._job.get_allocations(job_id)
        )
        return cast(list[dict[str, Any]], reply)

    def deregister(self, job_id: str, *, purge: bool) -> dict[str, Any]:
        flag = "true" if purge else "false"
        reply = self._call(
            f"DELETE /v1/job/{job_id}?purge={flag}",
            lambda: self._job.request(job_id, params={"purge": flag}, method="delete").json(),
        )
        return cast(dict[str, Any], reply)


def _api_error(address: str, what: str, cause: object) -> NomadApiError:
    if isinstance(cause, requests.Response):
        body = cause.text.strip()
        shown = body if len(body) <= _MAX_BODY_SHOWN else body[:_MAX_BODY_SHOWN] + "..."
        return NomadApiError(
            f"Nomad at {address}: {what} answered {cause.status_code}: {shown or '(empty body)'}",
            status=cause.status_code,
            body=body,
        )
    return NomadApiError(f"Nomad at {address} did not answer {what}: {cause}", status=None, body="")


def _group_count(job: Mapping[str, Any]) -> int:
    for group in job.get("TaskGroups") or []:
        if group.get("Name") == GROUP:
            return int(group.get("Count") or 0)
    raise BackendError(f"Nomad job {job.get('ID')!r} has no task group {GROUP!r}")


# -- the backend ----------------------------------------------------------------------------------
class NomadWorkers:
    """The workers job for the life of the service, as ``LocalWorkers`` is for processes:
    registered (or updated) on enter with ``min_workers`` allocations, purged on exit when
    ``purge_on_shutdown``, else left running for the next start."""

    def __init__(self, config: NomadConfig, *, poll_s: float = DEFAULT_POLL_S) -> None:
        self._config = config
        self._poll_s = poll_s
        self._api = _NomadApi(config)
        # One call at a time: requests sessions are not documented as thread-safe, and
        # stop_allocation's read-decide-write must not interleave with a scale.
        self._lock = asyncio.Lock()
        self._count = config.min_workers
        self._registered_index = 0

    @property
    def config(self) -> NomadConfig:
        return self._config

    @property
    def count(self) -> int:
        """The group count toolbus last set."""
        return self._count

    async def __aenter__(self) -> NomadWorkers:
        config = self._config
        if config.nats_address is None and "TOOLBUS_NATS_URL" not in config.worker_env:
            self._api.close()
            raise StartupError(
                "Nomad workers need TOOLBUS_NATS_URL (a NATS URL their containers can reach, "
                "with the worker user's credentials) or nats_address"
            )
        self._warn_if_loopback()
        try:
            async with self._lock:
                reply = await asyncio.to_thread(self._api.register, worker_job(config))
        except NomadApiError as exc:
            self._api.close()
            raise StartupError(f"could not register the workers job: {exc}") from None
        self._registered_index = int(reply.get("JobModifyIndex") or 0)
        if warnings := reply.get("Warnings"):
            log.warning("nomad warns about the workers job", warnings=warnings)
        log.info(
            "nomad workers job registered",
            address=self._api.address,
            job_id=config.job_id,
            count=config.min_workers,
            eval_id=reply.get("EvalID"),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        job_id = self._config.job_id
        try:
            if not self._config.purge_on_shutdown:
                log.info("nomad workers job left running", job_id=job_id, count=self._count)
                return
            async with self._lock:
                await asyncio.to_thread(self._api.deregister, job_id, purge=True)
            log.info("nomad workers job purged", job_id=job_id)
        except NomadApiError as error:
            if error.status == 404:
                log.info("nomad workers job was already gone", job_id=job_id)
                return
            log.error("could not purge the workers job", job_id=job_id, error=str(error))
            if exc is None:  # do not hide the error that is already on its way out
                raise BackendError(
                    f"could not purge the workers job {job_id!r}, its containers keep running: "
                    f"{error}"
                ) from None
        finally:
            self._api.close()

    # -- reading ------------------------------------------------------------------------------
    async def job(self) -> dict[str, Any]:
        """The workers job as Nomad has it now."""
        async with self._lock:
            return await self._read_job()

    async def allocations(self) -> list[WorkerAllocation]:
        """Every allocation of the group Nomad still lists, stopped ones too, by name index."""
        async with self._lock:
            return await self._allocations()

    async def next_to_stop(self) -> WorkerAllocation | None:
        """The worker a scale-down by one removes now: the one to drain before
        ``stop_allocation``. None at ``min_workers`` or while Nomad's choice is not certain."""
        async with self._lock:
            count = _group_count(await self._read_job())
            if count <= self._config.min_workers:
                return None
            return scale_down_victim(await self._allocations(), count=count)

    # -- changing the count ---------------------------------------------------------------------
    async def scale(self, count: int) -> int:
        """Set the number of workers, clamped to ``min_workers..max_workers``; returns the count
        set. On a decrease Nomad chooses which workers go (the highest name indexes).

        Raises NomadApiError; its ``deployment_active`` says Nomad refused because the last
        change is still being deployed.
        """
        target = max(self._config.min_workers, min(self._config.max_workers, count))
        if target != count:
            log.info("worker count clamped", asked=count, count=target)
        async with self._lock:
            current = _group_count(await self._read_job())
            if current != target:
                await self._scale(target, message=f"toolbus: {current} -> {target} workers")
            self._count = target
        return target

    async def stop_allocation(
        self, alloc_id: str, *, confirm_timeout_s: float = DEFAULT_STOP_CONFIRM_S
    ) -> None:
        """Remove the worker ``alloc_id`` and lower the count by one, touching no other worker.

        Only exact for the allocation Nomad itself removes on a scale-down (see the module
        docstring): for any other this raises ``NotNextToStop`` naming that one, and changes
        nothing. The scale carries the job's ``JobModifyIndex``, so a job changed since it was
        read is refused rather than scaled on a stale decision. Returns once Nomad has marked
        the allocation to stop; raises BackendError if it stopped another one.
        """
        if not _SAFE_ID.match(alloc_id):
            raise BackendError(f"{alloc_id!r} is not an allocation id")
        job_id = self._config.job_id
        async with self._lock:
            job = await self._read_job()
            count = _group_count(job)
            allocations = await self._allocations()
            chosen = next((a for a in allocations if a.id == alloc_id), None)
            if chosen is None or not chosen.live:
                state = "not listed" if chosen is None else chosen.client_status
                raise BackendError(
                    f"allocation {alloc_id} is not a running worker of Nomad job {job_id!r} "
                    f"({state})"
                )
            if count - 1 < self._config.min_workers:
                raise BackendError(
                    f"cannot stop worker {alloc_id}: Nomad job {job_id!r} is at "
                    f"min_workers ({self._config.min_workers})"
                )
            victim = scale_down_victim(allocations, count=count)
            if victim is None or victim.id != alloc_id:
                raise NotNextToStop(
                    _not_next_message(chosen, victim, job_id),
                    allocation_id=alloc_id,
                    next_to_stop=victim,
                )
            others = {a.id for a in allocations if a.live and a.id != alloc_id}
            await self._scale(
                count - 1,
                message=f"toolbus: stop worker {alloc_id}",
                job_modify_index=int(job.get("JobModifyIndex") or 0),
            )
            self._count = count - 1
            await self._confirm_stopped(alloc_id, others, timeout_s=confirm_timeout_s)
        log.info("nomad worker stopped", worker_id=alloc_id, name=chosen.name, count=count - 1)

    # -- startup --------------------------------------------------------------------------------
    async def wait_registered(
        self, registered: Callable[[], int], *, timeout_s: float = DEFAULT_READY_TIMEOUT_S
    ) -> None:
        """Return once ``registered()`` (workers registered over NATS) reaches the group count.

        Raises StartupError naming each allocation that failed, with the event Nomad recorded
        for it, or, at the deadline, how many allocations run and what the others report.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        next_poll = loop.time()
        allocations: list[WorkerAllocation] = []
        while registered() < self._count:
            now = loop.time()
            if now >= next_poll:
                try:
                    allocations = await self.allocations()
                except NomadApiError as exc:
                    raise StartupError(f"while waiting for the workers: {exc}") from None
                next_poll = now + self._poll_s
                failed = [
                    a
                    for a in allocations
                    if a.client_status == "failed" and a.create_index >= self._registered_index
                ]
                if failed:
                    raise StartupError(
                        "Nomad workers failed at start: "
                        + "; ".join(
                            f"allocation {a.id} ({a.name}) failed: {a.last_failure}" for a in failed
                        )
                    )
            if now > deadline:
                raise StartupError(self._not_ready_message(allocations, registered(), timeout_s))
            await asyncio.sleep(min(0.05, self._poll_s))

    # -- internals ------------------------------------------------------------------------------
    async def _read_job(self) -> dict[str, Any]:
        job = await asyncio.to_thread(self._api.read_job, self._config.job_id)
        if job is None:
            raise BackendError(
                f"Nomad job {self._config.job_id!r} is not on Nomad at {self._api.address} "
                "(stopped or purged from outside?)"
            )
        return job

    async def _allocations(self) -> list[WorkerAllocation]:
        stubs = await asyncio.to_thread(self._api.allocations, self._config.job_id)
        found = [
            WorkerAllocation.from_api(stub) for stub in stubs if stub.get("TaskGroup") == GROUP
        ]
        return sorted(found, key=lambda a: (a.index, a.create_index))

    async def _scale(self, count: int, *, message: str, job_modify_index: int = 0) -> None:
        payload: dict[str, Any] = {"Count": count, "Target": {"Group": GROUP}, "Message": message}
        if job_modify_index:
            payload.update(EnforceIndex=True, JobModifyIndex=job_modify_index)
        reply = await asyncio.to_thread(self._api.scale, self._config.job_id, payload)
        log.info("nomad workers scaled", count=count, eval_id=reply.get("EvalID"))

    async def _confirm_stopped(self, alloc_id: str, others: set[str], *, timeout_s: float) -> None:
        """Wait for Nomad's evaluation of the scale-down and check that it took ``alloc_id``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            allocations = {a.id: a for a in await self._allocations()}
            wrong = sorted(
                i for i in others if i in allocations and allocations[i].desired_status != "run"
            )
            if wrong:
                raise BackendError(
                    f"Nomad stopped {', '.join(wrong)} when asked to remove {alloc_id}: the group "
                    "changed between the read and the scale"
                )
            chosen = allocations.get(alloc_id)
            if chosen is None or chosen.desired_status != "run":
                return
            if loop.time() > deadline:
                raise BackendError(
                    f"Nomad has not stopped allocation {alloc_id} within {timeout_s:g}s of the "
                    "scale-down (is its evaluation blocked?)"
                )
            await asyncio.sleep(self._poll_s)

    def _not_ready_message(
        self, allocations: list[WorkerAllocation], registered: int, timeout_s: float
    ) -> str:
        live = [a for a in allocations if a.live]
        running = sum(a.client_status == "running" for a in live)
        details = "; ".join(
            f"{a.id} ({a.name}) {a.client_status}"
            + (f": {a.last_failure}" if a.last_failure else "")
            for a in live
            if a.client_status != "running" or a.last_failure
        )
        return (
            f"Nomad workers did not register within {timeout_s:g}s: {registered} of "
            f"{self._count} registered over NATS, {running} allocations running"
            + (f" ({details})" if details else "")
            + "; can the containers reach TOOLBUS_NATS_URL?"
        )

    def _warn_if_loopback(self) -> None:
        url = self._config.worker_env.get("TOOLBUS_NATS_URL", "")
        hosts = {urlsplit(part.strip()).hostname for part in url.split(",") if part.strip()}
        if hosts & {"localhost", "127.0.0.1", "::1"}:
            log.warning(
                "TOOLBUS_NATS_URL for Nomad workers points at loopback: containers cannot "
                "reach a server on this host that way",
                hosts=sorted(h for h in hosts if h),
            )


def _not_next_message(
    chosen: WorkerAllocation, victim: WorkerAllocation | None, job_id: str
) -> str:
    why = (
        f"Nomad would stop {victim.id} ({victim.name}) instead; drain that one"
        if victim is not None
        else "Nomad's choice is not certain while allocations are failed, lost or pending "
        "placement; retry when the group is settled"
    )
    return (
        f"cannot remove exactly worker {chosen.id} ({chosen.name}) of Nomad job {job_id!r}: "
        f"a scale-down removes the highest name index, and Nomad has no call that names the "
        f"allocation to remove (hashicorp/nomad#7876). {why}"
    )
