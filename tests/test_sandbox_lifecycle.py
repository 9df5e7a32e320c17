"""A sandbox's life: starting a command can be cancelled anywhere, and ending it is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from pathlib import Path

from services._sandbox import BwrapSandbox, PlainSandbox, SandboxLimits
from tests._sandboxes import RUN, bwrap_sandbox, host_processes, sh
from tests._waits import until

# Bounds for waits that hang without the fixes; each is far above what the step takes.
_BOUND_S = 20.0


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_spawns_cancelled_at_any_point_leave_no_file_descriptors(tmp_path: Path) -> None:
    async with bwrap_sandbox(tmp_path / "ws") as sandbox:
        await sh(sandbox, "true")  # the sandbox's own socket and pipe are open from here on
        before = _open_fds()
        for steps in range(10):  # cancelled after 0, 1, ... turns of the event loop
            for with_stdin in (False, True):
                task = asyncio.ensure_future(sandbox.spawn(["/bin/true"], stdin=with_stdin))
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    command = await task
                except asyncio.CancelledError:
                    continue
                assert await asyncio.wait_for(command.wait(), _BOUND_S) == 0
                command.close()
        for _ in range(3):  # closed transports let go of their pipes on the next turn
            await asyncio.sleep(0)
        assert _open_fds() == before
        assert (await sh(sandbox, "echo fine")).stdout.text == "fine\n"


_HOLDER = """
import socket, sys, time
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind("\\0" + sys.argv[1])
listener.listen(1)
print("listening", flush=True)
connection, _ = listener.accept()
socket.recv_fds(connection, 1, 1)
connection.send(b"k")
time.sleep(300)
"""
# The sandbox's pid 1 runs as the commands' user: pidfd_getfd (syscall 438 everywhere) takes
# its fd 2. (It has let go of bubblewrap's stderr, and the launcher's control socket is held
# only outside the sandbox; whatever a command can take must not hold a reset up.)
_GIVER = """
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
taken = libc.syscall(438, os.pidfd_open(1), 2, 0)
assert taken >= 0, os.strerror(ctypes.get_errno())
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("\\0" + sys.argv[1])
socket.send_fds(sock, [b"x"], [taken])
sock.recv(1)
"""


async def test_reset_ends_even_when_another_sandbox_holds_bubblewraps_stderr(
    tmp_path: Path,
) -> None:
    # Sandboxes with the network share the host's abstract unix sockets: a command in one can
    # hand an fd of its own sandbox (its pid 1's stderr) to another.
    name = f"toolbus-test-{uuid.uuid4().hex}"
    async with (
        bwrap_sandbox(tmp_path / "holder", allow_network=True) as holder,
        bwrap_sandbox(tmp_path / "giver", allow_network=True) as giver,
    ):
        listening = await holder.spawn([holder.python, "-c", _HOLDER, name])
        try:
            line = await asyncio.wait_for(listening.stdout.readline(), _BOUND_S)
            assert line == b"listening\n"
            gave = await sh(giver, f"python3 -c '{_GIVER}' {name}")
            assert gave.exit_code == 0, gave
            await asyncio.wait_for(giver.reset(), _BOUND_S)
            # And a fresh sandbox serves the next command.
            assert (await sh(giver, "echo again")).stdout.text == "again\n"
        finally:
            listening.close()
            with contextlib.suppress(TimeoutError):  # unblock the giver if the test failed
                await asyncio.wait_for(holder.reset(), _BOUND_S)


async def test_a_timeout_ends_the_command_even_when_the_launcher_is_stopped(
    tmp_path: Path,
) -> None:
    async with bwrap_sandbox(tmp_path / "ws") as sandbox:
        # Nothing in the sandbox can reach the launcher (it is outside the pid namespace), but
        # a stopped launcher must not keep a timeout from ending a command: the test stops it
        # from the host, once the command says through a FIFO that it runs.
        assert (await sh(sandbox, "mkfifo started")).exit_code == 0
        fifo = os.open(tmp_path / "ws" / "started", os.O_RDONLY | os.O_NONBLOCK)
        loop = asyncio.get_running_loop()
        said = loop.create_future()
        loop.add_reader(fifo, lambda: said.done() or said.set_result(None))
        try:
            command = f"echo up > started; exec sleep {RUN}1009.25"
            stopped = asyncio.ensure_future(sh(sandbox, command, timeout_s=2))
            await asyncio.wait_for(said, _BOUND_S)
            os.kill(_launcher_pid(sandbox), signal.SIGSTOP)
            outcome = await asyncio.wait_for(stopped, _BOUND_S)
        finally:
            loop.remove_reader(fifo)
            os.close(fifo)
        assert outcome.timed_out
        assert host_processes(f"sleep {RUN}1009.25") == []
        assert (await sh(sandbox, "echo fine")).stdout.text == "fine\n"


def _launcher_pid(sandbox: BwrapSandbox) -> int:
    """The host pid of the sandbox's launcher: the only child of its own launcher zygote."""
    process = sandbox._zygote._process
    assert process is not None
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


async def test_an_unsandboxed_command_ends_when_it_exits_not_when_its_children_do(
    tmp_path: Path,
) -> None:
    workspace = tmp_path / "plain"
    workspace.mkdir()
    sandbox = PlainSandbox(workspace, SandboxLimits())
    try:
        # The background sleep holds the command's stdout. (Python 3.11's Process.wait() also
        # waits for the pipes, but only when called before the exit: hence the pause.)
        command = f"sleep {RUN}1009.5 & sleep 0.5; echo hi"
        outcome = await sh(sandbox, command, timeout_s=_BOUND_S)
        assert not outcome.timed_out
        assert outcome.exit_code == 0
        assert outcome.stdout.text == "hi\n"
        assert len(host_processes(f"sleep {RUN}1009.5")) == 1  # it keeps running...
    finally:
        await sandbox.close()
    # ...until the slot is reset: killed at close, gone once the kernel has reaped it (on a
    # busy machine that can be a moment after the close returns).
    await until(lambda: host_processes(f"sleep {RUN}1009.5") == [], 5)


async def test_resets_racing_commands_in_other_sandboxes_never_lose_a_commands_output(
    tmp_path: Path,
) -> None:
    """A reset used to close the control socket while the event loop still watched it: the
    next pipe opened under that fd number (another sandbox's command output, or bubblewrap's
    stderr) was never read, so a command came back with exit 0 and no output, and a later
    reset waited for ever (shared/issue 9, item 12)."""
    async with contextlib.AsyncExitStack() as stack:
        sandboxes = [
            await stack.enter_async_context(bwrap_sandbox(tmp_path / f"ws{i}")) for i in range(6)
        ]
        wrong: list[tuple[int, int, str]] = []

        async def churn(index: int) -> None:
            sandbox = sandboxes[index]
            for k in range(12):
                outcome = await asyncio.wait_for(sh(sandbox, f"echo {index}-{k}"), _BOUND_S)
                if outcome.stdout.text != f"{index}-{k}\n":
                    wrong.append((index, k, repr(outcome)))
                await asyncio.wait_for(sandbox.reset(), _BOUND_S)  # a new sandbox each time

        await asyncio.gather(*(churn(i) for i in range(len(sandboxes))))
        assert wrong == []
