"""The worker's open-file limit: raised to the hard limit at start, checked against its slots.

Each live slot holds file descriptors in the worker: its sandbox's control socket, and the
pipes of the command it runs. The usual soft limit (1024) holds a few hundred slots; the hard
limit (often 2^19 or 2^20) holds far more. So the worker raises its soft limit to the hard one
at start and says, when even that cannot hold every slot, how many it can.

Commands in the sandboxes keep the soft limit the worker was started with
(:func:`inherited_limit`): a program that closes every fd up to its limit stays as quick.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import structlog

log = structlog.get_logger("toolbus.worker")

# Per slot: its sandbox's control socket, and a running command's stdout, stderr and stdin.
FDS_PER_SLOT = 4
# The rest of the worker: NATS, the event loop, logs, file tools, artifact transfers.
FDS_MARGIN = 256

_NR_OPEN = "/proc/sys/fs/nr_open"  # the kernel's ceiling for RLIMIT_NOFILE
_inherited: tuple[int, int] | None = None  # the limits this process was started with


@dataclass(frozen=True, slots=True)
class FdLimit:
    soft: int
    hard: int
    raised_from: int

    @property
    def slots_held(self) -> int:
        """How many slots the soft limit holds (each busy with a command)."""
        return max((self.soft - FDS_MARGIN) // FDS_PER_SLOT, 0)


def raise_fd_limit() -> FdLimit:
    """Raise RLIMIT_NOFILE's soft limit as far as the hard limit (and the kernel) allow."""
    global _inherited
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _inherited is None:
        _inherited = (soft, hard)
    target = hard if hard != resource.RLIM_INFINITY else _kernel_ceiling()
    if soft == resource.RLIM_INFINITY or soft >= target:
        return FdLimit(soft, hard, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # a ceiling below the hard limit: keep what there is
        return FdLimit(soft, hard, soft)
    return FdLimit(target, hard, soft)


def check_fd_limit(slots: int, spare_slots: int = 0) -> FdLimit:
    """At worker start: raise the limit, and warn when it cannot hold ``slots`` slots and the
    ``spare_slots`` beside them (saying how many trajectories it can hold)."""
    limit = raise_fd_limit()
    if limit.slots_held < slots + spare_slots:
        log.warning(
            "the open-file limit cannot hold every slot: raise RLIMIT_NOFILE's hard limit "
            "(ulimit -Hn, LimitNOFILE=) or run fewer slots",
            slots=slots,
            spare_slots=spare_slots,
            slots_held=max(limit.slots_held - spare_slots, 0),
            nofile_soft=limit.soft,
            nofile_hard=limit.hard,
            fds_needed=(slots + spare_slots) * FDS_PER_SLOT + FDS_MARGIN,
        )
    return limit


def inherited_limit() -> dict[str, tuple[int, int]]:
    """RLIMIT_NOFILE as this process got it, for a sandbox's rlimits, once it was raised."""
    if _inherited is None:
        return {}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _inherited[0] >= soft:
        return {}
    return {"RLIMIT_NOFILE": (_inherited[0], hard)}


def _kernel_ceiling() -> int:
    try:
        with open(_NR_OPEN) as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 1 << 20
