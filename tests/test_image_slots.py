"""A trajectory names an image on its first call and its slot is made from it: a SWE-style task
(a bug at /testbed, its test failing, a patch, the test passing), the overlay gone at release,
clear errors for a bad name or an image that cannot be had (issue 12, part 1)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from services.exceptions import BadRequest
from tests._images import BuiltImage, Entry, busybox_image, layer, needs_busybox_as_root
from tests._waits import until
from tests.conftest import StackFactory

pytestmark = needs_busybox_as_root("image slots of a root worker: run as root")


@pytest.fixture
def task_image(tmp_path: Path) -> str:
    layout = busybox_image().write_layout(tmp_path / "task-layout", tag="v1")
    for directory in (layout, *layout.rglob("*")):  # the worker reads it, as any user
        directory.chmod(directory.stat().st_mode | 0o755 if directory.is_dir() else 0o644)
    return f"oci:{layout}:v1"


async def test_a_swe_style_task_in_its_image_from_failing_to_passing(
    make_stack: StackFactory, trajectory: Callable[[], str], task_image: str
) -> None:
    stack = await make_stack(slots=1)
    client, t = stack.client, trajectory()
    first = await client.execute(
        t, "terminal", {"command": "id -u; pwd; cat /etc/os-release; echo $IMAGE"}, image=task_image
    )
    assert first.success, first.error
    assert first.output.split() == ["0", "/testbed", "ID=toolbus-test-image", "busybox"]
    failing = await client.execute(t, "terminal", {"command": "sh test.sh"})
    assert not failing.success and "FAILED" in failing.output
    patched = await client.execute(t, "terminal", {"command": "sed -i 's/a - b/a + b/' app.py"})
    assert patched.success, patched.error
    passing = await client.execute(t, "terminal", {"command": "sh test.sh"}, image=task_image)
    assert passing.success and "PASSED" in passing.output, passing.output
    # The workspace is there too, and the file tools reach it.
    wrote = await client.execute(t, "terminal", {"command": "echo notes > /workspace/n.txt"})
    assert wrote.success, wrote.error
    read = await client.execute(t, "read_file", {"path": "n.txt"})
    assert read.success and read.output.strip() == "notes", read

    # A call that names another environment is refused, and changes nothing.
    with pytest.raises(BadRequest, match="has a slot of image"):
        await client.execute(t, "terminal", {"command": "true"}, image=f"{task_image}x")

    # Released: the next trajectory in that slot starts from the image's own files.
    await client.release(t, reset_workspace=True)
    await stack.workers[0].wait_settled()
    overlays = stack.workers[0]._config.workspace_root / "overlays"
    assert not any(overlays.iterdir()), list(overlays.iterdir())
    fresh = trajectory()
    again = await client.execute(fresh, "terminal", {"command": "sh test.sh"}, image=task_image)
    assert not again.success and "FAILED" in again.output
    await client.release(fresh, reset_workspace=True)
    # And a trajectory without an image gets the default environment in that slot again.
    plain = await client.execute(trajectory(), "terminal", {"command": "test -x /usr/bin/env"})
    assert plain.success, plain.error


async def test_a_bad_image_name_is_refused_and_an_unavailable_image_is_said(
    make_stack: StackFactory, trajectory: Callable[[], str], tmp_path: Path
) -> None:
    stack = await make_stack(slots=1)
    client = stack.client
    with pytest.raises(BadRequest, match="repository name"):
        await client.execute(trajectory(), "terminal", {"command": "true"}, image="Not/Valid")
    t = trajectory()
    missing = await client.execute(
        t, "terminal", {"command": "true"}, image=f"oci:{tmp_path / 'nowhere'}"
    )
    assert not missing.success and missing.metadata.get("image_unavailable") is True, missing
    assert "nowhere" in (missing.error or "")
    await client.release(t, reset_workspace=True)


async def test_a_trajectory_that_waits_for_a_slot_gets_one_made_from_its_image(
    make_stack: StackFactory, trajectory: Callable[[], str], task_image: str
) -> None:
    stack = await make_stack(slots=1)
    client, executor = stack.client, stack.executors[0]
    holder, waiter = trajectory(), trajectory()
    assert (await client.execute(holder, "terminal", {"command": "true"})).success
    waiting = asyncio.create_task(
        client.execute(waiter, "terminal", {"command": "cat /etc/os-release"}, image=task_image)
    )
    await until(lambda: executor.trajectories_waiting == 1)
    await client.release(holder, reset_workspace=True)
    served = await asyncio.wait_for(waiting, 30)
    assert served.success and "toolbus-test-image" in served.output, served
    await client.release(waiter, reset_workspace=True)


async def test_an_image_that_cannot_start_a_slot_says_why_and_is_let_go_at_release(
    make_stack: StackFactory, trajectory: Callable[[], str], tmp_path: Path
) -> None:
    no_shell = BuiltImage([layer(Entry("data/only", b"no shell here"))])
    layout = no_shell.write_layout(tmp_path / "no-shell")
    stack = await make_stack(slots=1)
    client, worker, t = stack.client, stack.workers[0], trajectory()
    for _ in range(2):  # each call says so; the image is held once, not once per call
        failed = await client.execute(t, "terminal", {"command": "true"}, image=f"oci:{layout}")
        assert not failed.success and "has no /bin/sh" in (failed.error or ""), failed
    await client.release(t, reset_workspace=True)
    await worker.wait_settled()
    store = worker._image_store
    assert [c.holders for c in store._images.values()] == [0]
