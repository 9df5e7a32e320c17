"""What workers that died on this host left behind, cleaned up by the next worker to start here:
their workspace directories (trajectories' files) and their slots' pids cgroups.

A worker holds an exclusive ``flock`` on ``<workspace_root>/.alive`` for as long as it runs;
the kernel drops it when the process ends, however it ends (kill -9 included). A worker that
starts looks at its siblings in the same parent directory (``<data_dir>/workers``): one whose
``.alive`` it can lock belongs to a worker that is no more, and it removes that worker's
cgroups and files while holding the lock, so two workers starting at once never clean the same
one, and a worker restarted under that id waits for nothing (its own start wipes its slots
anyway). A directory without ``.alive`` is not a worker's, or an older toolbus's: left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import structlog

from ._cgroups import PidsCgroups
from ._slot_cleanup import wipe_workspace
from .exceptions import StartupError

log = structlog.get_logger("toolbus.worker")

ALIVE_FILE = ".alive"
_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW


class AliveLock:
    """The flock that says this worker runs; StartupError when another process holds it."""

    def __init__(self, root: Path) -> None:
        self._path = root / ALIVE_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, _OPEN_FLAGS | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"worker {self._path.parent.name!r} already runs on this host (another process "
                f"holds {self._path}): give each worker an id of its own"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def clean_dead_workers(own_root: Path, cgroups: PidsCgroups | None) -> list[str]:
    """Remove what dead workers beside ``own_root`` left; returns their ids. Blocking (a big
    tree takes a while): run it in a thread."""
    cleaned = []
    for root, fd in _dead_workers(own_root):
        worker_id = root.name
        try:
            if cgroups is not None:
                cgroups.remove_worker(worker_id)
            wipe_workspace(root)
            root.rmdir()
        except Exception as exc:  # whatever is left stays for the next worker to try
            log.warning("cleaning up after a dead worker failed", dead=worker_id, error=repr(exc))
        else:
            cleaned.append(worker_id)
            log.info("cleaned up after a dead worker", dead=worker_id)
        finally:
            os.close(fd)
    return cleaned


def _dead_workers(own_root: Path) -> Iterator[tuple[Path, int]]:
    """Sibling worker roots whose ``.alive`` this process could lock, with the locked fd."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(own_root.parent):
            root = Path(entry.path)
            if root == own_root or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = os.open(root / ALIVE_FILE, _OPEN_FLAGS)
            except OSError:
                continue  # not a worker's directory (or not one this toolbus made)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # its worker runs
            yield root, fd
