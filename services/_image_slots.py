"""Slots made from images: a trajectory that named an image gets its slot's tools from it.

A slot assigned with an image (``Slot.image``, set by ``SlotTable.assign``) keeps its default
tools, and gets image tools at its first call (:meth:`ImageSlots.tools_for`, inside the call's
run: a slot's calls run one at a time): the image is pulled (or found in the worker's cache)
and held while the slot has it, and the slot's overlay (``<overlays>/slot_<i>/upper`` and
``work``) is made for the image owner. The clean-up undoes it in its two steps: when the
slot's sandbox ends (:meth:`end`: the image tools closed, the image let go) and when its
workspace is wiped (:meth:`drop_overlay`: the overlay removed, so the next trajectory starts
from an image's own files again).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from schemas.messages import ErrorKindOfResult, ToolResult

from ._bwrap import ImageRoot
from ._image_layers import remove_tree
from ._image_store import ImageStore, ImageUnavailable
from ._sandbox import Sandbox, SandboxError, SandboxFactory
from ._slots import Slot
from ._tools import SlotTools, ToolFailure


class ImageSlots:
    def __init__(self, store: ImageStore, sandboxes: SandboxFactory, overlays: Path) -> None:
        self._store = store
        self._sandboxes = sandboxes
        self._overlays = overlays

    async def tools_for(self, slot: Slot) -> SlotTools:
        """The tools of the slot's call: the image's when the slot has one (ImageUnavailable
        when it cannot be had), else the slot's own."""
        if slot.image is None:
            return slot.tools
        if slot.image_tools is not None:
            return slot.image_tools
        if slot.image_held is None:  # (a call before got it, and then failed)
            slot.image_held = await self._store.acquire(slot.image)  # end() lets it go
        image = slot.image_held
        if not image.shell:  # the sandbox's pid 1 is a shell loop
            raise ImageUnavailable(
                f"image {slot.image} has no /bin/sh, which an image slot needs",
                kind="image_unavailable",
            )
        overlay = self._overlays / f"slot_{slot.index}"
        owner = self._sandboxes.image_owner
        for part in ("upper", "work"):
            (overlay / part).mkdir(parents=True, exist_ok=True)
        overlay.chmod(0o700)  # the trajectory's files: no other user of the host reads them
        if owner is not None:  # uid 0 inside writes them, and the workspace
            for path in (overlay, overlay / "upper", overlay / "work", slot.workspace):
                os.chown(path, *owner)
        root = ImageRoot(
            image.rootfs,
            overlay / "upper",
            overlay / "work",
            image.config.workdir or "/",
            image.shell,
        )
        sandbox = self._sandboxes.make_image(
            slot.index, slot.workspace, root, image.config.env, offline=False
        )
        slot.image_tools = SlotTools.for_sandbox(sandbox, _no_offline_sandbox)
        return slot.image_tools

    async def tools_or_failure(self, slot: Slot) -> SlotTools | ToolResult:
        """:meth:`tools_for`, or the result of a call that could not run for its image."""
        try:
            return await self.tools_for(slot)
        except ImageUnavailable as exc:
            return image_unavailable(exc.message)
        except (SandboxError, OSError) as exc:  # the worker's side: its sandbox, its disk
            return image_unavailable(f"image {slot.image}: cannot make its slot: {exc}")

    async def end(self, slot: Slot) -> None:
        """The slot's sandbox ends: its image tools are closed, its image let go."""
        tools, slot.image_tools = slot.image_tools, None
        held, slot.image_held = slot.image_held, None
        try:
            if tools is not None:
                await tools.close()
        finally:
            if held is not None:
                self._store.release(held)

    async def drop_overlay(self, slot: Slot) -> None:
        """The slot's workspace is wiped: so is its overlay (in a thread: it may be big)."""
        overlay = self._overlays / f"slot_{slot.index}"
        if overlay.exists():
            await asyncio.to_thread(remove_tree, overlay, ignore_errors=False)


def _no_offline_sandbox() -> Sandbox:
    # A network-less second sandbox would need the overlay the slot's sandbox has mounted.
    raise ToolFailure(
        "allow_network=false is not yet available in image slots (their sandbox has the "
        "network the worker allows)",
        ErrorKindOfResult.SANDBOX,
    )


def image_unavailable(message: str) -> ToolResult:
    """A call of a slot whose image cannot be had: it did not run (the caller's image name or
    source is wrong, or the registry away: the message says which)."""
    return ToolResult(
        success=False,
        error=message,
        metadata={"error_kind": str(ErrorKindOfResult.SANDBOX), "image_unavailable": True},
    )
