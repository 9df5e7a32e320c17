"""A pids cgroup per slot, so a fork bomb in one slot stops at ``max_processes``.

RLIMIT_NPROC cannot do this for a sandbox that runs as root (the kernel exempts root), and is
shared by every slot that runs as the same user. So the worker puts each slot's sandbox in a
cgroup of the pids controller when it can write one:

- cgroup v1: ``<mount>/pids/toolbus/<worker>/slot_<i>``;
- cgroup v2: ``<own cgroup>/toolbus-<worker>/slot_<i>``, which needs the pids controller
  delegated to the worker's own cgroup (systemd ``Delegate=yes``, or a container with its own
  cgroup namespace). v2 forbids enabling controllers for the children of a cgroup that holds
  processes; a worker alone in its cgroup moves itself into a ``worker`` leaf first, otherwise
  it says why it cannot and goes without.

Without one, the limit is the rlimit alone (see ``SandboxFactory.process_limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CGROUP_MOUNT = Path("/sys/fs/cgroup")
_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CgroupProbe:
    """The outcome of looking for a writable pids hierarchy: cgroups, or why there are none."""

    cgroups: PidsCgroups | None
    reason: str = ""


class PidsCgroups:
    def __init__(self, root: Path, *, version: int) -> None:
        self._root = root
        self.version = version

    @classmethod
    def create(
        cls, name: str, *, mount: Path = DEFAULT_CGROUP_MOUNT, self_cgroup: Path = _SELF_CGROUP
    ) -> CgroupProbe:
        """A writable pids hierarchy for worker ``name``, or the reason there is none."""
        v1 = mount / "pids"
        if (v1 / "cgroup.procs").exists():
            return cls._create_v1(v1 / "toolbus" / name)
        if (mount / "cgroup.controllers").exists():
            return cls._create_v2(name, mount, self_cgroup)
        return CgroupProbe(None, f"no cgroup v1 pids or cgroup v2 hierarchy at {mount}")

    @classmethod
    def _create_v1(cls, root: Path) -> CgroupProbe:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return CgroupProbe(None, f"cannot create {root}: {exc.strerror}")
        return CgroupProbe(cls(root, version=1))

    @classmethod
    def _create_v2(cls, name: str, mount: Path, self_cgroup: Path) -> CgroupProbe:
        own = _own_v2_cgroup(mount, self_cgroup)
        if own is None:
            return CgroupProbe(None, f"no cgroup v2 entry in {self_cgroup}")
        if "pids" not in _words(own / "cgroup.controllers"):
            return CgroupProbe(None, f"the pids controller is not delegated to {own}")
        try:
            _enable_pids_for_children(own)
        except OSError as exc:
            return CgroupProbe(None, f"cannot enable pids below {own}: {exc}")
        root = own / f"toolbus-{name}"
        try:
            root.mkdir(exist_ok=True)
            _write(root / "cgroup.subtree_control", "+pids")
        except OSError as exc:
            return CgroupProbe(None, f"cannot create {root}: {exc.strerror}")
        return CgroupProbe(cls(root, version=2))

    def remove_worker(self, name: str) -> None:
        """Remove the cgroups another worker of this host left (it died): whatever still runs
        in them is killed first. Blocking."""
        parent = self._root.parent
        root = parent / name if self.version == 1 else parent / f"toolbus-{name}"
        if root == self._root or not root.is_dir():
            return
        for slot in root.glob("slot_*"):
            _kill_members(slot)
        deadline = time.monotonic() + 2.0  # killed processes take a moment to be reaped
        while True:
            for slot in root.glob("slot_*"):
                with contextlib.suppress(OSError):
                    slot.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()
            if not root.exists():
                return
            if time.monotonic() > deadline:
                raise OSError(f"cannot remove {root}: it still holds processes")
            time.sleep(0.05)

    def kill_leftovers(self) -> int:
        """Kill what still runs in this worker's own slot cgroups: the sandboxes of an earlier
        process of the same worker id that was killed (they outlive it, reparented to init).
        Call before the first slot starts. Returns how many slot cgroups held processes."""
        found = 0
        for slot in self._root.glob("slot_*"):
            if _words(slot / "cgroup.procs"):
                found += 1
                _kill_members(slot)
        return found

    def slot(self, index: int | str, max_pids: int) -> Path:
        """Slot ``index``'s cgroup (``"probe"``: the start's probe sandbox's, which a kill of
        the worker mid-start can leave behind as well)."""
        path = self._root / f"slot_{index}"
        path.mkdir(exist_ok=True)
        (path / "pids.max").write_text(str(max_pids))
        return path

    async def remove(self, *, timeout_s: float = 2.0) -> None:
        """Remove the cgroups once empty (killed sandboxes take a moment to be reaped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            for child in self._root.glob("slot_*"):
                with contextlib.suppress(OSError):
                    child.rmdir()
            with contextlib.suppress(OSError):
                self._root.rmdir()
            if not self._root.exists() or loop.time() > deadline:
                return
            await asyncio.sleep(0.05)


def join_cgroup(path: Path) -> None:
    """In a child process before exec: move itself into the cgroup (its children follow)."""
    (path / "cgroup.procs").write_text(str(os.getpid()))


def _kill_members(cgroup: Path) -> None:
    if (cgroup / "cgroup.kill").exists():  # cgroup v2, Linux 5.14+: the whole tree at once
        with contextlib.suppress(OSError):
            _write(cgroup / "cgroup.kill", "1")
        return
    for pid in _words(cgroup / "cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _own_v2_cgroup(mount: Path, self_cgroup: Path) -> Path | None:
    for line in self_cgroup.read_text().splitlines():
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    return None


def _enable_pids_for_children(own: Path) -> None:
    """Turn on pids for ``own``'s children, first moving this process out of the way."""
    if "pids" in _words(own / "cgroup.subtree_control"):
        return
    procs = _words(own / "cgroup.procs")
    if procs and procs != [str(os.getpid())]:
        raise OSError(
            f"it holds other processes ({len(procs)}); start the worker in a cgroup of its own"
        )
    if procs:  # only us: a cgroup with processes cannot hand controllers to its children
        leaf = own / "worker"
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
    _write(own / "cgroup.subtree_control", "+pids")


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _write(path: Path, text: str) -> None:
    with path.open("w") as file:
        file.write(text)
