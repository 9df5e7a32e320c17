"""An image slot's sandbox: the image as its root, read-only underneath, with a writable overlay
of the slot's own; uid 0 inside; the image's environment and working directory; none of the
host's files (issue 12, part 1). The image is made here from Debian's busybox-static."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from services._bwrap import ImageRoot
from services._image_store import Image, ImageStore
from services._sandbox import BwrapOptions, BwrapSandbox, find_bwrap
from services._zygote import LauncherZygote
from tests._images import busybox_image, needs_busybox_as_root
from tests._sandboxes import sh

_OWNER = (2_000_000_990, 2_000_000_990)  # the image owner: apart from every other test's


pytestmark = needs_busybox_as_root("the image owner is a user of its own: root")


@pytest.fixture
async def image(tmp_path: Path) -> AsyncIterator[Image]:
    _passable(tmp_path)
    store = ImageStore(tmp_path / "images")
    store.open(owner=_OWNER)
    layout = busybox_image().write_layout(tmp_path / "layout")
    got = await store.acquire(f"oci:{layout}")
    yield got
    store.release(got)


def _passable(path: Path) -> None:
    """The image owner must walk down to the test's directories."""
    for directory in (path, *path.parents):
        if directory == Path(tempfile.gettempdir()):
            break
        directory.chmod(directory.stat().st_mode | 0o111)


@asynccontextmanager
async def _image_slot(image: Image, slot: Path) -> AsyncIterator[BwrapSandbox]:
    bwrap = find_bwrap()
    assert bwrap is not None
    for part in ("upper", "work", "workspace"):
        (slot / part).mkdir(parents=True, exist_ok=True)
        os.chown(slot / part, *_OWNER)
    root = ImageRoot(image.rootfs, slot / "upper", slot / "work", image.config.workdir, image.shell)
    zygote = LauncherZygote()
    sandbox = BwrapSandbox(
        slot / "workspace",
        BwrapOptions(bwrap=bwrap, allow_network=False),
        zygote=zygote,
        owner=_OWNER,
        image=root,
        image_env=image.config.env,
    )
    try:
        yield sandbox
    finally:
        await sandbox.close()
        await zygote.close()


async def test_an_image_slot_runs_in_the_image_as_root_with_its_env_and_workdir(
    image: Image, tmp_path: Path
) -> None:
    async with _image_slot(image, tmp_path / "slot") as sandbox:
        ran = await sh(sandbox, "id -u; pwd; cat /etc/os-release; echo $IMAGE $HOME; ls /")
    assert ran.exit_code == 0, ran.stderr.text
    lines = ran.stdout.text.splitlines()
    assert lines[:4] == ["0", "/testbed", "ID=toolbus-test-image", "busybox /root"]
    # The image's directories, and what every sandbox gets; nothing of the host's.
    assert set(lines[4:]) == {"bin", "dev", "etc", "proc", "root", "run", "testbed", "tmp"} | {
        "var",
        "workspace",
    }


async def test_writes_anywhere_stay_in_the_slots_overlay(image: Image, tmp_path: Path) -> None:
    command = (
        "echo '    # patched' >> app.py && mkdir -p /usr/local/lib/x && echo y > /usr/local/lib/x/f"
        " && rm /etc/os-release && echo w > /workspace/out && cat app.py"
    )
    async with _image_slot(image, tmp_path / "one") as sandbox:
        wrote = await sh(sandbox, command)
        assert wrote.exit_code == 0, wrote.stderr.text
        assert wrote.stdout.text.endswith("# patched\n")
        async with _image_slot(image, tmp_path / "two") as other:
            seen = await sh(other, "cat app.py /etc/os-release; ls /usr/local/lib/x 2>&1")
    assert "# patched" not in seen.stdout.text and "ID=toolbus-test-image" in seen.stdout.text
    assert "No such file" in seen.stdout.text
    # The image itself is untouched; the slot's upper layer holds every change.
    assert b"patched" not in (image.rootfs / "testbed/app.py").read_bytes()
    assert (image.rootfs / "etc/os-release").exists()
    upper = tmp_path / "one" / "upper"
    assert b"# patched" in (upper / "testbed/app.py").read_bytes()
    assert (upper / "usr/local/lib/x/f").read_text() == "y\n"
    assert (tmp_path / "one" / "workspace" / "out").read_text() == "w\n"


async def test_a_slot_whose_overlay_is_dropped_starts_from_the_image_again(
    image: Image, tmp_path: Path
) -> None:
    slot = tmp_path / "slot"
    async with _image_slot(image, slot) as sandbox:
        assert (await sh(sandbox, "echo changed > app.py")).exit_code == 0
    for part in ("upper", "work"):  # what a release does with the slot's layer
        shutil.rmtree(slot / part)
    async with _image_slot(image, slot) as sandbox:
        again = await sh(sandbox, "cat app.py")
    assert again.stdout.text.startswith("def add"), again.stdout.text


async def test_an_image_slot_sees_no_host_process_and_no_host_file(
    image: Image, tmp_path: Path
) -> None:
    marker = f"host-{uuid.uuid4().hex[:8]}"
    (tmp_path / marker).write_text("secret")
    async with _image_slot(image, tmp_path / "slot") as sandbox:
        processes = await sh(sandbox, "ps -o pid,args")
        looked = await sh(sandbox, f"ls /{tmp_path.relative_to('/')}")
    assert processes.exit_code == 0, processes.stderr.text
    # Its own: pid 1 (the hold), the launcher's children; not one of the host's.
    listed = processes.stdout.text.splitlines()[1:]
    assert listed and all("python" not in line and "pytest" not in line for line in listed)
    assert looked.exit_code != 0 and marker not in looked.stdout.text
