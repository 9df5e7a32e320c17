"""Test images, made by the tests: layers from lists of entries, written as an OCI image layout,
as a ``docker save`` archive, or pushed to a real registry (Debian's ``docker-registry``, the
CNCF distribution registry, started here on a free port)."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REGISTRY_BINARY = "docker-registry"  # Debian's package of the distribution registry


@dataclass(frozen=True)
class Entry:
    path: str
    data: bytes | None = None  # a file
    kind: str = "file"  # file, dir, symlink, hardlink
    target: str = ""  # of a link
    mode: int = 0o644


def layer(*entries: Entry) -> bytes:
    """An uncompressed layer tar."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.path)
            info.mode = entry.mode
            info.mtime = 1_700_000_000
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = entry.mode if entry.mode != 0o644 else 0o755
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
                tar.addfile(info)
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
                tar.addfile(info)
            else:
                data = entry.data or b""
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def whiteout(path: str) -> Entry:
    parent, _, name = path.rpartition("/")
    return Entry(f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"")


def opaque(directory: str) -> Entry:
    return Entry(f"{directory}/.wh..wh..opq", b"")


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


@dataclass
class BuiltImage:
    """Layers (uncompressed tars) and a config; blobs as a registry or layout holds them."""

    layers: list[bytes]
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/bin:/bin", "IMAGE=test"])
    workdir: str = "/testbed"
    user: str = ""
    compress: bool = True

    def blobs(self) -> tuple[bytes, bytes, dict[str, bytes]]:
        """(manifest, config, every blob by digest)."""
        stored = [gzip.compress(t, mtime=0) if self.compress else t for t in self.layers]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Env": self.env, "WorkingDir": self.workdir, "User": self.user},
                "rootfs": {"type": "layers", "diff_ids": [digest_of(t) for t in self.layers]},
            }
        ).encode()
        media = TAR_GZIP if self.compress else "application/vnd.oci.image.layer.v1.tar"
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": digest_of(config),
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": media, "digest": digest_of(blob), "size": len(blob)}
                    for blob in stored
                ],
            }
        ).encode()
        blobs = {digest_of(b): b for b in (config, manifest, *stored)}
        return manifest, config, blobs

    def write_layout(self, directory: Path, tag: str = "v1") -> Path:
        manifest, _, blobs = self.blobs()
        (directory / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        for digest, data in blobs.items():
            (directory / "blobs" / "sha256" / digest.partition(":")[2]).write_bytes(data)
        (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        index_path = directory / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {"manifests": []}
        index["schemaVersion"] = 2
        index["manifests"].append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest_of(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        )
        index_path.write_text(json.dumps(index))
        return directory

    def write_docker_archive(self, path: Path, repo_tag: str = "test/image:v1") -> Path:
        """As ``docker save`` wrote it before Docker 25 (uncompressed layers, manifest.json)."""
        _, config, _ = self.blobs()
        config_name = f"{digest_of(config).partition(':')[2]}.json"
        members = {config_name: config}
        layer_names = []
        for index, tar in enumerate(self.layers):
            name = f"layer{index}/layer.tar"
            members[name] = tar
            layer_names.append(name)
        members["manifest.json"] = json.dumps(
            [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
        ).encode()
        with tarfile.open(path, "w") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return path


# -- a real registry ------------------------------------------------------------------------------
def registry_binary() -> str | None:
    return shutil.which(REGISTRY_BINARY) or (
        "/usr/bin/docker-registry" if Path("/usr/bin/docker-registry").exists() else None
    )


@contextlib.contextmanager
def running_registry(directory: Path, *, user: tuple[str, str] | None = None) -> Iterator[str]:
    """The distribution registry on a free loopback port; yields its host:port. With ``user``
    (a name and password) it wants them, by Basic auth (htpasswd, as a private one would)."""
    binary = registry_binary()
    assert binary is not None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {directory / 'storage'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    if user is not None:
        import bcrypt

        hashed = bcrypt.hashpw(user[1].encode(), bcrypt.gensalt(rounds=4)).decode()
        (directory / "htpasswd").write_text(f"{user[0]}:{hashed}\n")
        with config.open("a") as out:
            out.write(
                f"auth:\n  htpasswd:\n    realm: toolbus-test\n    path: {directory / 'htpasswd'}\n"
            )
    log = directory / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=out
        )
    host = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{host}/v2/", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except urllib.error.HTTPError as refused:
                if refused.code == 401:  # up, and wants credentials
                    break
                raise
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    said = log.read_text(errors="replace")
                    raise RuntimeError(f"the registry did not start: {said}") from None
                time.sleep(0.05)
        yield host
    finally:
        process.terminate()
        process.wait(10)


def push(
    host: str, repository: str, tag: str, image: BuiltImage, *, user: tuple[str, str] | None = None
) -> str:
    """Push the image's blobs and manifest over the registry API; its manifest digest."""
    headers = _basic(user)
    manifest, _, blobs = image.blobs()
    for digest, data in blobs.items():
        if data is manifest:
            continue
        request = urllib.request.Request(
            f"http://{host}/v2/{repository}/blobs/uploads/", method="POST", headers=headers
        )
        with urllib.request.urlopen(request) as reply:
            location = reply.headers["Location"]
        separator = "&" if "?" in location else "?"
        upload = location if location.startswith("http") else f"http://{host}{location}"
        request = urllib.request.Request(
            f"{upload}{separator}digest={digest}",
            data=data,
            method="PUT",
            headers={"Content-Type": "application/octet-stream", **headers},
        )
        with urllib.request.urlopen(request):
            pass
    put_manifest(host, repository, tag, manifest, OCI_MANIFEST, user=user)
    return digest_of(manifest)


def _basic(user: tuple[str, str] | None) -> dict[str, str]:
    if user is None:
        return {}
    return {"Authorization": f"Basic {base64.b64encode(':'.join(user).encode()).decode()}"}


def put_manifest(
    host: str,
    repository: str,
    reference: str,
    data: bytes,
    media: str,
    *,
    user: tuple[str, str] | None = None,
) -> None:
    request = urllib.request.Request(
        f"http://{host}/v2/{repository}/manifests/{reference}",
        data=data,
        method="PUT",
        headers={"Content-Type": media, **_basic(user)},
    )
    with urllib.request.urlopen(request):
        pass


# -- an image that runs: Debian's static busybox -------------------------------------------------
BUSYBOX = Path("/bin/busybox")
_APPLETS = ("sh", "cat", "ls", "id", "echo", "mkdir", "touch", "pwd", "env", "ps", "sleep", "rm")
_APPLETS += ("sed", "grep", "test", "[")


def static_busybox() -> bool:
    """Whether /bin/busybox is an ELF with no interpreter (PT_INTERP): it runs in an image
    without the host's libc (busybox-static; the dynamic busybox package would not)."""
    try:
        data = BUSYBOX.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


_TEST_SH = b"grep -q 'a + b' app.py && echo PASSED || { echo FAILED; exit 1; }\n"


def needs_busybox_as_root(why_root: str) -> list[pytest.MarkDecorator]:
    """The marks of a test that runs the busybox image in a root worker's sandbox."""
    return [
        pytest.mark.skipif(
            not static_busybox(),
            reason="no static /bin/busybox: apt-get install busybox-static (README, Quick start)",
        ),
        pytest.mark.skipif(os.geteuid() != 0, reason=why_root),
    ]


def busybox_image() -> BuiltImage:
    """A task image: busybox, and at /testbed an app with a bug and the test that finds it."""
    entries = [
        Entry("bin", kind="dir"),
        Entry("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
        *(Entry(f"bin/{name}", kind="symlink", target="busybox") for name in _APPLETS),
        Entry("etc/os-release", b"ID=toolbus-test-image\n"),
        Entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry("root", kind="dir", mode=0o700),
        Entry("testbed", kind="dir"),
        Entry("testbed/app.py", b"def add(a, b):\n    return a - b\n"),
        Entry(
            "testbed/test.sh",
            b"grep -q 'a + b' app.py && echo PASSED || { echo FAILED; exit 1; }\n",
        ),
    ]
    return BuiltImage([layer(*entries)], env=["PATH=/bin", "IMAGE=busybox"], workdir="/testbed")
