"""backends/nomad.py against the Nomad API simulator (tests/nomad_simulator.py, not Nomad), and
against a real Nomad agent when NOMAD_ADDR is set."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import requests

from backends.nomad import (
    DATA_DIR_ENV,
    GROUP,
    TASK,
    WORKER_ID_ENV,
    BackendError,
    NomadApiError,
    NomadConfig,
    NomadWorkers,
    NotNextToStop,
    WorkerAllocation,
    scale_down_victim,
    worker_job,
)
from services.cli import run_serve, settings_env
from services.client import ToolbusClient
from services.exceptions import StartupError
from services.settings import Settings
from services.worker import SandboxWorker, WorkerConfig

from .nomad_simulator import NomadSimulator

HCL = Path(__file__).resolve().parent.parent / "deploy" / "nomad" / "toolbus-workers.nomad.hcl"
NATS_URL = "nats://worker:secret@nats.service.consul:4222"
JOB = "toolbus-sandbox-workers"


@pytest.fixture
def nomad() -> Iterator[NomadSimulator]:
    with NomadSimulator() as simulator:
        yield simulator


def _config(nomad: NomadSimulator, **overrides: Any) -> NomadConfig:
    options: dict[str, Any] = {
        "address": nomad.address,
        "min_workers": 1,
        "max_workers": 4,
        "worker_env": {"TOOLBUS_NATS_URL": NATS_URL, "TOOLBUS_SLOTS": "8"},
    }
    return NomadConfig(**(options | overrides))


def _workers(nomad: NomadSimulator, **overrides: Any) -> NomadWorkers:
    return NomadWorkers(_config(nomad, **overrides), poll_s=0.01)


# -- the job is the HCL job ---------------------------------------------------------------------
def _hcl_block(header: str) -> dict[str, str]:
    """The ``key = value`` lines of the first flat block ``header {`` of the HCL job."""
    text = HCL.read_text()
    start = re.search(rf"^\s*{header}\s*\{{\s*$", text, re.MULTILINE)
    assert start is not None, header
    values: dict[str, str] = {}
    for raw in text[start.end() :].splitlines():
        line = raw.split("#")[0].strip()
        if line == "}":
            break
        if "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            values[key] = value.strip('"')
    return values


def _ns(duration: str) -> int:
    match = re.fullmatch(r"(\d+)([sm])", duration)
    assert match is not None, duration
    return int(match.group(1)) * {"s": 1, "m": 60}[match.group(2)] * 1_000_000_000


def _default(variable: str) -> str:
    return _hcl_block(f'variable "{variable}"')["default"]


def test_the_api_job_is_the_hcl_job() -> None:
    config = NomadConfig(min_workers=2, max_workers=7, worker_env={"TOOLBUS_NATS_URL": NATS_URL})
    job = worker_job(config)
    assert job["ID"] == job["Name"] == JOB == config.job_id
    assert re.search(rf'^job "{JOB}"', HCL.read_text(), re.MULTILINE)
    assert job["Type"] == _hcl_block(f'job "{JOB}"')["type"] == "service"
    assert job["Datacenters"] == ["*"]

    update = _hcl_block("update")
    assert job["Update"] == {
        "MaxParallel": int(update["max_parallel"]),
        "HealthCheck": update["health_check"],
        "MinHealthyTime": _ns(update["min_healthy_time"]),
        "HealthyDeadline": _ns(update["healthy_deadline"]),
        "ProgressDeadline": _ns(update["progress_deadline"]),
        "AutoRevert": update["auto_revert"] == "true",
    }

    [group] = job["TaskGroups"]
    assert re.search(rf'^\s*group "{GROUP}"', HCL.read_text(), re.MULTILINE)
    assert group["Name"] == GROUP
    assert group["Count"] == 2
    assert group["Scaling"] == {"Enabled": True, "Min": 2, "Max": 7}
    restart = _hcl_block("restart")
    assert group["RestartPolicy"] == {
        "Attempts": int(restart["attempts"]),
        "Interval": _ns(restart["interval"]),
        "Delay": _ns(restart["delay"]),
        "Mode": restart["mode"],
    }
    reschedule = _hcl_block("reschedule")
    assert group["ReschedulePolicy"] == {
        "Delay": _ns(reschedule["delay"]),
        "DelayFunction": reschedule["delay_function"],
        "MaxDelay": _ns(reschedule["max_delay"]),
        "Unlimited": reschedule["unlimited"] == "true",
    }
    assert group["EphemeralDisk"] == {"SizeMB": int(_hcl_block("ephemeral_disk")["size"])}

    [task] = group["Tasks"]
    assert re.search(rf'^\s*task "{TASK}"', HCL.read_text(), re.MULTILINE)
    assert task["Name"] == TASK
    assert task["Driver"] == "docker"
    assert task["Config"] == {
        "image": _default("image"),
        "args": ["worker"],
        "privileged": _default("privileged") == "true",
        "security_opt": [],
    }
    assert task["KillSignal"] == "SIGTERM"
    assert task["KillTimeout"] == _ns("20s")
    assert task["Resources"] == {"CPU": int(_default("cpu")), "MemoryMB": int(_default("memory"))}
    assert task["Resources"] == {"CPU": 500, "MemoryMB": 512}

    hcl_env = _hcl_block("env")
    assert task["Env"]["TOOLBUS_WORKER_ID"] == hcl_env["TOOLBUS_WORKER_ID"] == WORKER_ID_ENV
    assert task["Env"]["TOOLBUS_DATA_DIR"] == hcl_env["TOOLBUS_DATA_DIR"] == DATA_DIR_ENV
    assert task["Env"]["TOOLBUS_LOG_FORMAT"] == hcl_env["TOOLBUS_LOG_FORMAT"]
    assert task["Env"]["TOOLBUS_LOG_LEVEL"] == hcl_env["TOOLBUS_LOG_LEVEL"]
    assert task["Env"]["TOOLBUS_REQUIRE_SANDBOX"] == _default("require_sandbox")
    assert task["Env"]["TOOLBUS_NATS_URL"] == NATS_URL
    assert "Templates" not in task


def test_without_privileged_the_container_gets_the_seccomp_and_apparmor_options() -> None:
    job = worker_job(NomadConfig(privileged=False, worker_env={"TOOLBUS_NATS_URL": NATS_URL}))
    config = job["TaskGroups"][0]["Tasks"][0]["Config"]
    assert config["privileged"] is False
    assert config["security_opt"] == ["seccomp=unconfined", "apparmor=unconfined"]
    hcl_line = 'security_opt = var.privileged ? [] : ["seccomp=unconfined", "apparmor=unconfined"]'
    assert hcl_line in HCL.read_text()


def test_with_nats_address_the_url_comes_from_the_nomad_variable_as_in_the_hcl() -> None:
    config = NomadConfig(
        nats_address="nats.service.consul:4222", worker_env={"TOOLBUS_NATS_URL": NATS_URL}
    )
    [task] = worker_job(config)["TaskGroups"][0]["Tasks"]
    assert "TOOLBUS_NATS_URL" not in task["Env"]  # no password in the job
    [template] = task["Templates"]
    assert template["DestPath"] == _hcl_block("template")["destination"] == "secrets/nats.env"
    assert template["Envvars"] is True
    assert template["ChangeMode"] == "restart"
    assert f'nomadVar "nomad/jobs/{JOB}"' in template["EmbeddedTmpl"]
    assert (
        "TOOLBUS_NATS_URL=nats://worker:{{ .nats_password }}@nats.service.consul:4222"
        in template["EmbeddedTmpl"]
    )


def test_namespace_region_and_resources_are_the_configs() -> None:
    config = NomadConfig(
        namespace="rl",
        region="eu",
        cpu_mhz=1000,
        memory_mb=2048,
        datacenters=("dc1", "dc2"),
        image="registry/toolbus:1.2",
        worker_env={"TOOLBUS_NATS_URL": NATS_URL},
    )
    job = worker_job(config, count=3)
    assert (job["Namespace"], job["Region"], job["Datacenters"]) == ("rl", "eu", ["dc1", "dc2"])
    assert job["TaskGroups"][0]["Count"] == 3
    [task] = job["TaskGroups"][0]["Tasks"]
    assert task["Resources"] == {"CPU": 1000, "MemoryMB": 2048}
    assert task["Config"]["image"] == "registry/toolbus:1.2"


def test_from_settings_takes_the_backend_fields_and_a_worker_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.startswith(("TOOLBUS_", "TOOL_EXECUTOR_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    settings = Settings(
        nats_url=NATS_URL,
        nomad_address="http://nomad.example:4646",
        job_id="my-workers",
        image="img:1",
        privileged=True,
        min_workers=2,
        max_workers=5,
        purge_job_on_shutdown=False,
        slots=7,
        token="client-secret",
        tool_server_token="tool-secret",
    )
    config = NomadConfig.from_settings(settings, settings_env(settings), token="nomad-acl")
    assert (config.address, config.job_id, config.image, config.privileged) == (
        "http://nomad.example:4646",
        "my-workers",
        "img:1",
        True,
    )
    assert (config.min_workers, config.max_workers, config.purge_on_shutdown) == (2, 5, False)
    assert config.token == "nomad-acl"
    assert "nomad-acl" not in repr(config)
    env = config.worker_env
    assert env["TOOLBUS_NATS_URL"] == NATS_URL
    assert env["TOOLBUS_SLOTS"] == "7"
    for left_out in ("PATH", "HOME", "TOOLBUS_DATA_DIR", "TOOLBUS_TOKEN", "TOOLBUS_NOMAD_ADDRESS"):
        assert left_out not in env
    assert "TOOLBUS_TOOL_SERVER_TOKEN" not in env

    with_variable = NomadConfig.from_settings(
        settings, settings_env(settings), nats_address="nats:4222"
    )
    assert "TOOLBUS_NATS_URL" not in with_variable.worker_env


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(StartupError, match="min_workers"):
        NomadConfig(min_workers=3, max_workers=2)
    with pytest.raises(StartupError, match="job id"):
        NomadConfig(job_id="../nodes")
    with pytest.raises(StartupError, match="not an http"):
        NomadConfig(address="localhost:4646")


# -- register, purge ------------------------------------------------------------------------------
async def test_enter_registers_the_job_with_min_workers_and_exit_purges_it(
    nomad: NomadSimulator,
) -> None:
    config = _config(nomad, min_workers=2)
    async with NomadWorkers(config) as workers:
        [register] = nomad.writes()
        assert (register.method, register.path) == ("POST", "/v1/jobs")
        assert register.body == {"Job": worker_job(config)}
        allocations = await workers.allocations()
        assert [a.name for a in allocations] == [f"{JOB}.workers[0]", f"{JOB}.workers[1]"]
        assert all(a.live and a.client_status == "running" for a in allocations)
        assert workers.count == 2
        job = await workers.job()
        env = job["TaskGroups"][0]["Tasks"][0]["Env"]
        assert env["TOOLBUS_WORKER_ID"] == "${NOMAD_ALLOC_ID}"
    purge = nomad.writes()[-1]
    assert (purge.method, purge.path, purge.query) == (
        "DELETE",
        f"/v1/job/{JOB}",
        {"purge": "true"},
    )
    assert JOB not in {job_id for _, job_id in nomad.jobs}
    assert nomad.live(JOB) == []


async def test_without_purge_on_shutdown_the_job_keeps_running(nomad: NomadSimulator) -> None:
    async with _workers(nomad, purge_on_shutdown=False):
        pass
    assert [r.method for r in nomad.writes()] == ["POST"]
    assert len(nomad.live(JOB)) == 1


async def test_a_second_start_updates_the_job_and_resets_the_count(nomad: NomadSimulator) -> None:
    async with _workers(nomad, purge_on_shutdown=False) as workers:
        await workers.scale(3)
    async with _workers(nomad, purge_on_shutdown=False, image="toolbus:2") as workers:
        job = await workers.job()
        assert job["Version"] == 2  # register, scale, register
        assert job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == "toolbus:2"
    assert [a["Name"] for a in nomad.live(JOB)] == [f"{JOB}.workers[0]"]


async def test_token_and_namespace_go_with_every_request(nomad: NomadSimulator) -> None:
    nomad.token = "acl-token"
    async with _workers(nomad, token="acl-token", namespace="rl", region="eu") as workers:
        await workers.scale(2)
        assert len(await workers.allocations()) == 2
    assert {r.token for r in nomad.requests} == {"acl-token"}
    assert all(r.query.get("namespace") == "rl" for r in nomad.requests)
    assert all(r.query.get("region") == "eu" for r in nomad.requests)
    assert nomad.requests[0].body["Job"]["Namespace"] == "rl"


# -- scaling --------------------------------------------------------------------------------------
async def test_scale_stays_within_min_and_max(nomad: NomadSimulator) -> None:
    async with _workers(nomad, min_workers=1, max_workers=3) as workers:
        assert await workers.scale(5) == 3
        assert len(nomad.live(JOB)) == 3
        assert await workers.scale(2) == 2
        assert [a["Name"] for a in nomad.live(JOB)] == [f"{JOB}.workers[0]", f"{JOB}.workers[1]"]
        assert await workers.scale(0) == 1
        assert len(nomad.live(JOB)) == 1
        assert workers.count == 1
    scales = [r.body for r in nomad.writes() if r.path.endswith("/scale")]
    assert [s["Count"] for s in scales] == [3, 2, 1]
    assert all(s["Target"] == {"Group": "workers"} and s["Message"] for s in scales)


async def test_scaling_to_the_current_count_asks_nothing_of_nomad(nomad: NomadSimulator) -> None:
    async with _workers(nomad, min_workers=2) as workers:
        assert await workers.scale(2) == 2
        assert not [r for r in nomad.writes() if r.path.endswith("/scale")]


async def test_a_scale_refused_during_a_deployment_says_so(nomad: NomadSimulator) -> None:
    async with _workers(nomad) as workers:
        nomad.deployment_active = True
        with pytest.raises(NomadApiError) as refused:
            await workers.scale(3)
        assert refused.value.status == 400
        assert refused.value.deployment_active
        message = str(refused.value)
        assert nomad.address in message
        assert f"POST /v1/job/{JOB}/scale answered 400" in message
        assert "job scaling blocked due to active deployment" in message


# -- removing a chosen worker ---------------------------------------------------------------------
async def test_stop_allocation_removes_that_worker_and_lowers_the_count(
    nomad: NomadSimulator,
) -> None:
    async with _workers(nomad) as workers:
        await workers.scale(3)
        before = {a["ID"]: a["Name"] for a in nomad.live(JOB)}
        victim = await workers.next_to_stop()
        assert victim is not None
        assert victim.name == f"{JOB}.workers[2]"
        writes_before = len(nomad.writes())

        await workers.stop_allocation(victim.id)

        after = {a["ID"]: a["Name"] for a in nomad.live(JOB)}
        assert after == {i: name for i, name in before.items() if i != victim.id}
        assert workers.count == 2
        assert (await workers.job())["TaskGroups"][0]["Count"] == 2
        [scale] = nomad.writes()[writes_before:]  # one write, no allocation stop
        assert scale.path == f"/v1/job/{JOB}/scale"
        assert scale.body["Count"] == 2
        assert scale.body["EnforceIndex"] is True
        assert scale.body["JobModifyIndex"] > 0
        stopped = nomad.allocations[victim.id]
        assert stopped["DesiredStatus"] == "stop"


async def test_stop_allocation_refuses_a_worker_nomad_would_not_remove(
    nomad: NomadSimulator,
) -> None:
    async with _workers(nomad) as workers:
        await workers.scale(3)
        first = nomad.live(JOB)[0]
        writes_before = len(nomad.writes())
        with pytest.raises(NotNextToStop) as refused:
            await workers.stop_allocation(first["ID"])
        assert refused.value.next_to_stop is not None
        assert refused.value.next_to_stop.name == f"{JOB}.workers[2]"
        assert refused.value.next_to_stop.id in str(refused.value)
        assert "hashicorp/nomad#7876" in str(refused.value)
        assert nomad.writes()[writes_before:] == []
        assert len(nomad.live(JOB)) == 3


async def test_neither_order_of_alloc_stop_and_scale_removes_only_the_chosen_worker(
    nomad: NomadSimulator,
) -> None:
    """Why stop_allocation does not use POST /v1/allocation/:id/stop: with Nomad evaluating each
    write before the next one lands (what the simulator models), stop-then-scale and
    scale-then-stop both lose an unchosen worker."""
    async with _workers(nomad) as workers:
        for first in ("stop", "scale"):
            await workers.scale(3)
            live = nomad.live(JOB)
            chosen, highest = live[0], live[-1]
            calls: dict[str, tuple[str, dict[str, Any] | None]] = {
                "stop": (f"/v1/allocation/{chosen['ID']}/stop", None),
                "scale": (
                    f"/v1/job/{JOB}/scale",
                    {"Count": 2, "Target": {"Group": "workers"}, "Message": "test"},
                ),
            }
            order = [first, "scale" if first == "stop" else "stop"]
            for step in order:
                path, body = calls[step]
                reply = await asyncio.to_thread(
                    requests.post, nomad.address + path, json=body, timeout=5
                )
                assert reply.status_code == 200, reply.text
            ids = {a["ID"] for a in nomad.live(JOB)}
            assert chosen["ID"] not in ids
            assert highest["ID"] not in ids, f"{order}: the highest-index worker survived"
            assert len(ids) == 2  # chosen was replaced by a new worker
            assert nomad.allocations[chosen["ID"]]["NextAllocation"] in ids


async def test_stop_allocation_at_min_workers_is_refused(nomad: NomadSimulator) -> None:
    async with _workers(nomad, min_workers=2) as workers:
        assert await workers.next_to_stop() is None
        victim = nomad.live(JOB)[-1]
        with pytest.raises(BackendError, match=r"min_workers \(2\)"):
            await workers.stop_allocation(victim["ID"])


async def test_stop_allocation_of_an_unknown_worker_is_refused(nomad: NomadSimulator) -> None:
    async with _workers(nomad) as workers:
        await workers.scale(2)
        with pytest.raises(BackendError, match="is not a running worker"):
            await workers.stop_allocation(str(uuid.uuid4()))
        with pytest.raises(BackendError, match="is not an allocation id"):
            await workers.stop_allocation("../../jobs")


async def test_a_job_changed_since_it_was_read_is_not_scaled_on_a_stale_decision(
    nomad: NomadSimulator,
) -> None:
    async with _workers(nomad) as workers:
        await workers.scale(3)
        victim = await workers.next_to_stop()
        assert victim is not None
        nomad.inject(
            "POST",
            f"/v1/job/{JOB}/scale",
            500,
            "Enforcing job modify index 12: job exists with conflicting job modify index: 13",
        )
        with pytest.raises(NomadApiError, match="conflicting job modify index") as refused:
            await workers.stop_allocation(victim.id)
        assert refused.value.status == 500
        assert len(nomad.live(JOB)) == 3


def _allocation(index: int, **fields: Any) -> WorkerAllocation:
    values: dict[str, Any] = {
        "id": f"alloc-{index}",
        "name": f"{JOB}.workers[{index}]",
        "index": index,
        "client_status": "running",
        "desired_status": "run",
        "migrating": False,
        "replaced_by": None,
        "create_index": 100 + index,
        "last_failure": None,
    }
    return WorkerAllocation(**(values | fields))


def test_nomads_choice_on_a_scale_down() -> None:
    group = [_allocation(0), _allocation(3), _allocation(1)]
    assert scale_down_victim(group, count=3) == group[1]  # highest name index
    migrating = [_allocation(0), _allocation(1, migrating=True), _allocation(2)]
    assert scale_down_victim(migrating, count=3) == migrating[1]  # marked to migrate first
    stopped = [_allocation(0), _allocation(5, desired_status="stop", client_status="complete")]
    assert scale_down_victim([*stopped, _allocation(1)], count=2) == _allocation(1)
    replaced = _allocation(4, client_status="failed", replaced_by="alloc-1")
    assert scale_down_victim([_allocation(0), replaced, _allocation(1)], count=2) == _allocation(1)
    # Not certain: a failed allocation, a missing placement, two with one name.
    assert (
        scale_down_victim([_allocation(0), _allocation(1, client_status="failed")], count=2) is None
    )
    assert scale_down_victim([_allocation(0)], count=2) is None
    assert scale_down_victim([_allocation(1), _allocation(1, id="other")], count=2) is None
    assert scale_down_victim([], count=0) is None


# -- errors ---------------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_an_unreachable_nomad_is_a_startup_error_naming_it() -> None:
    address = f"http://127.0.0.1:{_closed_port()}"
    config = NomadConfig(address=address, timeout_s=2, worker_env={"TOOLBUS_NATS_URL": NATS_URL})
    with pytest.raises(StartupError) as failed:
        async with NomadWorkers(config):
            pass
    assert f"Nomad at {address} did not answer POST /v1/jobs" in str(failed.value)


async def test_a_refused_token_is_a_startup_error_with_nomads_answer(
    nomad: NomadSimulator,
) -> None:
    nomad.token = "right"
    with pytest.raises(StartupError) as failed:
        async with _workers(nomad, token="wrong"):
            pass
    message = str(failed.value)
    assert f"Nomad at {nomad.address}: POST /v1/jobs answered 403: Permission denied" in message


async def test_a_refused_registration_carries_status_and_body(nomad: NomadSimulator) -> None:
    nomad.inject("POST", "/v1/jobs", 500, "rpc error: No cluster leader")
    with pytest.raises(StartupError, match="answered 500: rpc error: No cluster leader"):
        async with _workers(nomad):
            pass


async def test_workers_need_a_nats_url(nomad: NomadSimulator) -> None:
    with pytest.raises(StartupError, match="TOOLBUS_NATS_URL"):
        async with _workers(nomad, worker_env={"TOOLBUS_SLOTS": "2"}):
            pass
    assert nomad.requests == []


async def test_a_failed_purge_is_an_error_that_names_the_job(nomad: NomadSimulator) -> None:
    nomad.inject("DELETE", f"/v1/job/{JOB}", 500, "raft apply failed")
    with pytest.raises(BackendError, match=r"containers keep running.*answered 500: raft apply"):
        async with _workers(nomad):
            pass


async def test_a_job_purged_from_outside_ends_quietly(nomad: NomadSimulator) -> None:
    async with _workers(nomad) as workers:
        await asyncio.to_thread(
            requests.delete, f"{nomad.address}/v1/job/{JOB}?purge=true", timeout=5
        )
        with pytest.raises(BackendError, match="is not on Nomad"):
            await workers.scale(2)


# -- startup --------------------------------------------------------------------------------------
async def test_wait_registered_returns_once_every_worker_registered(
    nomad: NomadSimulator,
) -> None:
    registered = 0

    async def register_later() -> None:
        nonlocal registered
        for _ in range(2):
            await asyncio.sleep(0.05)
            registered += 1

    async with _workers(nomad, min_workers=2) as workers:
        task = asyncio.create_task(register_later())
        await workers.wait_registered(lambda: registered, timeout_s=5)
        await task
        assert registered == 2


async def test_a_failed_allocation_fails_the_start_with_its_message(
    nomad: NomadSimulator,
) -> None:
    message = "Failed to pull `toolbus-sandbox:local`: pull access denied"
    nomad.fail_new_allocations = message
    async with _workers(nomad, min_workers=2) as workers:
        with pytest.raises(StartupError) as failed:
            await workers.wait_registered(lambda: 0, timeout_s=5)
    text = str(failed.value)
    for allocation in nomad.allocations.values():
        assert f"allocation {allocation['ID']} ({allocation['Name']}) failed" in text
    assert f"task worker: Driver Failure: {message}" in text


async def test_workers_that_never_register_time_out_with_what_nomad_reports(
    nomad: NomadSimulator,
) -> None:
    nomad.new_allocation_status = "pending"
    async with _workers(nomad, min_workers=1) as workers:
        with pytest.raises(StartupError) as failed:
            await workers.wait_registered(lambda: 0, timeout_s=0.2)
    text = str(failed.value)
    assert "did not register within 0.2s: 0 of 1 registered over NATS" in text
    assert "0 allocations running" in text
    assert f"({JOB}.workers[0]) pending" in text


async def test_with_no_minimum_there_is_nothing_to_wait_for(nomad: NomadSimulator) -> None:
    async with _workers(nomad, min_workers=0) as workers:
        await workers.wait_registered(lambda: 0, timeout_s=0.1)
        assert nomad.live(JOB) == []


# -- a real Nomad ---------------------------------------------------------------------------------
@pytest.mark.nomad
@pytest.mark.skipif(not os.environ.get("NOMAD_ADDR"), reason="needs a Nomad agent at NOMAD_ADDR")
async def test_against_a_real_nomad() -> None:
    """Register, read back, purge. The allocations are not waited for: the image need not
    exist on the clients for Nomad to accept and store the job."""
    address = os.environ["NOMAD_ADDR"]
    token = os.environ.get("NOMAD_TOKEN")
    namespace = os.environ.get("NOMAD_NAMESPACE")
    job_id = f"toolbus-test-{uuid.uuid4().hex[:8]}"
    config = NomadConfig(
        address=address,
        token=token,
        namespace=namespace,
        job_id=job_id,
        min_workers=1,
        max_workers=2,
        worker_env={"TOOLBUS_NATS_URL": "nats://worker:x@nats.invalid:4222"},
    )
    async with NomadWorkers(config) as workers:
        job = await workers.job()
        assert job["ID"] == job_id
        assert job["Type"] == "service"
        [group] = job["TaskGroups"]
        assert (group["Name"], group["Count"]) == (GROUP, 1)
        assert (group["Scaling"]["Min"], group["Scaling"]["Max"]) == (1, 2)
        [task] = group["Tasks"]
        assert task["Driver"] == "docker"
        assert task["Env"]["TOOLBUS_WORKER_ID"] == WORKER_ID_ENV
        assert task["Resources"]["CPU"] == 500
        assert task["Resources"]["MemoryMB"] == 512
        assert all(a.name.startswith(f"{job_id}.{GROUP}[") for a in await workers.allocations())
    headers = {"X-Nomad-Token": token} if token else {}
    params = {"namespace": namespace} if namespace else {}
    gone = await asyncio.to_thread(
        requests.get, f"{address}/v1/job/{job_id}", headers=headers, params=params, timeout=10
    )
    assert gone.status_code == 404, gone.text


async def test_serve_with_the_nomad_backend_runs_its_workers_as_a_job(
    nats_url: str, tmp_path: Path
) -> None:
    """`toolbus serve --backend nomad` against the SIMULATOR: the job is registered, the
    allocation's worker (played here by an in-process worker with the allocation's id, as
    TOOLBUS_WORKER_ID=${NOMAD_ALLOC_ID} makes it in a container) registers, calls run, and the
    job is purged when the service stops."""
    with NomadSimulator() as nomad:
        settings = Settings(
            backend="nomad",
            nats_url=nats_url,
            nomad_address=nomad.address,
            job_id="toolbus-serve-test",
            min_workers=1,
            slots=2,
            data_dir=tmp_path / "data",
        )
        ready = asyncio.Event()
        serve = asyncio.create_task(run_serve(settings, ready=lambda url: ready.set()))
        try:
            for _ in range(600):  # the job is registered as serve starts
                if nomad.live("toolbus-serve-test"):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("serve registered no workers job with the simulator")
            allocation = nomad.live("toolbus-serve-test")[0]
            connection = await nats.connect(nats_url)
            worker_config = WorkerConfig(
                worker_id=allocation["ID"],
                slots=2,
                workspace_root=tmp_path / "workers",
                min_free_disk_mb=0,
            )
            async with SandboxWorker(connection, worker_config):
                await asyncio.wait_for(ready.wait(), 30)
                client = ToolbusClient(connection)
                result = await client.execute("nomad-t1", "terminal", {"command": "echo hi"})
                assert result.success and result.metadata["worker_id"] == allocation["ID"]
                serve.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serve
            await connection.drain()
        finally:
            serve.cancel()
        deletes = [r for r in nomad.writes() if r.method == "DELETE"]
        assert [r.path for r in deletes] == ["/v1/job/toolbus-serve-test"]
        assert deletes[0].query.get("purge") == "true"
