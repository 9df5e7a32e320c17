"""``toolbus status``: the rendered view, and the command (one-shot, JSON, --watch) on a stack."""

from __future__ import annotations

import asyncio
import io
import signal
import sys

import pytest

from schemas.messages import CallRates, PoolStatus, StatusReply, WorkerStatus
from services._status_view import render_status
from services.cli import main
from tests.conftest import StackFactory


@pytest.fixture(autouse=True)
def _keep_the_sessions_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() configures logging for its process; here that is the test session, whose loggers
    are cached with the processor list of conftest's configuration (structlog's capture_logs
    in other tests edits that list): a second configure_logging would leave them behind."""
    monkeypatch.setattr("services.cli.configure_logging", lambda **_: None)


def _status(**changes: object) -> StatusReply:
    status = StatusReply(
        executor_id="exec-1",
        queue_size=3,
        total_requests=1234,
        total_errors=12,
        pool=PoolStatus(
            total_slots=12,
            available_slots=9,
            acquired_slots=3,
            containers=2,
            slots_by_state={"free": 9, "acquired": 3},
            started=True,
            warm_slots=5,
        ),
        workers=[
            WorkerStatus(
                worker_id="worker-b-long-name",
                host="gpu-7",
                slots_total=8,
                slots_free=6,
                age_s=0.4,
                slots_warm=4,
            ),
            WorkerStatus(
                worker_id="w-a",
                host="node-12.cluster",
                slots_total=4,
                slots_free=3,
                age_s=12,
                slots_warm=1,
            ),
        ],
        rates=CallRates(calls_per_s_10s=12.34, calls_per_s_60s=150.2, errors_per_s_60s=0.05),
    )
    return status.model_copy(update=changes)


def test_render_status_shows_executor_rates_slots_and_a_workers_table() -> None:
    lines = render_status(_status()).splitlines()
    assert lines[0] == (
        "executor exec-1 | queue 3 | 1234 requests, 12 errors | "
        "calls/s 12.3 (10 s) 150 (60 s) | errors/s 0.05 (60 s)"
    )
    assert lines[1] == "pool: 2 workers, 12 slots (acquired 3, free 9; 5 of the free warm)"
    # Sorted by id; columns as wide as their widest cell; names left, numbers right.
    assert lines[2:] == [
        "WORKER              HOST             SLOTS  FREE  WARM  IN USE  STATE    LAST SEEN",
        "w-a                 node-12.cluster      4     3     1       1  serving  12.0s ago",
        "worker-b-long-name  gpu-7                8     6     4       2  serving   0.4s ago",
    ]


def test_a_draining_worker_shows_its_state_and_the_slots_it_holds() -> None:
    draining = WorkerStatus(
        worker_id="w-c",
        host="gpu-8",
        slots_total=8,
        slots_free=0,
        age_s=1.0,
        slots_held=2,
        state="draining",
    )
    lines = render_status(_status(workers=[draining])).splitlines()
    assert lines[2:] == [
        "WORKER  HOST   SLOTS  FREE  WARM  IN USE  STATE     LAST SEEN",
        "w-c     gpu-8      8     0     0       2  draining   1.0s ago",
    ]


def test_render_status_without_workers_or_rates() -> None:
    status = _status(
        workers=[],
        rates=CallRates(),
        pool=PoolStatus(
            total_slots=0,
            available_slots=0,
            acquired_slots=0,
            containers=0,
            slots_by_state={},
            started=True,
        ),
    )
    assert render_status(status).splitlines() == [
        "executor exec-1 | queue 3 | 1234 requests, 12 errors | "
        "calls/s 0.00 (10 s) 0.00 (60 s) | errors/s 0.00 (60 s)",
        "pool: 0 workers, 0 slots",
        "no workers registered",
    ]


def test_a_status_reply_without_rates_still_parses() -> None:
    old = _status().model_dump(mode="json")
    del old["rates"]
    assert StatusReply.model_validate(old).rates == CallRates()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_status_command_against_a_stack(
    make_stack: StackFactory, nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = await make_stack(slots=3)
    worker_id = stack.workers[0].worker_id
    common = ("--nats-url", nats_url)

    assert await asyncio.to_thread(main, ["status", "--json", *common]) == 0
    reply = StatusReply.model_validate_json(capsys.readouterr().out)
    assert reply.executor_id == stack.executors[0].status().executor_id
    assert worker_id in {worker.worker_id for worker in reply.workers}

    assert await asyncio.to_thread(main, ["status", *common]) == 0
    view = capsys.readouterr().out
    assert view.startswith(f"executor {reply.executor_id} | queue ")
    assert "\npool: " in view
    assert f"\n{worker_id} " in view

    # Not a terminal: views follow each other under a separator; --count ends the watch.
    argv = ["status", "--watch", "--interval", "0.05", "--count", "2", *common]
    assert await asyncio.to_thread(main, argv) == 0
    first, separator, second = capsys.readouterr().out.partition("\n-- ")
    assert first.startswith("executor ") and separator
    assert second.split("\n", 1)[1].startswith("executor ")

    argv = ["status", "--watch", "--json", "--interval", "0.05", "--count", "2", *common]
    assert await asyncio.to_thread(main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [StatusReply.model_validate_json(line).executor_id for line in lines] == [
        reply.executor_id
    ] * 2


async def test_watch_on_a_terminal_redraws_the_screen(
    make_stack: StackFactory, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_stack()
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    argv = ["status", "--watch", "--count", "1", "--nats-url", nats_url]
    assert await asyncio.to_thread(main, argv) == 0
    screen = terminal.getvalue()
    assert screen.startswith("\x1b[H\x1b[2Jevery 2s, Ctrl-C stops")
    assert "\n\nexecutor " in screen


async def test_ctrl_c_ends_a_watch_with_exit_code_0(
    make_stack: StackFactory, nats_url: str
) -> None:
    await make_stack()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services",
        "status",
        "--watch",
        "--interval",
        "0.1",
        "--nats-url",
        nats_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        first = await asyncio.wait_for(process.stdout.readline(), 30)
        assert first.startswith(b"executor "), first
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()


def test_interval_and_count_need_watch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--count", "1", "--nats-url", "nats://127.0.0.1:1"]) == 1
    assert "--interval and --count go with --watch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["status", "--watch", "--interval", "0"])
    assert exited.value.code == 2
    assert "expected a positive number" in capsys.readouterr().err
