"""A worker's image cache: names, sources (a real registry, a layout, a docker save archive),
layers applied as a runtime applies them, digests checked, one pull per image, eviction
(issue 12, part 1)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest

from services._image_refs import ImageNameError, parse_image_name
from services._image_sources import host_platform
from services._image_store import ImageStore, ImageUnavailable
from tests._images import (
    OCI_INDEX,
    BuiltImage,
    Entry,
    layer,
    opaque,
    push,
    put_manifest,
    registry_binary,
    running_registry,
    whiteout,
)

_BASE = layer(
    Entry("etc", kind="dir"),
    Entry("etc/os-release", b"ID=test\n"),
    Entry("usr/lib", kind="dir"),
    Entry("usr/lib/gone.txt", b"removed by a whiteout\n"),
    Entry("usr/share/doc", kind="dir"),
    Entry("usr/share/doc/old", b"hidden by an opaque directory\n"),
    Entry("lib", kind="symlink", target="usr/lib"),
    Entry("testbed", kind="dir"),
    Entry("testbed/app.py", b"def add(a, b):\n    return a - b\n"),
    Entry("readonly", kind="dir", mode=0o555),
    Entry("readonly/file", b"x", mode=0o444),
)
_TOP = layer(
    whiteout("usr/lib/gone.txt"),
    Entry("usr/share/doc/new", b"this layer's\n"),
    opaque("usr/share/doc"),
    Entry("lib/added-through-a-symlink", b"in usr/lib\n"),
    Entry("testbed/app.py", b"def add(a, b):\n    return a + b\n"),
    Entry("testbed/link", kind="hardlink", target="etc/os-release"),
)


def _image() -> BuiltImage:
    return BuiltImage([_BASE, _TOP])


def _store(tmp_path: Path, **options: object) -> ImageStore:
    store = ImageStore(tmp_path / "cache", **options)  # type: ignore[arg-type]
    store.open()
    return store


def _check_root(root: Path) -> None:
    assert (root / "etc/os-release").read_bytes() == b"ID=test\n"
    assert not (root / "usr/lib/gone.txt").exists()  # whiteout
    assert sorted(os.listdir(root / "usr/share/doc")) == ["new"]  # opaque: only this layer's
    assert (root / "usr/lib/added-through-a-symlink").read_bytes() == b"in usr/lib\n"
    assert os.readlink(root / "lib") == "usr/lib"
    assert b"a + b" in (root / "testbed/app.py").read_bytes()  # the upper layer's
    assert os.stat(root / "testbed/link").st_ino == os.stat(root / "etc/os-release").st_ino
    assert (root / "readonly").stat().st_mode & 0o777 == 0o555


def test_image_names_read_as_registries_and_runtimes_read_them() -> None:
    hub = parse_image_name("python:3.12-slim")
    assert (hub.location, hub.repository, hub.reference) == (
        "docker.io",
        "library/python",
        "3.12-slim",
    )
    assert hub.api_host == "registry-1.docker.io"
    assert str(parse_image_name("ubuntu")) == "docker.io/library/ubuntu:latest"
    digest = "sha256:" + "a" * 64
    local = parse_image_name(f"localhost:5000/team/swe-task@{digest}")
    assert (local.location, local.repository, local.reference) == (
        "localhost:5000",
        "team/swe-task",
        digest,
    )
    assert local.by_digest
    layout = parse_image_name("oci:/srv/images/task:v2")
    assert (layout.transport, layout.location, layout.reference) == (
        "oci",
        "/srv/images/task",
        "v2",
    )
    archive = parse_image_name("docker-archive:/srv/task.tar:team/task:v1")
    assert (archive.location, archive.reference) == ("/srv/task.tar", "team/task:v1")
    assert parse_image_name("docker-archive:/srv/task.tar").reference == ""
    for bad, says in [
        ("", "printable"),
        ("Python:3", "repository name"),
        ("python:bad tag", "valid tag"),
        ("python@sha256:xyz", "digest"),
        ("oci:relative/dir", "absolute path"),
        ("python:\x00", "printable"),
    ]:
        with pytest.raises(ImageNameError, match=says):
            parse_image_name(bad)


async def test_a_layout_image_is_unpacked_with_its_whiteouts_links_and_config(
    tmp_path: Path,
) -> None:
    layout = _image().write_layout(tmp_path / "layout", tag="v1")
    store = _store(tmp_path)
    image = await store.acquire(f"oci:{layout}:v1")
    _check_root(image.rootfs)
    assert image.config.workdir == "/testbed"
    assert "IMAGE=test" in image.config.env
    assert image.size_bytes > 0
    assert not list((tmp_path / "cache/blobs/sha256").iterdir())  # the roots are the cache


async def test_a_docker_save_archive_is_an_image_too(tmp_path: Path) -> None:
    archive = _image().write_docker_archive(tmp_path / "saved.tar", repo_tag="team/task:v1")
    store = _store(tmp_path)
    image = await store.acquire(f"docker-archive:{archive}:team/task:v1")
    _check_root(image.rootfs)
    with pytest.raises(ImageUnavailable, match="no image tagged"):
        await store.acquire(f"docker-archive:{archive}:team/task:v2")


async def test_a_layer_cannot_write_outside_the_images_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    escape = layer(
        Entry("host", kind="symlink", target=str(outside)),
        Entry("host/planted", b"through an absolute symlink"),
        Entry("up", kind="symlink", target="../../../../.."),
        Entry("up/planted-too", b"through a relative one"),
    )
    store = _store(tmp_path)
    image = await store.acquire(f"oci:{BuiltImage([escape]).write_layout(tmp_path / 'esc')}")
    assert not list(outside.iterdir())
    # Resolved as the image sees them: inside its root.
    assert (image.rootfs / str(outside).lstrip("/") / "planted").exists()
    assert (image.rootfs / "planted-too").exists()
    dotdot = layer(Entry("../../escaped", b"x"))
    with pytest.raises(ImageUnavailable, match="leaves the root"):
        await store.acquire(f"oci:{BuiltImage([dotdot]).write_layout(tmp_path / 'dotdot')}")
    assert not (tmp_path / "escaped").exists()
    assert not [p for p in (tmp_path / "cache/roots").iterdir() if p.name.startswith(".partial")]


async def test_a_blob_that_does_not_match_its_digest_is_refused_and_nothing_is_kept(
    tmp_path: Path,
) -> None:
    layout = _image().write_layout(tmp_path / "layout")
    manifest, _, _ = _image().blobs()
    top = json.loads(manifest)["layers"][1]["digest"].partition(":")[2]
    tampered = layout / "blobs/sha256" / top
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    store = _store(tmp_path)
    with pytest.raises(ImageUnavailable, match="does not match its digest"):
        await store.acquire(f"oci:{layout}")
    roots = tmp_path / "cache/roots"
    assert not list(roots.iterdir()), list(roots.iterdir())
    assert not [p for p in (tmp_path / "cache/blobs/sha256").iterdir() if "partial" in p.name]


async def test_concurrent_asks_share_one_pull_and_two_names_of_one_image_one_root(
    tmp_path: Path,
) -> None:
    layout = _image().write_layout(tmp_path / "layout", tag="v1")
    _image().write_layout(layout, tag="again")  # the same image under a second tag
    store = _store(tmp_path)
    images = await asyncio.gather(
        *(store.acquire(f"oci:{layout}:{tag}") for tag in ["v1", "again"] * 4)
    )
    assert len({image.rootfs for image in images}) == 1
    roots = [p for p in (tmp_path / "cache/roots").iterdir() if p.is_dir()]
    assert roots == [images[0].rootfs]


async def test_the_least_recently_used_image_nobody_holds_is_evicted_past_the_limit(
    tmp_path: Path,
) -> None:
    def sized(tag: str) -> Path:
        blob = layer(Entry(f"data-{tag}", os.urandom(200_000)))
        return BuiltImage([blob]).write_layout(tmp_path / f"layout-{tag}", tag=tag)

    store = _store(tmp_path, max_bytes=500_000, eviction_grace_s=0)  # room for two
    held = await store.acquire(f"oci:{sized('a')}:a")
    old = await store.acquire(f"oci:{sized('b')}:b")
    store.release(old)
    newest = await store.acquire(f"oci:{sized('c')}:c")
    assert held.rootfs.is_dir() and newest.rootfs.is_dir()  # a is held: b went instead
    assert not old.rootfs.exists()
    assert store.size_bytes <= 500_000
    again = await store.acquire(f"oci:{tmp_path / 'layout-b'}:b")  # pulled anew
    assert (again.rootfs / "data-b").exists()


async def test_a_restarted_store_uses_the_roots_it_unpacked_and_removes_half_made_ones(
    tmp_path: Path,
) -> None:
    layout = _image().write_layout(tmp_path / "layout")
    first = await _store(tmp_path).acquire(f"oci:{layout}")
    inode = first.rootfs.stat().st_ino
    half = tmp_path / "cache/roots/.partial-abc"
    half.mkdir()
    again = await _store(tmp_path).acquire(f"oci:{layout}")
    assert again.rootfs == first.rootfs and again.rootfs.stat().st_ino == inode
    assert not half.exists()


needs_registry = pytest.mark.skipif(
    registry_binary() is None,
    reason="no docker-registry binary: apt-get install docker-registry (README, Quick start)",
)


@needs_registry
async def test_an_image_is_pulled_from_a_real_registry_by_tag_and_by_digest(
    tmp_path: Path,
) -> None:
    with running_registry(tmp_path / "registry") as host:
        digest = push(host, "team/task", "v1", _image())
        store = _store(tmp_path, insecure_registries=frozenset({host}))
        by_tag = await store.acquire(f"{host}/team/task:v1")
        _check_root(by_tag.rootfs)
        by_digest = await store.acquire(f"{host}/team/task@{digest}")
        assert by_digest.rootfs == by_tag.rootfs
        with pytest.raises(ImageUnavailable, match="no such image"):
            await store.acquire(f"{host}/team/task:missing")
    with pytest.raises(ImageUnavailable, match="cannot reach the registry"):
        await store.acquire(f"{host}/team/other:v1")


@needs_registry
async def test_a_multi_platform_index_gives_this_hosts_platform(tmp_path: Path) -> None:
    _, arch = host_platform()
    other = "arm64" if arch == "amd64" else "amd64"
    ours = BuiltImage([layer(Entry("which", arch.encode()))])
    theirs = BuiltImage([layer(Entry("which", other.encode()))])
    with running_registry(tmp_path / "registry") as host:
        entries = []
        for image, platform_arch in ((theirs, other), (ours, arch)):
            manifest_digest = push(host, "multi/arch", platform_arch, image)
            manifest, _, _ = image.blobs()
            entries.append(
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "platform": {"os": "linux", "architecture": platform_arch},
                }
            )
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        put_manifest(host, "multi/arch", "latest", index.encode(), OCI_INDEX)
        store = _store(tmp_path, insecure_registries=frozenset({host}))
        image = await store.acquire(f"{host}/multi/arch")
        assert (image.rootfs / "which").read_bytes() == arch.encode()


@needs_registry
async def test_a_private_registry_is_pulled_from_with_the_credentials_of_a_docker_config(
    tmp_path: Path,
) -> None:
    user = ("trainer", "s3cret")
    with running_registry(tmp_path / "registry", user=user) as host:
        push(host, "private/task", "v1", _image(), user=user)
        insecure = frozenset({host})

        def docker_config(name: str, credentials: bytes | None) -> Path:
            auths = {host: {"auth": base64.b64encode(credentials).decode()}} if credentials else {}
            path = tmp_path / name
            path.write_text(json.dumps({"auths": auths}))
            return path

        config = docker_config("config.json", b"trainer:s3cret")
        store = _store(tmp_path, insecure_registries=insecure, auth_file=config)
        image = await store.acquire(f"{host}/private/task:v1")
        _check_root(image.rootfs)
        (tmp_path / "none.json").write_text("{}")
        without = _store(
            tmp_path / "other",
            insecure_registries=frozenset({host}),
            auth_file=tmp_path / "none.json",
        )
        with pytest.raises(ImageUnavailable, match="wants credentials"):
            await without.acquire(f"{host}/private/task:v1")
        wrong = tmp_path / "wrong.json"
        wrong.write_text(
            json.dumps({"auths": {host: {"auth": base64.b64encode(b"trainer:no").decode()}}})
        )
        refused = _store(tmp_path / "third", insecure_registries=frozenset({host}), auth_file=wrong)
        with pytest.raises(ImageUnavailable, match="not authorized"):
            await refused.acquire(f"{host}/private/task:v1")


async def test_a_whiteout_cannot_name_the_directory_above_or_itself(tmp_path: Path) -> None:
    # ".wh..." would be a whiteout of "..": the cache's directory of roots, every other image.
    store = _store(tmp_path)
    kept = await store.acquire(f"oci:{_image().write_layout(tmp_path / 'kept')}")
    for n, name in enumerate([".wh...", "etc/.wh...", ".wh..", ".wh."]):
        bad = layer(Entry("etc", kind="dir"), Entry(name, b""))
        with pytest.raises(ImageUnavailable, match="whiteout"):
            await store.acquire(f"oci:{BuiltImage([bad]).write_layout(tmp_path / f'bad{n}')}")
        _check_root(kept.rootfs)


async def test_an_images_files_carry_no_setuid_bits_and_its_workdir_exists(
    tmp_path: Path,
) -> None:
    su = layer(Entry("bin", kind="dir"), Entry("bin/su", b"#!/bin/sh\n", mode=0o4755))
    image = BuiltImage([su], workdir="/srv/app")
    store = _store(tmp_path)
    got = await store.acquire(f"oci:{image.write_layout(tmp_path / 'su')}")
    assert (got.rootfs / "bin/su").stat().st_mode & 0o7777 == 0o755
    assert (got.rootfs / "srv/app").is_dir()  # as a runtime makes it: a sandbox starts there


async def test_a_root_left_without_its_record_is_removed_at_the_next_start(
    tmp_path: Path,
) -> None:
    layout = _image().write_layout(tmp_path / "layout")
    first = await _store(tmp_path).acquire(f"oci:{layout}")
    first.rootfs.with_suffix(".json").unlink()  # a crash between the root and its record
    again = await _store(tmp_path).acquire(f"oci:{layout}")  # unpacked anew, not refused
    _check_root(again.rootfs)


async def test_an_image_used_a_moment_ago_is_not_evicted_even_past_the_limit(
    tmp_path: Path,
) -> None:
    # Two images bigger than the cache together must not evict each other in turns while
    # their pulls' askers take their holds.
    store = _store(tmp_path, max_bytes=1)
    first = await store.acquire(f"oci:{_image().write_layout(tmp_path / 'one')}")
    store.release(first)
    other = BuiltImage([layer(Entry("other", b"x"))])
    await store.acquire(f"oci:{other.write_layout(tmp_path / 'two')}")
    assert first.rootfs.is_dir()
