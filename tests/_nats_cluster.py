"""A 3-node NATS cluster on loopback, each node running deploy/nats/cluster.conf as deployed.

What differs per node comes from the environment, as the file says (server name, routes, the
passwords of deploy/nats/accounts.conf); the ports come from the command line (flags override
the file), and the store directory, which the file fixes at /var/lib/nats and nats-server will
not take twice, is pointed at a temporary directory in each node's copy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from services._embedded import find_nats_server, free_port

DEPLOY_NATS = Path(__file__).parents[1] / "deploy" / "nats"
USERS = ("executor", "worker", "client", "admin", "sys")
_ROUTE_PASSWORD = "route-pw"


class NatsCluster:
    def __init__(self, root: Path, *, size: int = 3) -> None:
        self._root = root
        self.client_ports = [free_port() for _ in range(size)]
        self._route_ports = [free_port() for _ in range(size)]
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * size

    def url(self, user: str) -> str:
        """Every node, with the user's credentials (toolbus gives them to each server)."""
        first, *rest = self.client_ports
        return ",".join(
            [f"nats://{user}:pw{user}@127.0.0.1:{first}"]
            + [f"nats://127.0.0.1:{port}" for port in rest]
        )

    def start(self) -> None:
        routes = ", ".join(
            f"nats-route://route:{_ROUTE_PASSWORD}@127.0.0.1:{port}" for port in self._route_ports
        )
        for index in range(len(self.client_ports)):
            node = self._root / f"node-{index}"
            node.mkdir(parents=True, exist_ok=True)
            conf = (DEPLOY_NATS / "cluster.conf").read_text()
            stored = conf.replace("store_dir: /var/lib/nats", f"store_dir: {node / 'jetstream'}")
            assert stored != conf, "cluster.conf no longer sets store_dir: /var/lib/nats"
            (node / "cluster.conf").write_text(stored)
            (node / "accounts.conf").write_text((DEPLOY_NATS / "accounts.conf").read_text())
            env = {
                **os.environ,
                "NATS_SERVER_NAME": f"nats-{index + 1}",
                "NATS_ROUTES": f"[{routes}]",
                "NATS_ROUTE_PASSWORD": _ROUTE_PASSWORD,
                **{f"NATS_{user.upper()}_PASSWORD": f"pw{user}" for user in USERS},
            }
            self._processes[index] = subprocess.Popen(
                [str(find_nats_server()), "-c", str(node / "cluster.conf"), "-a", "127.0.0.1",
                 "-p", str(self.client_ports[index]), "-m", str(free_port()),
                 "--cluster", f"nats://127.0.0.1:{self._route_ports[index]}",
                 "-l", str(node / "nats-server.log")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        for index, port in enumerate(self.client_ports):
            self._wait_listening(index, port)

    def kill(self, index: int) -> None:
        process = self._processes[index]
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        self._processes[index] = None

    def stop(self) -> None:
        for process in self._processes:
            if process is not None:
                process.terminate()
        for process in self._processes:
            if process is not None:
                process.wait(10)

    def _wait_listening(self, index: int, port: int) -> None:
        deadline = time.monotonic() + 15
        process = self._processes[index]
        assert process is not None
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            if process.poll() is not None or time.monotonic() > deadline:
                log = self._root / f"node-{index}" / "nats-server.log"
                raise RuntimeError(f"node {index} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)


@contextlib.contextmanager
def nats_cluster(root: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
