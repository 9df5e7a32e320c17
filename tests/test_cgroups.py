"""How the worker finds its pids cgroups.

cgroup v1 is tested for real by the fork-bomb test (this machine has a v1 pids hierarchy). This
machine has no cgroup v2, so the v2 steps run here against a SIMULATED cgroupfs: a directory
tree with the files a v2 hierarchy has. It checks which files the worker reads and writes, in
what order; it cannot check the kernel's answers to them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services._cgroups import PidsCgroups


def _simulated_v2(tmp_path: Path, *, delegated: str = "cpu pids", procs: str = "") -> Path:
    mount = tmp_path / "cgroup"
    own = mount / "system.slice" / "toolbus.service"
    own.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpu io memory pids\n")
    (own / "cgroup.controllers").write_text(delegated + "\n")
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text(procs)
    (tmp_path / "self_cgroup").write_text("0::/system.slice/toolbus.service\n")
    return mount


async def test_v2_a_worker_alone_in_its_cgroup_moves_into_a_leaf_and_delegates_pids(
    tmp_path: Path,
) -> None:
    mount = _simulated_v2(tmp_path, procs=f"{os.getpid()}\n")
    own = mount / "system.slice" / "toolbus.service"
    probe = PidsCgroups.create("w1", mount=mount, self_cgroup=tmp_path / "self_cgroup")
    assert probe.cgroups is not None, probe.reason
    assert probe.cgroups.version == 2
    assert (own / "worker" / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.subtree_control").read_text() == "+pids"
    assert (own / "toolbus-w1" / "cgroup.subtree_control").read_text() == "+pids"
    slot = probe.cgroups.slot(3, 64)
    assert slot == own / "toolbus-w1" / "slot_3"
    assert (slot / "pids.max").read_text() == "64"


async def test_v2_refuses_a_cgroup_shared_with_other_processes(tmp_path: Path) -> None:
    mount = _simulated_v2(tmp_path, procs=f"{os.getpid()}\n1\n")
    probe = PidsCgroups.create("w1", mount=mount, self_cgroup=tmp_path / "self_cgroup")
    assert probe.cgroups is None
    assert "holds other processes (2)" in probe.reason
    assert not (mount / "system.slice" / "toolbus.service" / "worker").exists()


async def test_v2_without_a_delegated_pids_controller_says_so(tmp_path: Path) -> None:
    mount = _simulated_v2(tmp_path, delegated="cpu memory")
    probe = PidsCgroups.create("w1", mount=mount, self_cgroup=tmp_path / "self_cgroup")
    assert probe.cgroups is None
    assert probe.reason.startswith("the pids controller is not delegated to")


async def test_no_hierarchy_at_all_says_so(tmp_path: Path) -> None:
    probe = PidsCgroups.create("w1", mount=tmp_path, self_cgroup=tmp_path / "missing")
    assert probe.cgroups is None
    assert "no cgroup v1 pids or cgroup v2 hierarchy" in probe.reason


async def test_v1_on_this_machine() -> None:
    """The real hierarchy, where there is one (the fork-bomb test then relies on it)."""
    probe = PidsCgroups.create(f"test-{os.getpid()}")
    if probe.cgroups is None:
        pytest.skip(f"no writable pids hierarchy here: {probe.reason}")
    try:
        slot = probe.cgroups.slot(0, 7)
        assert (slot / "pids.max").read_text().strip() == "7"
    finally:
        await probe.cgroups.remove()
    assert not slot.exists() and not slot.parent.exists()
