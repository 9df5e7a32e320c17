"""A worker's images: pulled once, checked against their digests, unpacked once, shared.

``<cache>/blobs/sha256/<hex>`` holds what a pull fetched (each blob written to a temporary
file, its sha256 checked, then renamed: a blob on disk is one whose digest held);
``<cache>/roots/<id>/`` an image's root filesystem, its layers applied in order
(``_image_layers.py``); ``<cache>/roots/<id>.json`` what is known of it (its config, its
size, the names it was pulled by). An image's id is its config's digest, so two names of
one image share one root. A root is unpacked into a directory of its own and renamed into
place when whole: one a crash left half made is never used, and is removed at the next start.

Concurrent asks for one name share one pull. A slot that uses an image holds it
(:meth:`ImageStore.hold`); past ``max_bytes`` the images used longest ago that nobody
holds are removed. A tag is looked up again after ``DEFAULT_TAG_TTL_S`` (a tag may move);
a name by digest never.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ._image_layers import (
    LayerError,
    apply_layer,
    ensure_directory,
    has_file,
    remove_tree,
    tree_bytes,
)
from ._image_refs import ImageName, parse_image_name
from ._image_sources import ImageManifest, ImageSource, ImageSourceError, open_source
from .exceptions import ServiceError

log = structlog.get_logger("toolbus.images")

DEFAULT_IMAGE_CACHE_MB = 20 * 1024
DEFAULT_TAG_TTL_S = 300.0
DEFAULT_EVICTION_GRACE_S = 60.0
_CHUNK = 1024 * 1024


class ImageUnavailable(ServiceError):
    """The image cannot be had: its name, its source, or its content is wrong (message)."""


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What of an image's config a slot honours."""

    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""

    @classmethod
    def from_blob(cls, data: dict[str, Any]) -> ImageConfig:
        config = data.get("config") or {}
        return cls(
            env=tuple(str(item) for item in config.get("Env") or ()),
            workdir=str(config.get("WorkingDir") or ""),
            user=str(config.get("User") or ""),
        )


@dataclass(frozen=True, slots=True)
class Image:
    id: str  # the config's digest
    rootfs: Path
    config: ImageConfig
    size_bytes: int
    shell: str = "/bin/sh"  # what runs a command string: its bash, else its sh; "" if neither


@dataclass(slots=True)
class _Cached:
    image: Image
    last_used: float
    holders: int = 0
    names: dict[str, float] = field(default_factory=dict)  # name -> when it was resolved


