"""`toolbus serve` as a user runs it: embedded NATS, local workers, calls, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

READY = "toolbus is ready on "


def _toolbus(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {**os.environ, "TOOLBUS_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services",
            "serve",
            "--port",
            "0",
            "--workers",
            "2",
            "--slots",
            "2",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        url = ""
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith(READY):
                url = line[len(READY) :].strip()
                break
        assert url, "toolbus serve did not print its URL"
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_serve_runs_calls_and_stops_cleanly_on_sigterm(
    served: tuple[subprocess.Popen[str], str],
) -> None:
    process, url = served
    hello = _toolbus(
        "call",
        "terminal",
        "--nats-url",
        url,
        "--trajectory",
        "cli",
        "--arg",
        "command=echo hi; echo there",
    )
    assert hello.returncode == 0, hello.stderr
    assert hello.stdout == "hi\nthere\n\n"  # print() adds the last newline

    failed = _toolbus(
        "call", "bash", "--nats-url", url, "--trajectory", "cli", "--args", '{"command": "exit 3"}'
    )
    assert failed.returncode == 1
    assert "error: Exit code: 3" in failed.stderr

    as_json = _toolbus(
        "call",
        "read_file",
        "--nats-url",
        url,
        "--trajectory",
        "cli",
        "--arg",
        "path=missing.txt",
        "--json",
    )
    assert json.loads(as_json.stdout)["success"] is False

    status = _toolbus("status", "--nats-url", url, "--json")
    pool = json.loads(status.stdout)["pool"]
    assert pool["containers"] == 2
    assert pool["total_slots"] == 4
    assert "2 workers, 4 slots" in _toolbus("status", "--nats-url", url).stdout

    tools = json.loads(_toolbus("tools", "--nats-url", url).stdout)
    assert [t["function"]["name"] for t in tools["tools"]] == [
        "terminal",
        "terminal_stateful",
        "tmux",
        "read_file",
        "write_file",
    ]

    released = _toolbus("release", "--nats-url", url, "--trajectory", "cli", "--reset")
    assert json.loads(released.stdout)["status"] == "ok"
    again = _toolbus("release", "--nats-url", url, "--trajectory", "cli")
    assert again.returncode == 1
    assert "404 no_active_slot: No active slot for trajectory 'cli'" in again.stderr

    children = _descendants(process.pid)
    assert len(children) >= 3  # nats-server and two workers
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)], "processes outlived toolbus serve"


def test_client_commands_explain_an_unreachable_server() -> None:
    result = _toolbus("status", "--nats-url", "nats://127.0.0.1:1", timeout=60)
    assert result.returncode == 1
    assert "cannot connect to NATS at nats://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_busy_port(nats_url: str, tmp_path: Path) -> None:
    port = nats_url.rsplit(":", 1)[1]
    result = _toolbus("serve", "--port", port, "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert "Traceback" not in result.stderr
