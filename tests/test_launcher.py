"""The in-sandbox launcher's protocol, spoken directly to a real launcher process (no sandbox)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import services._launcher

LAUNCHER = Path(services._launcher.__file__)


@pytest.fixture
def launcher() -> Iterator[socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", str(LAUNCHER), str(theirs.fileno()), "{}"],
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    ours.settimeout(20)  # a launcher that died or hangs fails the test instead of hanging it
    try:
        assert _event(ours) == {"event": "ready"}
        yield ours
    finally:
        ours.close()  # the launcher ends when the worker's end closes
        process.wait(timeout=20)


def _event(sock: socket.socket) -> dict[str, object]:
    data = sock.recv(65536)
    assert data, "the launcher closed its socket (it died)"
    event: dict[str, object] = json.loads(data)
    return event


def _run(sock: socket.socket, payload: bytes) -> dict[str, object]:
    """Send one packet with a stdout and a stderr; the launcher's first answer to it."""
    out_read, out_write = os.pipe()
    os.close(out_read)
    try:
        socket.send_fds(sock, [payload], [out_write, out_write])
    finally:
        os.close(out_write)
    return _event(sock)


@pytest.mark.parametrize(
    ("payload", "call_id"),
    [
        (b"not json", None),
        (b"[1, 2]", None),
        (b'{"op": "run"}', None),
        (b'{"op": "run", "id": "seven"}', None),
        (b'{"op": "launch", "id": 3}', 3),
        (b'{"op": "run", "id": 4, "argv": "/bin/true", "env": {}}', 4),
        (b'{"op": "run", "id": 5, "argv": [], "env": {}}', 5),
        (b'{"op": "run", "id": 6, "argv": ["/bin/echo", "a\\u0000b"], "env": {}}', 6),
        (b'{"op": "run", "id": 7, "argv": ["/bin/true"], "env": {"A": "b\\u0000"}}', 7),
        (b'{"op": "run", "id": 8, "argv": ["/bin/true"], "env": []}', 8),
        (b'{"op": "run", "id": 9, "argv": ["/no/such/program"], "env": {}}', 9),
        (b'{"op": "kill", "id": 10.5}', None),
        (b"\xff\xfe", None),
    ],
)
def test_a_bad_message_gets_an_answer_and_the_launcher_lives_on(
    launcher: socket.socket, payload: bytes, call_id: int | None
) -> None:
    answer = _run(launcher, payload)
    if call_id is None:
        assert answer["event"] == "rejected", answer
    else:
        assert answer["event"] == "failed", answer
        assert answer["id"] == call_id
    assert isinstance(answer["error"], str) and answer["error"]
    # Still serving: a good command runs.
    out_read, out_write = os.pipe()
    message = {"op": "run", "id": 100, "argv": ["/bin/echo", "alive"], "env": {}}
    socket.send_fds(launcher, [json.dumps(message).encode()], [out_write, out_write])
    os.close(out_write)
    assert _event(launcher)["event"] == "started"
    assert _event(launcher) == {"event": "exited", "id": 100, "code": 0}
    assert os.read(out_read, 100) == b"alive\n"
    os.close(out_read)


def test_a_run_without_its_pipes_fails_alone(launcher: socket.socket) -> None:
    launcher.send(json.dumps({"op": "run", "id": 1, "argv": ["/bin/true"], "env": {}}).encode())
    answer = _event(launcher)
    assert answer["event"] == "failed"
    assert answer["id"] == 1
