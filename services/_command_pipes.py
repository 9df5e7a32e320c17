"""The stdin, stdout and stderr pipes of one command, for either kind of sandbox."""

from __future__ import annotations

import asyncio
import io
import os


class _CallPipes:
    """The pipes of one command, plain fds rather than asyncio's subprocess PIPEs (with those,
    Python 3.11's Process.wait() can also wait for every process holding them). While they are
    made, ``abandon`` closes every fd made so far, wherever the making stopped (a cancellation
    can come at each connect)."""

    def __init__(self) -> None:
        self.readers: list[asyncio.StreamReader] = []  # its stdout and stderr
        self.stdin: asyncio.WriteTransport | None = None
        self.transports: list[asyncio.BaseTransport] = []
        self.for_child: list[int] = []  # the command's ends; closed here once it has them
        self._files: list[io.FileIO] = []  # our ends, owned by their transports once connected

    async def make(self, with_stdin: bool) -> None:
        """Pipes for stdout and stderr, and for stdin when asked; ``for_child`` holds the
        command's ends in that order."""
        self.readers = [await self._reader(), await self._reader()]
        if with_stdin:
            self.stdin = await self._writer()

    async def _reader(self) -> asyncio.StreamReader:
        read_end, write_end = os.pipe()
        self.for_child.append(write_end)
        pipe = io.FileIO(read_end, "rb")
        self._files.append(pipe)
        reader = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        self.transports.append(transport)
        return reader

    async def _writer(self) -> asyncio.WriteTransport:
        read_end, write_end = os.pipe()
        self.for_child.append(read_end)
        pipe = io.FileIO(write_end, "wb")
        self._files.append(pipe)
        transport, _ = await asyncio.get_running_loop().connect_write_pipe(
            asyncio.BaseProtocol, pipe
        )
        self.transports.append(transport)
        return transport

    def close_child_ends(self) -> None:
        for fd in self.for_child:
            os.close(fd)
        self.for_child.clear()

    def abandon(self) -> None:
        # A transport closes its pipe only on the loop's next turn: close the files now too
        # (its own close of them later does nothing).
        for transport in self.transports:
            transport.close()
        for pipe in self._files:
            pipe.close()
        self.close_child_ends()
