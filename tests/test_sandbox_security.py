"""Attempts to leave the sandbox: each must fail, and the service must serve the next call."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from services._bwrap import BwrapOptions, bwrap_argv, find_bwrap
from services.client import ToolbusClient
from services.worker import WorkerConfig
from tests._sandboxes import RUN, host_processes
from tests.conftest import Stack, StackFactory


async def _still_serving(client: ToolbusClient, tid: str) -> None:
    after = await client.execute(tid, "terminal", {"command": "echo alive"})
    assert after.success, after.error
    assert after.output == "alive\n"
    assert after.metadata["sandboxed"] is True


async def _two_trajectories(stack: Stack, trajectory: Callable[[], str]) -> tuple[str, str]:
    first, second = trajectory(), trajectory()
    for tid in (first, second):
        assert (await stack.client.execute(tid, "terminal", {"command": "true"})).success
    return first, second


async def test_cannot_read_another_slots_file_by_absolute_path(
    make_stack: StackFactory, trajectory: Callable[[], str], tmp_path: Path
) -> None:
    stack = await make_stack(slots=2)
    owner, intruder = await _two_trajectories(stack, trajectory)
    wrote = await stack.client.execute(owner, "write_file", {"path": "secret", "content": "s3"})
    host_file = tmp_path / stack.workers[0].worker_id / f"slot_{wrote.metadata['slot']}" / "secret"
    assert host_file.read_text() == "s3"
    for command in (f"cat {host_file}", "cat /workspace/../slot_0/secret /workspace/../*/secret"):
        attempt = await stack.client.execute(intruder, "terminal", {"command": command})
        assert not attempt.success
        assert "s3" not in attempt.output
    await _still_serving(stack.client, intruder)


async def test_cannot_write_outside_the_workspace(
    make_stack: StackFactory, trajectory: Callable[[], str], tmp_path: Path
) -> None:
    stack = await make_stack()
    tid = trajectory()
    outside = tmp_path / "outside.txt"
    for command in (
        "echo x > /usr/evil",
        "echo x > /etc/evil",
        f"echo x > {outside}",
        "mkdir -p /home/evil",
    ):
        attempt = await stack.client.execute(tid, "terminal", {"command": command})
        assert not attempt.success, command
    assert not Path("/home/evil").exists()
    assert not Path("/usr/evil").exists()
    assert not Path("/etc/evil").exists()
    assert not outside.exists()
    # /tmp is writable but private to the sandbox.
    assert (await stack.client.execute(tid, "terminal", {"command": "echo t > /tmp/t"})).success
    assert not Path("/tmp/t").exists() or Path("/tmp/t").read_text() != "t\n"
    await _still_serving(stack.client, tid)


async def test_symlinks_cannot_carry_file_tools_outside(
    make_stack: StackFactory, trajectory: Callable[[], str], tmp_path: Path
) -> None:
    stack = await make_stack()
    tid = trajectory()
    target = tmp_path / "host-target.txt"
    target.write_text("host")
    await stack.client.execute(
        tid, "terminal", {"command": f"ln -s {target} out && ln -s /etc/hostname etc-link"}
    )
    read = await stack.client.execute(tid, "read_file", {"path": "out"})
    assert not read.success
    assert "outside the workspace" in read.error
    written = await stack.client.execute(tid, "write_file", {"path": "out", "content": "pwned"})
    assert not written.success
    assert target.read_text() == "host"
    assert not (await stack.client.execute(tid, "read_file", {"path": "etc-link"})).success
    await _still_serving(stack.client, tid)


async def test_host_processes_are_invisible_and_the_worker_cannot_be_killed(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    listing = await stack.client.execute(
        tid, "terminal", {"command": "ls /proc | grep -c '^[0-9]'"}
    )
    assert int(listing.output) < 10  # the launcher (pid 1), this shell and ls
    me = os.getpid()  # the worker runs in this test process
    kill = await stack.client.execute(tid, "terminal", {"command": f"kill -9 {me}"})
    assert not kill.success
    assert "No such process" in kill.output
    # Killing everything it can see ends only the sandbox's other processes (not its pid 1).
    await stack.client.execute(tid, "terminal", {"command": "kill -9 -1"})
    await _still_serving(stack.client, tid)


@pytest.mark.parametrize("allow_network", [False, True])
async def test_network_off_leaves_only_loopback(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str, allow_network: bool
) -> None:
    stack = await make_stack(worker_options={"allow_network": allow_network})
    tid = trajectory()
    port = nats_url.rsplit(":", 1)[1]
    probe = f"timeout 3 bash -c 'echo > /dev/tcp/127.0.0.1/{port}' && echo reached"
    result = await stack.client.execute(tid, "terminal", {"command": probe})
    assert result.metadata["network_isolated"] is (not allow_network)
    if allow_network:
        assert result.output.strip() == "reached"
    else:
        assert not result.success
        assert "reached" not in result.output
        interfaces = await stack.client.execute(
            tid, "terminal", {"command": "tail -n +3 /proc/net/dev | cut -d: -f1"}
        )
        assert interfaces.output.split() == ["lo"]
    await _still_serving(stack.client, tid)


async def test_timeout_kills_a_command_that_ignores_sigterm_and_its_escaped_children(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    command = (
        f"trap '' TERM; setsid sleep {RUN}1002.25 & nohup sleep {RUN}1002.5 >/dev/null & "
        "echo up; sleep 60"
    )
    result = await stack.client.execute(tid, "terminal", {"command": command}, timeout_s=1)
    assert result.metadata["status"] == "timeout"
    assert result.output == "up\n"
    assert host_processes(f"sleep {RUN}1002.25") == []
    assert host_processes(f"sleep {RUN}1002.5") == []
    await _still_serving(stack.client, tid)


async def test_background_processes_end_with_the_release(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    command = (
        f"nohup sleep {RUN}1003.25 >/dev/null 2>&1 & setsid sleep {RUN}1003.5 & "
        f"(sleep {RUN}1003.75 &); true"
    )
    started = await stack.client.execute(tid, "terminal", {"command": command})
    assert started.success
    assert len(host_processes(f"sleep {RUN}1003")) == 3  # they outlive the call...
    await stack.client.release(tid, reset_workspace=True)
    assert host_processes(f"sleep {RUN}1003") == []  # ...but not the release
    await _still_serving(stack.client, trajectory())


async def test_a_gigabyte_of_output_is_truncated_and_counted(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    result = await stack.client.execute(
        tid, "terminal", {"command": "head -c 1000000000 /dev/zero | tr '\\0' a"}, timeout_s=120
    )
    assert result.success
    assert result.metadata["truncated"] is True
    assert result.metadata["stdout_bytes"] == 1_000_000_000
    assert len(result.output) == WorkerConfig.__dataclass_fields__["max_output_chars"].default
    await _still_serving(stack.client, tid)


async def test_host_secrets_in_etc_are_masked(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    probe = "cat /etc/shadow 2>/dev/null | wc -c; ls -A /etc/ssh | wc -l; "
    probe += "cat /etc/machine-id 2>/dev/null | wc -c; cat /etc/hostname"
    result = await stack.client.execute(tid, "terminal", {"command": probe})
    lines = result.output.split()
    assert lines[0] == "0"  # nothing of /etc/shadow can be read
    assert lines[1] == "0"  # ssh host keys are not there
    assert lines[2] == "0"  # nor the host's identity, which anyone may read on the host
    assert lines[3]  # the rest of /etc is
    await _still_serving(stack.client, tid)


def test_only_secrets_the_slot_user_could_read_are_masked() -> None:
    """Each mask costs bubblewrap a mount: a slot's own user (unprivileged, no groups) gets
    none over a file its permissions keep it out of, and gets every other one; without an
    own user (root in the sandbox maps to the worker's root) every secret is masked."""
    bwrap = find_bwrap()
    assert bwrap is not None, "these tests need bubblewrap"
    options = BwrapOptions(bwrap=bwrap, allow_network=False)
    base = WorkerConfig.__dataclass_fields__["sandbox_uid_base"].default
    as_root = bwrap_argv(options, "/ws", ["true"])
    as_slot_user = bwrap_argv(options, "/ws", ["true"], owner=(base, base))
    checked = 0
    for secret in ("/etc/shadow", "/etc/gshadow", "/etc/machine-id"):
        if not Path(secret).is_file():
            continue
        others_read = Path(secret).stat().st_mode & stat.S_IROTH
        assert secret in as_root
        assert (secret in as_slot_user) == bool(others_read), secret
        checked += 1
    assert checked, "none of the secrets looked at is on this host"


async def test_a_root_workers_sandboxes_run_as_their_own_unprivileged_users(
    make_stack: StackFactory, trajectory: Callable[[], str], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test checks the root worker's user separation; run the suite as root")
    stack = await make_stack(slots=2)
    first, second = await _two_trajectories(stack, trajectory)
    uids = set()
    for tid in (first, second):
        who = await stack.client.execute(tid, "terminal", {"command": "id -u"})
        uids.add(int(who.output))
    base = WorkerConfig.__dataclass_fields__["sandbox_uid_base"].default
    assert uids == {base, base + 1}  # one host user per slot, neither of them root
    # Files the worker writes for the model stay writable by the sandbox's user.
    wrote = await stack.client.execute(first, "write_file", {"path": "d/e/f.txt", "content": "a"})
    appended = await stack.client.execute(first, "terminal", {"command": "echo b >> d/e/f.txt"})
    assert appended.success, appended.output
    slot = wrote.metadata["slot"]  # whichever it got (a warm slot goes first)
    workspace = tmp_path / stack.workers[0].worker_id / f"slot_{slot}"
    assert (workspace / "d" / "e" / "f.txt").stat().st_uid == base + slot
    await _still_serving(stack.client, first)


async def test_a_sandbox_user_has_a_name_so_lookups_end_in_etc_passwd(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    # Without an entry, whoami failed ("cannot find name for user ID") and every bash start
    # tried each NSS module (systemd's too: about 1 ms per command) before failing.
    if os.geteuid() != 0:
        pytest.fail("this test checks the root worker's user separation; run the suite as root")
    stack = await make_stack(slots=1)
    tid = trajectory()
    probe = "whoami; id -gn; getent passwd sandbox | cut -d: -f6; id -un 0; grep -c . /etc/passwd"
    result = await stack.client.execute(tid, "terminal", {"command": probe})
    assert result.success, result.output
    name, group, home, root, lines = result.output.split()
    assert (name, group, home, root) == ("sandbox", "sandbox", "/workspace", "root")
    host_lines = len([line for line in Path("/etc/passwd").read_text().splitlines() if line])
    assert int(lines) in (host_lines, host_lines + 1)  # the host's users, and this one
    await _still_serving(stack.client, tid)


async def test_a_call_can_ask_for_no_network_where_the_service_allows_it(
    make_stack: StackFactory, trajectory: Callable[[], str], nats_url: str
) -> None:
    stack = await make_stack(worker_options={"allow_network": True})
    tid = trajectory()
    port = nats_url.rsplit(":", 1)[1]
    probe = f"timeout 3 bash -c 'echo > /dev/tcp/127.0.0.1/{port}' && echo reached; ls"
    wrote = await stack.client.execute(
        tid, "write_file", {"path": "shared.txt", "content": "x"}, allow_network=False
    )
    assert wrote.success  # file tools need no network: the flag does not stop them
    offline = await stack.client.execute(tid, "terminal", {"command": probe}, allow_network=False)
    assert "reached" not in offline.output
    assert "shared.txt" in offline.output  # same workspace
    assert offline.metadata["network_isolated"] is True
    online = await stack.client.execute(tid, "terminal", {"command": probe})
    assert "reached" in online.output
    assert online.metadata["network_isolated"] is False
    stateful = await stack.client.execute(
        tid, "terminal_stateful", {"command": "true"}, allow_network=False
    )
    assert not stateful.success
    assert "supported for terminal only" in stateful.error
    await stack.client.release(tid, reset_workspace=True)
    await _still_serving(stack.client, trajectory())


async def test_a_nul_byte_is_refused_and_the_slots_processes_live_on(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    started = await stack.client.execute(tid, "terminal", {"command": f"sleep {RUN}1007.25 & true"})
    assert started.success, started.error
    assert (await stack.client.execute(tid, "tmux", {"action": "start"})).success
    for tool, arguments, field in (
        ("terminal", {"command": "echo a\x00b"}, "command"),
        ("terminal_stateful", {"command": "echo a\x00b"}, "command"),
        ("tmux", {"action": "send_keys", "keys": ["echo a\x00b", "Enter"]}, "keys"),
        ("read_file", {"path": "a\x00b"}, "path"),
    ):
        refused = await stack.client.execute(tid, tool, arguments)
        assert not refused.success, tool
        assert refused.metadata["error_kind"] == "invalid_arguments", (tool, refused)
        assert f"{field}" in refused.error and "NUL character" in refused.error, refused.error
    assert len(host_processes(f"sleep {RUN}1007.25")) == 1  # the sandbox did not die...
    screen = await stack.client.execute(tid, "tmux", {"action": "capture"})
    assert screen.success, screen.error  # ...nor did its tmux session
    await stack.client.release(tid, reset_workspace=True)
    assert host_processes(f"sleep {RUN}1007.25") == []
    await _still_serving(stack.client, trajectory())


async def test_a_timeout_reaches_processes_that_left_the_session_and_the_environment(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    escaped = (
        f"setsid env -i sleep {RUN}1008.25 & (setsid env -i sh -c 'sleep {RUN}1008.5 & true') & "
        "echo up; sleep 60"
    )
    result = await stack.client.execute(tid, "terminal", {"command": escaped}, timeout_s=1)
    assert result.metadata["status"] == "timeout"
    assert host_processes(f"sleep {RUN}1008.25") == []
    assert host_processes(f"sleep {RUN}1008.5") == []
    # A call that finishes leaves its background processes running, escaped or not.
    kept = await stack.client.execute(
        tid, "terminal", {"command": f"setsid env -i sleep {RUN}1008.75 &"}
    )
    assert kept.success, kept.error
    assert len(host_processes(f"sleep {RUN}1008.75")) == 1
    await stack.client.release(tid, reset_workspace=True)
    assert host_processes(f"sleep {RUN}1008.75") == []
    await _still_serving(stack.client, trajectory())
