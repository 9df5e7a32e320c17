"""A small simulator of Nomad's HTTP API, for the tests of backends/nomad.py. It is NOT Nomad.

It serves, on 127.0.0.1, only what the backend calls, plus the allocation stop endpoint:

    POST /v1/jobs                      register or update a job
    GET  /v1/job/:job_id               read a job
    POST /v1/job/:job_id/scale         set a task group's count
    GET  /v1/job/:job_id/allocations   list a job's allocations
    POST /v1/allocation/:alloc_id/stop stop (and replace) one allocation
    DELETE /v1/job/:job_id?purge=      stop a job, and purge it

with the shapes Nomad 1.x answers: its JSON field names (``EvalID``, ``JobModifyIndex``, ``ID``,
``Name``, ``TaskGroup``, ``ClientStatus``, ``DesiredStatus``, ``DesiredTransition``,
``TaskStates`` with ``Events``...), its status codes and its plain-text error bodies for the
cases the backend meets (404 for a missing job, 400 for counts outside the scaling policy and
for scaling during a deployment, 500 for a failed ``JobModifyIndex`` check, 403 for a wrong
``X-Nomad-Token``). Every request is recorded in ``requests`` for tests to assert on.

What it models of the scheduler, and what it leaves out:

- every write is evaluated before the reply, as if a scheduler worker always picked the
  evaluation up before the client's next write: the usual case on a quiet cluster, and the one
  hashicorp/nomad#7876 reports;
- placements take the lowest free name indexes (``<job>.<group>[i]``);
- a count decrease stops allocations marked to migrate first, then the highest name indexes
  (the reconciler's ``computeStop``);
- an allocation stop marks it to migrate; with the count unchanged it is stopped and replaced
  under the same name (``PreviousAllocation``/``NextAllocation`` set);
- new allocations start ``running`` (or ``new_allocation_status``), or ``failed`` with a
  ``Driver Failure`` event when ``fail_new_allocations`` holds a message; failed allocations
  keep their slot and are not rescheduled;
- job updates are in place (no destructive updates), there are no nodes, no deployments unless
  ``deployment_active`` is set, and ACLs are one token or none.

``inject(method, path, status, body)`` makes the next matching request fail as given.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_NAME_INDEX = re.compile(r"\[(\d+)\]$")
_NODE_ID = "5b3a4e2c-0000-4000-8000-000000000001"

Reply = tuple[int, Any]  # status, JSON value or plain text


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    token: str | None


class NomadSimulator:
    """Start with ``with NomadSimulator() as nomad:``; ``nomad.address`` is its URL."""

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self.requests: list[RecordedRequest] = []
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.allocations: dict[str, dict[str, Any]] = {}
        self.fail_new_allocations: str | None = None
        self.new_allocation_status = "running"
        self.deployment_active = False
        self._injected: list[tuple[str, str, int, str]] = []
        self._index = itertools.count(10)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},  # shutdown() waits up to one interval
            name="nomad-simulator",
            daemon=True,
        )

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> NomadSimulator:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- for tests ------------------------------------------------------------------------------
    def inject(self, method: str, path: str, status: int, body: str) -> None:
        """Answer the next ``method path`` request with ``status`` and a plain-text ``body``."""
        with self._lock:
            self._injected.append((method, path, status, body))

    def writes(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method != "GET"]

    def live(self, job_id: str, namespace: str = "default") -> list[dict[str, Any]]:
        """Allocations of the job meant to run and pending or running, by name index."""
        with self._lock:
            found = [
                copy.deepcopy(a)
                for a in self.allocations.values()
                if a["JobID"] == job_id
                and a["Namespace"] == namespace
                and a["DesiredStatus"] == "run"
                and a["ClientStatus"] in ("pending", "running")
            ]
        return sorted(found, key=_index_of)

    # -- dispatch ---------------------------------------------------------------------------------
    def handle(
        self, method: str, path: str, query: dict[str, str], body: Any, token: str | None
    ) -> Reply:
        with self._lock:
            self.requests.append(RecordedRequest(method, path, query, body, token))
            for n, (m, p, status, text) in enumerate(self._injected):
                if (m, p) == (method, path):
                    del self._injected[n]
                    return status, text
            if self.token is not None and token != self.token:
                return 403, "Permission denied"
            namespace = query.get("namespace", "default")
            parts = path.strip("/").split("/")
            match (method, parts):
                case ("POST" | "PUT", ["v1", "jobs"]):
                    return self._register(body, namespace)
                case ("GET", ["v1", "job", job_id]):
                    job = self.jobs.get((namespace, job_id))
                    return (200, copy.deepcopy(job)) if job else (404, "job not found")
                case ("POST" | "PUT", ["v1", "job", job_id, "scale"]):
                    return self._scale(job_id, namespace, body)
                case ("GET", ["v1", "job", job_id, "allocations"]):
                    return 200, [
                        copy.deepcopy(a)
                        for a in self.allocations.values()
                        if a["JobID"] == job_id and a["Namespace"] == namespace
                    ]
                case ("DELETE", ["v1", "job", job_id]):
                    return self._deregister(job_id, namespace, query.get("purge", "false"))
                case ("POST" | "PUT", ["v1", "allocation", alloc_id, "stop"]):
                    return self._stop_allocation(alloc_id)
            return 404, "404 page not found"

    # -- endpoints --------------------------------------------------------------------------------
    def _register(self, body: Any, namespace: str) -> Reply:
        if not isinstance(body, dict) or not isinstance(body.get("Job"), dict):
            return 400, "Job must be specified"
        job = copy.deepcopy(body["Job"])
        if not job.get("ID"):
            return 400, "Job ID hasn't been provided"
        for group in job.get("TaskGroups") or []:
            group.setdefault("Count", 1)
            scaling = group.get("Scaling") or {}
            if scaling.get("Min") is not None and group["Count"] < scaling["Min"]:
                return 400, "Task group count must not be less than minimum count in scaling policy"
            if scaling.get("Max") is not None and group["Count"] > scaling["Max"]:
                return 400, (
                    "Task group count must not be greater than maximum count in scaling policy"
                )
        namespace = job.get("Namespace") or namespace
        previous = self.jobs.get((namespace, job["ID"]))
        index = next(self._index)
        job.update(
            Namespace=namespace,
            Name=job.get("Name") or job["ID"],
            Region=job.get("Region") or "global",
            Type=job.get("Type") or "service",
            Status="running",
            Stop=False,
            Version=previous["Version"] + 1 if previous else 0,
            CreateIndex=previous["CreateIndex"] if previous else index,
            ModifyIndex=index,
            JobModifyIndex=index,
            SubmitTime=time.time_ns(),
        )
        self.jobs[(namespace, job["ID"])] = job
        eval_id, eval_index = self._evaluate(job)
        return 200, {
            "EvalID": eval_id,
            "EvalCreateIndex": eval_index,
            "JobModifyIndex": index,
            "Warnings": "",
            "Index": eval_index,
            "LastContact": 0,
            "KnownLeader": False,
        }

    def _scale(self, job_id: str, namespace: str, body: Any) -> Reply:
        job = self.jobs.get((namespace, job_id))
        if job is None:
            return 404, f'job "{job_id}" not found'
        body = body if isinstance(body, dict) else {}
        name = (body.get("Target") or {}).get("Group")
        if not name:
            return 400, "Must specify task group name"
        group = next((g for g in job["TaskGroups"] if g["Name"] == name), None)
        if group is None:
            return 400, f'task group "{name}" specified for scaling does not exist in job'
        count = body.get("Count")
        if count is None:  # a scaling event without a change
            return 200, {"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": job["ModifyIndex"]}
        if count < 0:
            return 400, "scaling action count can't be negative"
        scaling = group.get("Scaling") or {}
        if scaling.get("Min") is not None and count < scaling["Min"]:
            return (
                400,
                f"group count was less than scaling policy minimum: {count} < {scaling['Min']}",
            )
        if scaling.get("Max") is not None and count > scaling["Max"]:
            return 400, (
                f"group count was greater than scaling policy maximum: {count} > {scaling['Max']}"
            )
        if self.deployment_active:
            return 400, "job scaling blocked due to active deployment"
        enforce = int(body.get("JobModifyIndex") or 0)
        if enforce and enforce != job["JobModifyIndex"]:
            return 500, (
                f"Enforcing job modify index {enforce}: job exists with conflicting job modify "
                f"index: {job['JobModifyIndex']}"
            )
        index = next(self._index)
        group["Count"] = count
        job.update(Version=job["Version"] + 1, ModifyIndex=index, JobModifyIndex=index)
        eval_id, eval_index = self._evaluate(job)
        return 200, {
            "EvalID": eval_id,
            "EvalCreateIndex": eval_index,
            "Index": eval_index,
            "JobModifyIndex": index,
            "KnownLeader": False,
            "LastContact": 0,
            "Warnings": "",
        }

    def _stop_allocation(self, alloc_id: str) -> Reply:
        alloc = self.allocations.get(alloc_id)
        if alloc is None:
            return 404, f'Unknown allocation "{alloc_id}"'
        alloc["DesiredTransition"]["Migrate"] = True
        alloc["ModifyIndex"] = next(self._index)
        job = self.jobs.get((alloc["Namespace"], alloc["JobID"]))
        eval_id, eval_index = self._evaluate(job) if job else (str(uuid.uuid4()), 0)
        return 200, {"EvalID": eval_id, "Index": eval_index}

    def _deregister(self, job_id: str, namespace: str, purge: str) -> Reply:
        if purge not in _TRUE | _FALSE:
            return 400, f'Failed to parse value of "purge" ({purge}) as a bool'
        job = self.jobs.get((namespace, job_id))
        if job is None:
            return 404, "job not found"
        for alloc in self.allocations.values():
            if alloc["JobID"] == job_id and alloc["Namespace"] == namespace:
                self._stop(alloc, "alloc not needed since job is stopped")
        index = next(self._index)
        if purge in _TRUE:
            del self.jobs[(namespace, job_id)]
        else:
            job.update(Stop=True, Status="dead", ModifyIndex=index, JobModifyIndex=index)
        return 200, {
            "EvalID": str(uuid.uuid4()),
            "EvalCreateIndex": index,
            "JobModifyIndex": index,
            "Index": index,
            "KnownLeader": False,
            "LastContact": 0,
            "VolumeEvalID": "",
            "VolumeEvalIndex": 0,
        }

    # -- the "scheduler" ------------------------------------------------------------------------
    def _evaluate(self, job: dict[str, Any]) -> tuple[str, int]:
        eval_id = str(uuid.uuid4())
        for group in job["TaskGroups"]:
            mine = [
                a
                for a in self.allocations.values()
                if a["JobID"] == job["ID"]
                and a["Namespace"] == job["Namespace"]
                and a["TaskGroup"] == group["Name"]
            ]
            # Failed allocations keep their slot: Nomad reschedules them, which is not modelled.
            wanted = [
                a
                for a in mine
                if a["DesiredStatus"] == "run" and a["ClientStatus"] not in ("complete", "lost")
            ]
            excess = len(wanted) - group["Count"]
            if excess > 0:
                order = sorted(wanted, key=lambda a: (not _migrating(a), -_index_of(a)))
                for alloc in order[:excess]:
                    self._stop(alloc, "alloc not needed due to job update")
                wanted = order[excess:]
            for alloc in [a for a in wanted if _migrating(a)]:
                self._stop(alloc, "alloc is being migrated")
                self._place(job, group, _index_of(alloc), eval_id, previous=alloc)
            used = {_index_of(a) for a in wanted}
            missing = group["Count"] - len(wanted)
            for index in itertools.count():
                if missing <= 0:
                    break
                if index not in used:
                    self._place(job, group, index, eval_id)
                    missing -= 1
            for alloc in wanted:
                if alloc["DesiredStatus"] == "run":
                    alloc["JobVersion"] = job["Version"]  # an in-place update
        return eval_id, next(self._index)

    def _place(
        self,
        job: dict[str, Any],
        group: dict[str, Any],
        index: int,
        eval_id: str,
        *,
        previous: dict[str, Any] | None = None,
    ) -> None:
        alloc_id = str(uuid.uuid4())
        now = time.time_ns()
        failure = self.fail_new_allocations
        status = "failed" if failure else self.new_allocation_status
        states = {}
        for task in group.get("Tasks") or []:
            events = [_event("Received", "Task received by client", now)]
            if failure:
                events.append(
                    _event("Driver Failure", failure, now, DriverError=failure, FailsTask=True)
                )
            elif status == "running":
                events.append(_event("Started", "Task started by client", now))
            states[task["Name"]] = {
                "State": "dead" if failure else ("running" if status == "running" else "pending"),
                "Failed": bool(failure),
                "Restarts": 0,
                "LastRestart": None,
                "StartedAt": None,
                "FinishedAt": None,
                "Events": events,
            }
        index_now = next(self._index)
        self.allocations[alloc_id] = {
            "ID": alloc_id,
            "EvalID": eval_id,
            "Name": f"{job['ID']}.{group['Name']}[{index}]",
            "Namespace": job["Namespace"],
            "NodeID": _NODE_ID,
            "NodeName": "simulated-node",
            "JobID": job["ID"],
            "JobType": job["Type"],
            "JobVersion": job["Version"],
            "TaskGroup": group["Name"],
            "DesiredStatus": "run",
            "DesiredDescription": "",
            "DesiredTransition": {"Migrate": None, "Reschedule": None, "ForceReschedule": None},
            "ClientStatus": status,
            "ClientDescription": {
                "failed": "Failed tasks",
                "running": "Tasks are running",
                "pending": "No tasks have started",
            }.get(status, ""),
            "TaskStates": states,
            "DeploymentStatus": None,
            "FollowupEvalID": "",
            "PreviousAllocation": previous["ID"] if previous else "",
            "NextAllocation": "",
            "RescheduleTracker": None,
            "PreemptedAllocations": None,
            "PreemptedByAllocation": "",
            "CreateIndex": index_now,
            "ModifyIndex": index_now,
            "CreateTime": now,
            "ModifyTime": now,
        }
        if previous is not None:
            previous["NextAllocation"] = alloc_id

    def _stop(self, alloc: dict[str, Any], why: str) -> None:
        if alloc["DesiredStatus"] == "stop":
            return
        alloc["DesiredStatus"] = "stop"
        alloc["DesiredDescription"] = why
        if alloc["ClientStatus"] in ("pending", "running"):
            alloc["ClientStatus"] = "complete"
            alloc["ClientDescription"] = "All tasks have completed"
        alloc["ModifyIndex"] = next(self._index)
        alloc["ModifyTime"] = time.time_ns()


def _index_of(alloc: dict[str, Any]) -> int:
    match = _NAME_INDEX.search(alloc["Name"])
    return int(match.group(1)) if match else -1


def _migrating(alloc: dict[str, Any]) -> bool:
    return bool(alloc["DesiredTransition"].get("Migrate"))


def _event(kind: str, message: str, now: int, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "Type": kind,
        "Time": now,
        "DisplayMessage": message,
        "Details": {},
        "FailsTask": False,
        "RestartReason": "",
        "SetupError": "",
        "DriverError": "",
        "ExitCode": 0,
        "Signal": 0,
        "Message": "",
        "KillTimeout": 0,
        "KillError": "",
        "KillReason": "",
        "StartDelay": 0,
        "DownloadError": "",
        "ValidationError": "",
        "DiskLimit": 0,
        "FailedSibling": "",
        "VaultError": "",
        "TaskSignalReason": "",
        "TaskSignal": "",
        "DriverMessage": "",
        "GenericSource": "",
    }
    event.update(fields)
    return event


def _handler_for(simulator: NomadSimulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            query = {name: values[-1] for name, values in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError as exc:
                status, payload = 400, f"Failed to decode request body: {exc}"
            else:
                token = self.headers.get("X-Nomad-Token")
                status, payload = simulator.handle(method, url.path, query, body, token)
            if isinstance(payload, str):
                data, kind = payload.encode(), "text/plain; charset=utf-8"
            else:
                data, kind = json.dumps(payload).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the tests read simulator.requests instead

    return Handler
