"""The in-sandbox launcher's protocol, spoken directly to a real launcher process (no sandbox)."""

from __future__ import annotations

import json
import marshal
import os
import resource
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
        [sys.executable, "-I", "-S", "-B", str(LAUNCHER), str(theirs.fileno()), ""],
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


def _run_message(argv: object, env: object, call_id: object = 4) -> bytes:
    return marshal.dumps({"op": "run", "id": call_id, "argv": argv, "env": env})


@pytest.mark.parametrize(
    ("payload", "call_id"),
    [
        (b"not marshal", None),
        (b"", None),  # an empty packet with fds is a message, not the end of the socket
        (marshal.dumps([1, 2]), None),
        (marshal.dumps("run"), None),
        (marshal.dumps({"op": "run"}), None),
        (marshal.dumps({"op": "run", "id": "seven"}), None),
        (marshal.dumps({"op": "run", "id": True}), None),
        (marshal.dumps({"op": "run", "id": -1}), None),
        (marshal.dumps({"op": "run", "id": 1 << 40}), None),
        (marshal.dumps({"op": "kill", "id": 10.5}), None),
        (marshal.dumps({"op": "run", "id": 7})[:-3], None),  # cut short
        (marshal.dumps(compile("1", "x", "eval")), None),  # a code object is no message
        (marshal.dumps({"op": "launch", "id": 3}), 3),
        (marshal.dumps({"op": b"run", "id": 3}), 3),
        (_run_message("/bin/true", {}), 4),
        (_run_message([], {}), 4),
        (_run_message([b"/bin/true"], {}), 4),
        (_run_message(["/bin/echo", "a\0b"], {}), 4),
        (_run_message(["/bin/true"], {"A": "b\0"}), 4),
        (_run_message(["/bin/true"], {1: "b"}), 4),
        (_run_message(["/bin/true"], []), 4),
        (_run_message(["/no/such/program"], {}), 4),
        (marshal.dumps({"op": "run", "id": 5, "via_fd": True}), 5),
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
    socket.send_fds(launcher, [marshal.dumps(message)], [out_write, out_write])
    os.close(out_write)
    assert _event(launcher)["event"] == "started"
    assert _event(launcher) == {"event": "exited", "id": 100, "code": 0}
    assert os.read(out_read, 100) == b"alive\n"
    os.close(out_read)


def test_a_run_without_its_pipes_fails_alone(launcher: socket.socket) -> None:
    launcher.send(marshal.dumps({"op": "run", "id": 1, "argv": ["/bin/true"], "env": {}}))
    answer = _event(launcher)
    assert answer["event"] == "failed"
    assert answer["id"] == 1


@pytest.mark.parametrize(
    "name",
    [
        '/no/"such"\\program',
        "/no/é/ü/程序",
        "/no/\x01\x1f\x7f/tab\there",
        "/no/\U0001f600",
        "/no/\udcff",
    ],
)
def test_an_error_naming_any_characters_is_valid_json(launcher: socket.socket, name: str) -> None:
    """The launcher writes its JSON by hand: quotes, backslashes, controls, non-ASCII, astral
    characters and lone surrogates (an undecodable byte of a path) must all come out right."""
    answer = _run(launcher, _run_message([name], {}, call_id=9))
    assert answer["event"] == "failed", answer
    assert answer["id"] == 9
    assert isinstance(answer["error"], str)
    assert answer["error"].endswith(repr(name))  # OSError names the path by its repr


def test_the_launcher_works_with_a_control_socket_over_fd_1023() -> None:
    """A worker with hundreds of sandboxes hands the launcher fd numbers over 1023."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.fail(f"RLIMIT_NOFILE's hard limit is {hard}: this test needs 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        high = os.dup2(theirs.fileno(), 1500, inheritable=False)
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(LAUNCHER), str(high), ""], pass_fds=[high]
        )
        os.close(high)
        theirs.close()
        ours.settimeout(20)
        assert _event(ours) == {"event": "ready"}
        out_read, out_write = os.pipe()
        message = {"op": "run", "id": 1, "argv": ["/bin/sh", "-c", "ls /proc/self/fd"], "env": {}}
        socket.send_fds(ours, [marshal.dumps(message)], [out_write, out_write])
        os.close(out_write)
        assert _event(ours)["event"] == "started"
        assert _event(ours) == {"event": "exited", "id": 1, "code": 0}
        # The command got its three fds (and the one ls opened), not the control socket.
        assert sorted(int(fd) for fd in os.read(out_read, 1000).split()) == [0, 1, 2, 3]
        os.close(out_read)
        ours.close()
        assert process.wait(timeout=20) == 0
    finally:
        ours.close()
        theirs.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_rlimits_given_at_start_apply_to_commands() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    limits = services._launcher.format_rlimits({"RLIMIT_NOFILE": (200, 300), "RLIMIT_CORE": (0, 0)})
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", str(LAUNCHER), str(theirs.fileno()), limits],
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    ours.settimeout(20)
    try:
        assert _event(ours) == {"event": "ready"}
        out_read, out_write = os.pipe()
        message = {"op": "run", "id": 1, "argv": ["/bin/sh", "-c", "ulimit -Sn; ulimit -Hn"]}
        socket.send_fds(ours, [marshal.dumps({**message, "env": {}})], [out_write, out_write])
        os.close(out_write)
        assert _event(ours)["event"] == "started"
        assert _event(ours) == {"event": "exited", "id": 1, "code": 0}
        assert os.read(out_read, 100) == b"200\n300\n"
        os.close(out_read)
    finally:
        ours.close()
        process.wait(timeout=20)
