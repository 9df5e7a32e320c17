"""Image names: which image a trajectory's slot is made from, and where it comes from.

Three kinds, named as skopeo and podman name them:

- a registry image: ``[host[:port]/]repository[:tag][@sha256:<digest>]``; no host means Docker
  Hub (``python:3.12-slim`` is ``docker.io/library/python:3.12-slim``), no tag ``latest``;
- ``oci:<directory>[:<tag>]``: an OCI image layout directory on the worker's host;
- ``docker-archive:<file>[:<repository>:<tag>]``: a ``docker save`` tarball on the worker's host.

A name that matches none is refused with what is wrong with it (:class:`ImageNameError`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .exceptions import BadRequest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's registry API answers
DEFAULT_TAG = "latest"
_DOCKER_HUB_ALIASES = frozenset(
    {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
MAX_IMAGE_NAME_CHARS = 4096

# The distribution reference grammar (distribution/reference), as far as a puller needs it.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")

Transport = Literal["registry", "oci", "docker-archive"]


class ImageNameError(BadRequest):
    """An image name toolbus cannot read."""


@dataclass(frozen=True, slots=True)
class ImageName:
    """A parsed image name. ``location`` is the registry host or the host path; ``reference``
    the tag or digest (an archive's ``repository:tag`` choice, or "" for its only image)."""

    transport: Transport
    location: str
    repository: str = ""
    reference: str = ""

    @property
    def api_host(self) -> str:
        """The registry's API host (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.location == DOCKER_HUB else self.location

    @property
    def by_digest(self) -> bool:
        return _DIGEST.fullmatch(self.reference) is not None

    def __str__(self) -> str:
        if self.transport == "registry":
            separator = "@" if self.by_digest else ":"
            return f"{self.location}/{self.repository}{separator}{self.reference}"
        suffix = f":{self.reference}" if self.reference else ""
        return f"{self.transport}:{self.location}{suffix}"


def parse_image_name(text: str) -> ImageName:
    """The image ``text`` names; ImageNameError saying what is wrong when it names none."""
    if not text or len(text) > MAX_IMAGE_NAME_CHARS or not text.isprintable():
        raise ImageNameError(
            f"an image name must be 1 to {MAX_IMAGE_NAME_CHARS} printable characters"
        )
    if text.startswith("oci:"):
        return _local("oci", text.removeprefix("oci:"))
    if text.startswith("docker-archive:"):
        return _local("docker-archive", text.removeprefix("docker-archive:"))
    return _registry(text.removeprefix("docker://"))


def _local(transport: Transport, rest: str) -> ImageName:
    # As skopeo reads them: the path ends at the first colon (a path with one cannot be named).
    path, _, reference = rest.partition(":")
    if not path.startswith("/"):
        raise ImageNameError(f"{transport}: needs an absolute path on the worker's host: {rest!r}")
    if transport == "oci" and reference and not _TAG.fullmatch(reference):
        raise ImageNameError(f"{reference!r} is not a valid tag (letters, digits, _ . -)")
    if transport == "docker-archive" and reference:
        repository, _, tag = reference.rpartition(":") if ":" in reference else (reference, "", "")
        if not _REPOSITORY.fullmatch(repository) or (tag and not _TAG.fullmatch(tag)):
            raise ImageNameError(f"{reference!r} is not a repository[:tag] of the archive")
    return ImageName(transport, path, reference=reference)


def _registry(text: str) -> ImageName:
    name, digest = text, ""
    if "@" in text:
        name, digest = text.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ImageNameError(f"the digest of {text!r} is not sha256:<64 hex digits>")
    host, path = DOCKER_HUB, name
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        host, path = first.lower(), rest  # (host names are not case-sensitive)
        if not _HOST.fullmatch(host):
            raise ImageNameError(f"{host!r} is not a registry host[:port]")
        if host in _DOCKER_HUB_ALIASES:
            host = DOCKER_HUB
    tag = DEFAULT_TAG
    last_slash = path.rfind("/")
    if ":" in path[last_slash + 1 :]:
        path, tag = path.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise ImageNameError(f"{tag!r} is not a valid tag (letters, digits, _ . -)")
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"  # Docker Hub's official images
    if not _REPOSITORY.fullmatch(path):
        raise ImageNameError(
            f"{path!r} is not a repository name (lowercase letters, digits and separators)"
        )
    return ImageName("registry", host, path, digest or tag)