class ImageStore:
    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = DEFAULT_IMAGE_CACHE_MB * 1024 * 1024,
        auth_file: Path | None = None,
        insecure_registries: frozenset[str] = frozenset(),
        tag_ttl_s: float = DEFAULT_TAG_TTL_S,
        eviction_grace_s: float = DEFAULT_EVICTION_GRACE_S,
    ) -> None:
        self._root = root
        self._blobs = root / "blobs" / "sha256"
        self._roots = root / "roots"
        self._max_bytes = max_bytes
        self._auth_file = auth_file
        self._insecure = insecure_registries
        self._tag_ttl_s = tag_ttl_s
        self._eviction_grace_s = eviction_grace_s
        self._owner: tuple[int, int] | None = None  # of every file of every root (see open)
        self._images: dict[str, _Cached] = {}  # by id
        self._pulls: dict[str, asyncio.Task[None]] = {}  # by name, while one runs
        self._unpacks: dict[str, asyncio.Task[None]] = {}  # by image id, while one runs
        self._manifests: dict[str, ImageManifest] = {}  # of the unpacks under way, by id
        self._removals: set[asyncio.Task[None]] = set()  # of evicted roots, in threads

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self, *, owner: tuple[int, int] | None = None) -> None:
        """Load what earlier runs left (whole roots only; half-made ones are removed). Roots
        unpacked from now on are ``owner``'s (image slots' uid 0), else this process's user.
        Blocking."""
        self._owner = owner
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._roots.mkdir(parents=True, exist_ok=True)
        # The roots are the image owner's alone (its sandboxes read them), the blobs the
        # worker's: no other user of the host reaches either.
        self._root.chmod(0o711)
        for private in (self._roots, self._blobs.parent, self._blobs):
            private.chmod(0o700)
        if owner is not None:
            os.chown(self._roots, *owner)
        for entry in self._roots.iterdir():
            if entry.suffix == ".json":
                self._load(entry)
        known = {cached.image.rootfs for cached in self._images.values()}
        for entry in self._roots.iterdir():
            if entry.is_dir() and entry not in known:  # half made, or its record lost
                remove_tree(entry, ignore_errors=True)
        for partial in self._blobs.glob(".partial-*"):
            partial.unlink(missing_ok=True)

    def _load(self, meta: Path) -> None:
        try:
            data = json.loads(meta.read_text())
            image = Image(
                id=data["id"],
                rootfs=self._roots / data["id"].partition(":")[2],
                config=ImageConfig(**data["config"]),
                size_bytes=int(data["size_bytes"]),
                shell=str(data.get("shell", "/bin/sh")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            meta.unlink(missing_ok=True)  # its root, if any, is removed as unknown below
            return
        if image.rootfs.is_dir():
            self._images[image.id] = _Cached(image, last_used=meta.stat().st_mtime)
        else:
            meta.unlink(missing_ok=True)

    # -- getting an image ---------------------------------------------------------------------
    async def acquire(self, text: str) -> Image:
        """The image ``text`` names, pulled and unpacked if it is not here yet, and held (not
        evicted) until :meth:`release`. ImageUnavailable (or ImageNameError) says why not."""
        name = parse_image_name(text)
        key = str(name)
        while True:
            cached = self._resolved(key, by_digest=name.by_digest)
            if cached is not None:
                cached.holders += 1  # in the step that found it: no eviction in between
                cached.last_used = time.time()
                return cached.image
            pull = self._pulls.get(key)
            if pull is None:
                pull = asyncio.create_task(self._pull(name), name=f"pull {key}")
                self._pulls[key] = pull
                pull.add_done_callback(lambda _: self._pulls.pop(key, None))
            await asyncio.shield(pull)  # then found above (or, evicted meanwhile, pulled again)

    def release(self, image: Image) -> None:
        cached = self._images.get(image.id)
        if cached is not None and cached.image is image:
            cached.holders -= 1
            cached.last_used = time.time()

    @property
    def size_bytes(self) -> int:
        return sum(c.image.size_bytes for c in self._images.values())

    def _resolved(self, key: str, *, by_digest: bool) -> _Cached | None:
        now = time.monotonic()
        for cached in self._images.values():
            resolved_at = cached.names.get(key)
            if resolved_at is not None and (by_digest or now - resolved_at < self._tag_ttl_s):
                return cached
        return None

    async def _pull(self, name: ImageName) -> None:
        """Resolve the name (in a thread) and unpack its image unless it is here: the name
        then leads to it. Shared by every asker of the name meanwhile."""
        try:
            source, manifest = await asyncio.to_thread(self._resolve, name)
            try:
                image_id = manifest.config_digest
                if image_id not in self._images:
                    unpack = self._unpacks.get(image_id)
                    if unpack is None:  # two names of one image: one unpack
                        unpack = asyncio.create_task(self._unpack(source, manifest))
                        self._unpacks[image_id] = unpack
                        self._manifests[image_id] = manifest
                        unpack.add_done_callback(lambda _: self._unpack_ended(image_id))
                    await asyncio.shield(unpack)
            finally:
                await asyncio.to_thread(source.close)
        except (ImageSourceError, LayerError) as exc:
            raise ImageUnavailable(f"image {name}: {exc}", kind="image_unavailable") from None
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            # A manifest, index or config of the wrong shape, or a tar member of a bad name.
            raise ImageUnavailable(
                f"image {name}: malformed ({type(exc).__name__}: {exc})", kind="image_unavailable"
            ) from None
        except OSError as exc:
            raise ImageUnavailable(
                f"image {name}: cannot store it ({exc.strerror}: {exc.filename})",
                kind="image_unavailable",
            ) from None
        cached = self._images.get(image_id)
        if cached is not None:
            cached.names[str(name)] = time.monotonic()
            cached.last_used = time.time()
            await self._evict(keep=image_id)

    def _resolve(self, name: ImageName) -> tuple[ImageSource, ImageManifest]:
        source = open_source(name, auth_file=self._auth_file, insecure=self._insecure)
        try:
            return source, source.manifest()
        except BaseException:
            source.close()
            raise

    async def _unpack(self, source: ImageSource, manifest: ImageManifest) -> None:
        image = await asyncio.to_thread(self._unpack_blocking, source, manifest)
        self._images[image.id] = _Cached(image, last_used=time.time())
        log.info("image unpacked", id=image.id, mb=image.size_bytes >> 20)
        # Its blobs were for unpacking (the root is the cache), but those an unpack under way
        # needs too.
        needed = {
            digest
            for other, under_way in self._manifests.items()
            if other != image.id
            for digest in _digests(under_way)
        }
        for digest in _digests(manifest) - needed:
            (self._blobs / digest.partition(":")[2]).unlink(missing_ok=True)

    def _unpack_ended(self, image_id: str) -> None:
        self._unpacks.pop(image_id, None)
        self._manifests.pop(image_id, None)

    def _unpack_blocking(self, source: ImageSource, manifest: ImageManifest) -> Image:
        config_blob = self._fetch(source, manifest.config_digest)
        try:
            config = ImageConfig.from_blob(json.loads(config_blob.read_bytes()))
        except ValueError as exc:
            raise ImageSourceError(f"its config is not JSON: {exc}") from None
        partial = self._roots / f".partial-{secrets.token_hex(6)}"
        partial.mkdir(mode=0o755)
        if self._owner is not None:
            os.chown(partial, *self._owner)
        try:
            for layer in manifest.layers:
                blob = self._fetch(source, layer.digest)
                apply_layer(blob, partial, owner=self._owner)
            if config.workdir:
                ensure_directory(partial, config.workdir, self._owner)
            size = tree_bytes(partial)
            shell = next((f"/{s}" for s in ("bin/bash", "bin/sh") if has_file(partial, s)), "")
            rootfs = self._roots / manifest.config_digest.partition(":")[2]
            os.rename(partial, rootfs)
        except BaseException:
            remove_tree(partial, ignore_errors=True)
            raise
        image = Image(manifest.config_digest, rootfs, config, size, shell)
        meta = {
            "id": image.id,
            "size_bytes": size,
            "config": _config_fields(config),
            "shell": shell,
        }
        _write_atomically(rootfs.with_suffix(".json"), json.dumps(meta).encode())
        return image

    def _fetch(self, source: ImageSource, digest: str) -> Path:
        """The blob, from the cache or the source; its digest checked before it is kept."""
        algorithm, _, hex_digest = digest.partition(":")
        if algorithm != "sha256" or len(hex_digest) != 64:
            raise ImageSourceError(f"unsupported digest {digest!r}")
        path = self._blobs / hex_digest
        if path.exists():
            return path
        partial = self._blobs / f".partial-{secrets.token_hex(6)}"
        hasher = hashlib.sha256()
        try:
            with source.open_blob(digest) as stream, partial.open("wb") as out:
                while chunk := stream.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
            if hasher.hexdigest() != hex_digest:
                raise ImageSourceError(f"blob {digest} does not match its digest")
            os.rename(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return path

    # -- eviction -----------------------------------------------------------------------------
    async def _evict(self, *, keep: str) -> None:
        """Past the size limit: the images used longest ago that no slot holds go (not one
        used in the last ``eviction_grace_s``: a pull's askers take their holds a moment after
        it ends, and two big images must not evict each other in turns). Each leaves the view
        and its place at once (renamed aside: a new pull of it unpacks anew); its files are
        removed in a thread."""
        recent = time.time() - self._eviction_grace_s
        idle = sorted(
            (
                c
                for c in self._images.values()
                if c.holders == 0 and c.image.id != keep and c.last_used < recent
            ),
            key=lambda c: c.last_used,
        )
        doomed: list[Path] = []
        while self.size_bytes > self._max_bytes and idle:
            cached = idle.pop(0)
            del self._images[cached.image.id]
            cached.image.rootfs.with_suffix(".json").unlink(missing_ok=True)
            aside = self._roots / f".partial-{secrets.token_hex(6)}"
            os.rename(cached.image.rootfs, aside)
            doomed.append(aside)
            log.info("image evicted", id=cached.image.id, mb=cached.image.size_bytes >> 20)
        for tree in doomed:  # not waited for: a removal left by a stop is redone at open()
            removal = asyncio.create_task(asyncio.to_thread(remove_tree, tree, ignore_errors=True))
            self._removals.add(removal)
            removal.add_done_callback(self._removals.discard)


def _digests(manifest: ImageManifest) -> set[str]:
    return {manifest.config_digest, *(layer.digest for layer in manifest.layers)}


def _config_fields(config: ImageConfig) -> dict[str, Any]:
    return {"env": list(config.env), "workdir": config.workdir, "user": config.user}


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".partial-{secrets.token_hex(6)}{path.suffix}")
    partial.write_bytes(data)
    os.rename(partial, path)
