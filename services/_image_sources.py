"""Where an image's manifest and blobs are read from: a registry, a layout, an archive.

Each source resolves its name to one :class:`ImageManifest` for this host's platform (an index
or manifest list is narrowed to ``linux/<arch>``) and opens the blobs it names by digest. The
registry protocol (auth challenges, tokens, credentials from a Docker ``config.json``) is
oras-py's (``oras.provider.Registry``); the formats (OCI image layout, ``docker save``) are
read here. Everything here blocks: the image store runs it in a thread. Nothing here trusts a
blob: the store checks every digest as it copies the bytes (``_image_store.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from ._image_refs import ImageName

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
REF_NAME = "org.opencontainers.image.ref.name"
TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class ImageSourceError(Exception):
    """The image cannot be read from its source (message: what, for the caller)."""


@dataclass(frozen=True, slots=True)
class LayerRef:
    digest: str
    media_type: str


@dataclass(frozen=True, slots=True)
class ImageManifest:
    config_digest: str
    layers: tuple[LayerRef, ...]


class ImageSource(Protocol):
    def manifest(self) -> ImageManifest: ...

    def open_blob(self, digest: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...

    def close(self) -> None: ...


def host_platform() -> tuple[str, str]:
    machine = platform.machine().lower()
    return "linux", _ARCH.get(machine, machine)


def open_source(
    name: ImageName, *, auth_file: Path | None, insecure: frozenset[str]
) -> ImageSource:
    if name.transport == "oci":
        return LayoutSource(_DirectoryFiles(Path(name.location)), name.reference)
    if name.transport == "docker-archive":
        return archive_source(Path(name.location), name.reference)
    return RegistrySource(name, auth_file=auth_file, insecure=name.location in insecure)


# -- manifests ------------------------------------------------------------------------------------
def _parse_json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise ImageSourceError(f"the {what} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ImageSourceError(f"the {what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ImageSourceError(f"the {what} is not a JSON object")
    return value


def _image_manifest(manifest: dict[str, Any]) -> ImageManifest:
    try:
        config = manifest["config"]["digest"]
        layers = tuple(
            LayerRef(layer["digest"], layer.get("mediaType", "")) for layer in manifest["layers"]
        )
    except (KeyError, TypeError):
        raise ImageSourceError("the image manifest has no config or layers") from None
    return ImageManifest(config, layers)


def _pick_platform(index: dict[str, Any]) -> str:
    """The digest of this host's platform's manifest in an index."""
    os_name, arch = host_platform()
    entries = [e for e in index.get("manifests", []) if isinstance(e, dict)]
    for entry in entries:
        wanted = entry.get("platform") or {}
        if wanted.get("os") == os_name and wanted.get("architecture") == arch:
            return str(entry["digest"])
    if len(entries) == 1 and "platform" not in entries[0]:
        return str(entries[0]["digest"])  # a layout's index of one image
    offered = sorted(
        f"{(e.get('platform') or {}).get('os')}/{(e.get('platform') or {}).get('architecture')}"
        for e in entries
    )
    raise ImageSourceError(f"no {os_name}/{arch} image in the index (it has {offered})")


# -- a registry -----------------------------------------------------------------------------------
REGISTRY_TIMEOUT_S = 30.0  # to connect, and between two reads of a reply


def _registry_client(host: str, *, insecure: bool) -> Any:
    """oras-py's registry client, with a timeout on every request and no retries of its own:
    oras retries a failed request five times, sleeping 5 to 83 s between (over two minutes
    for a registry that is down); here a pull fails at once and says why, and whoever asked
    decides whether to ask again."""
    import oras.provider  # imported when an image is first pulled: it brings requests
    import requests
    import requests.adapters

    class Registry(oras.provider.Registry):  # type: ignore[misc]
        do_request = oras.provider.Registry.do_request.__wrapped__

    class TimedAdapter(requests.adapters.HTTPAdapter):
        def send(self, *args: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = kwargs.get("timeout") or REGISTRY_TIMEOUT_S
            return super().send(*args, **kwargs)

    # oras answers a challenge with a token request unless told the registry wants Basic
    # auth (a distribution registry with htpasswd): asked once here, at the API's root.
    prefix = "http" if insecure else "https"
    try:
        challenge = requests.get(f"{prefix}://{host}/v2/", timeout=REGISTRY_TIMEOUT_S).headers
    except requests.RequestException as exc:
        raise ImageSourceError(f"cannot reach the registry {host}: {exc}") from None
    basic = challenge.get("WWW-Authenticate", "").lower().startswith("basic")
    registry = Registry(host, insecure=insecure, auth_backend="basic" if basic else "token")
    for scheme in ("http://", "https://"):
        registry.session.mount(scheme, TimedAdapter())
    return registry


class RegistrySource:
    def __init__(self, name: ImageName, *, auth_file: Path | None, insecure: bool) -> None:
        self._name = name
        self._registry = _registry_client(name.api_host, insecure=insecure)
        self._container = self._registry.get_container(f"{name.api_host}/{name.repository}")
        self._auth_files = [str(auth_file)] if auth_file is not None else None

    def manifest(self) -> ImageManifest:
        self._registry.auth.load_configs(self._container, configs=self._auth_files)
        basic = type(self._registry.auth).__name__ == "BasicAuth"
        if basic and not getattr(self._registry.auth, "_basic_auth", None):
            # (oras would fail on the missing attribute, saying nothing useful)
            where = self._auth_files[0] if self._auth_files else "~/.docker/config.json"
            raise ImageSourceError(
                f"{self._name}: the registry wants credentials, and {where} has none for "
                f"{self._name.location}"
            )
        data, media_type = self._get_manifest(self._name.reference)
        if media_type in INDEXES:
            data, media_type = self._get_manifest(_pick_platform(data))
        if media_type not in MANIFESTS:
            raise ImageSourceError(f"{self._name}: unsupported manifest type {media_type!r}")
        return _image_manifest(data)

    def _get_manifest(self, reference: str) -> tuple[dict[str, Any], str]:
        url = f"{self._registry.prefix}://{self._container.manifest_url(reference)}"
        headers = {"Accept": ", ".join((*MANIFESTS, *INDEXES))}
        try:
            response = self._registry.do_request(url, "GET", headers=headers)
        except Exception as exc:  # requests' connection errors, oras' auth errors
            raise ImageSourceError(
                f"cannot reach the registry {self._name.location}: {exc}"
            ) from None
        if response.status_code in (401, 403):
            raise ImageSourceError(f"{self._name}: not authorized (HTTP {response.status_code})")
        if response.status_code == 404:
            raise ImageSourceError(f"{self._name}: no such image in the registry")
        if response.status_code != 200:
            raise ImageSourceError(
                f"{self._name}: the registry answered HTTP {response.status_code}"
            )
        got = f"sha256:{hashlib.sha256(response.content).hexdigest()}"
        if reference.startswith("sha256:") and got != reference:
            raise ImageSourceError(f"{self._name}: the manifest does not match its digest")
        data = _parse_json(response.content, "manifest")
        media_type = data.get("mediaType") or response.headers.get("Content-Type", "")
        return data, str(media_type).split(";")[0].strip()

    def close(self) -> None:
        self._registry.session.close()

    @contextlib.contextmanager
    def open_blob(self, digest: str) -> Iterator[IO[bytes]]:
        try:
            response = self._registry.get_blob(self._container, digest, stream=True)
        except Exception as exc:
            raise ImageSourceError(
                f"cannot fetch {digest} from {self._name.location}: {exc}"
            ) from None
        with response:
            if response.status_code != 200:
                raise ImageSourceError(
                    f"{self._name}: blob {digest}: the registry answered HTTP "
                    f"{response.status_code}"
                )
            response.raw.decode_content = False  # the blob's own bytes, as its digest says
            yield response.raw


# -- a layout or an archive's files ---------------------------------------------------------------
class _Files(Protocol):
    def read(self, path: str) -> bytes: ...

    def open(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...

    def close(self) -> None: ...


class _DirectoryFiles:
    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise ImageSourceError(f"{root} is not a directory on the worker's host")
        self._root = root

    def close(self) -> None:
        pass

    def read(self, path: str) -> bytes:
        try:
            return (self._root / path).read_bytes()
        except OSError as exc:
            raise ImageSourceError(f"cannot read {path} in {self._root}: {exc.strerror}") from None

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[IO[bytes]]:
        try:
            file = (self._root / path).open("rb")
        except OSError as exc:
            raise ImageSourceError(f"cannot read {path} in {self._root}: {exc.strerror}") from None
        with file:
            yield file


class _TarFiles:
    def __init__(self, archive: Path) -> None:
        try:
            self._tar = tarfile.open(archive)  # noqa: SIM115 - closed with the source
        except (OSError, tarfile.TarError) as exc:
            raise ImageSourceError(f"cannot open the archive {archive}: {exc}") from None
        self._archive = archive

    def close(self) -> None:
        self._tar.close()

    def has(self, path: str) -> bool:
        try:
            self._tar.getmember(path)
        except KeyError:
            return False
        return True

    def read(self, path: str) -> bytes:
        with self.open(path) as file:
            return file.read(MAX_MANIFEST_BYTES + 1)

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[IO[bytes]]:
        try:
            file = self._tar.extractfile(path)
        except KeyError:
            file = None
        if file is None:
            raise ImageSourceError(f"the archive {self._archive} has no file {path}")
        with file:
            yield file


class LayoutSource:
    """An OCI image layout: ``index.json`` names the image (by its ``ref.name``), ``blobs/``."""

    def __init__(self, files: _Files, tag: str) -> None:
        self._files = files
        self._tag = tag

    def manifest(self) -> ImageManifest:
        index = _parse_json(self._files.read("index.json"), "layout's index.json")
        entries = [e for e in index.get("manifests", []) if isinstance(e, dict)]
        if self._tag:
            entries = [
                e for e in entries if (e.get("annotations") or {}).get(REF_NAME) == self._tag
            ]
            if not entries:
                raise ImageSourceError(f"the layout has no image tagged {self._tag!r}")
        if len(entries) != 1 and not all(e.get("platform") for e in entries):
            names = sorted(str(_ref_name(e)) for e in entries)
            raise ImageSourceError(f"the layout holds {len(entries)} images: name one of {names}")
        digest = (
            _pick_platform({"manifests": entries}) if len(entries) > 1 else entries[0]["digest"]
        )
        data = _parse_json(self._files.read(_blob_path(digest)), "manifest")
        if data.get("mediaType") in INDEXES or "manifests" in data:
            data = _parse_json(self._files.read(_blob_path(_pick_platform(data))), "manifest")
        return _image_manifest(data)

    def open_blob(self, digest: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self._files.open(_blob_path(digest))

    def close(self) -> None:
        self._files.close()


def _ref_name(entry: dict[str, Any]) -> object:
    return (entry.get("annotations") or {}).get(REF_NAME)


def _blob_path(digest: str) -> str:
    algorithm, _, value = str(digest).partition(":")
    if algorithm != "sha256" or not value.isalnum():
        raise ImageSourceError(f"unsupported digest {digest!r}")
    return f"blobs/{algorithm}/{value}"


class _LegacyArchiveSource:
    """``docker save`` before Docker 25: ``manifest.json`` names the config and layer files."""

    def __init__(self, files: _TarFiles, choice: str) -> None:
        self._files = files
        self._choice = choice
        self._paths: dict[str, str] = {}  # digest -> the file in the archive

    def manifest(self) -> ImageManifest:
        images = json.loads(self._files.read("manifest.json"))
        if not isinstance(images, list) or not images:
            raise ImageSourceError("the archive's manifest.json lists no image")
        if self._choice:
            images = [i for i in images if self._choice in (i.get("RepoTags") or [])]
            if not images:
                raise ImageSourceError(f"the archive has no image tagged {self._choice!r}")
        elif len(images) > 1:
            tags = sorted(t for i in images for t in (i.get("RepoTags") or []))
            raise ImageSourceError(f"the archive holds {len(images)} images: name one of {tags}")
        image = images[0]
        config_path = str(image["Config"])
        config_digest = f"sha256:{Path(config_path).name.removesuffix('.json')}"
        config = _parse_json(self._files.read(config_path), "image config")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        layer_paths = [str(p) for p in image.get("Layers") or []]
        if len(diff_ids) != len(layer_paths):
            raise ImageSourceError("the archive's layers do not match its config's diff_ids")
        self._paths = {config_digest: config_path, **dict(zip(diff_ids, layer_paths, strict=True))}
        return ImageManifest(
            config_digest,
            tuple(LayerRef(d, "application/vnd.oci.image.layer.v1.tar") for d in diff_ids),
        )

    def open_blob(self, digest: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self._files.open(self._paths.get(digest, _blob_path(digest)))

    def close(self) -> None:
        self._files.close()


def archive_source(path: Path, choice: str) -> ImageSource:
    files = _TarFiles(path)
    if files.has("index.json") and files.has("oci-layout"):  # Docker 25 and later save a layout
        return LayoutSource(files, choice.rpartition(":")[2] if choice else "")
    if files.has("manifest.json"):
        return _LegacyArchiveSource(files, choice)
    raise ImageSourceError(f"{path} is neither a docker save archive nor an OCI layout archive")
