"""A release answers only once its sandbox's namespace is empty: no process of the trajectory
runs on while its workspace is wiped, or after the release said the slot was clean.

Failed before the worker waited for the namespace (issue 10, found by a loaded full-suite run):
killing bubblewrap ended it at once, but its sandbox's pid 1 (the launcher) got its SIGKILL only
then, through ``--die-with-parent``, and the kernel ended the rest of the namespace after that;
the release (and the wipe) went on while background processes still ran.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services import _sandbox_process
from tests._sandboxes import RUN, host_processes
from tests._waits import until
from tests.conftest import StackFactory

# Many processes, some holding much memory: the kernel takes a while to end them all after
# bubblewrap is gone (each sleeper's memory is freed as it exits).
_SLEEPERS = 300
_HOLDERS = 6
_HOLD = "python3 -c 'import time; b = bytearray(400 << 20); time.sleep(1000)'"


async def test_a_release_answers_once_no_process_of_the_sandbox_is_left(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    marker = f"{RUN}1077"
    command = (
        f"for i in $(seq {_HOLDERS}); do {_HOLD} {marker}.h & done; "
        f"for i in $(seq {_SLEEPERS}); do sleep {marker}.$i & done; sleep 1; true"
    )
    started = await stack.client.execute(tid, "terminal", {"command": command})
    assert started.success, started.error
    assert len(host_processes(f"sleep {marker}.")) == _SLEEPERS
    await stack.client.release(tid, reset_workspace=True)
    assert host_processes(f"sleep {marker}.") == []


async def test_a_slot_whose_sandbox_may_still_run_goes_out_of_service(
    make_stack: StackFactory, trajectory: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A namespace that does not end within its bound after SIGKILL (a process stuck in the
    # kernel) was only logged: the release went on to wipe and free the slot while something
    # of the trajectory might still run in it. Here the wait for the namespace says "not yet".
    stack = await make_stack(slots=1)
    worker = stack.workers[0]
    tid = trajectory()
    assert (await stack.client.execute(tid, "terminal", {"command": "true"})).success

    async def never_ends(pidfd: int, timeout_s: float | None = None) -> bool:
        return False

    monkeypatch.setattr(_sandbox_process, "pidfd_exited", never_ends)
    await stack.client.release(tid, reset_workspace=True)
    await until(lambda: worker.slot_states()["out_of_service"] == 1)
    assert worker.slots_free == 0  # never handed out while it may not be clean
