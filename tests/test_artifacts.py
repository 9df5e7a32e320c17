"""Artifacts through the whole stack: read, list, archive and upload via the Object Store."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from services._artifacts import MAX_REPLY_JSON_BYTES, ArtifactLimits
from services.client import ToolbusClient
from services.exceptions import BadRequest, NotFound
from tests.conftest import StackFactory
from tests.test_sandbox_security import _still_serving

# A workspace with nested directories, binary files, an empty directory and a link inside.
_MAKE_TREE = (
    "mkdir -p proj/src/pkg proj/empty proj/data && "
    "printf 'print(1)\\n' > proj/src/main.py && "
    "printf 'x = 2\\n' > proj/src/pkg/mod.py && "
    "head -c 700000 /dev/urandom > proj/data/blob.bin && "
    "printf '\\x00\\x01\\xff' > proj/data/tiny.bin && "
    "ln -s src/main.py proj/link.py"
)
_DIGESTS = "cd proj && find . -type f -exec sha256sum {} + | sort -k2"


async def _tree(client: ToolbusClient, tid: str) -> dict[str, str]:
    """path -> sha256 of every file under proj/, as the sandbox sees them."""
    made = await client.execute(tid, "terminal", {"command": _MAKE_TREE})
    assert made.success, made
    return await _digests(client, tid)


async def _digests(client: ToolbusClient, tid: str, command: str = _DIGESTS) -> dict[str, str]:
    listed = await client.execute(tid, "terminal", {"command": command})
    assert listed.success, listed
    return {
        path.removeprefix("./"): digest
        for digest, path in (line.split(maxsplit=1) for line in listed.output.splitlines())
    }


def _tar(members: dict[str, bytes | None], *, gzip: bool = True) -> bytes:
    """A tar archive: name -> file bytes, or None for a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- read ---------------------------------------------------------------------------------------
async def test_small_reads_come_inline_and_large_ones_through_the_object_store(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    files = await _tree(stack.client, tid)

    text = await stack.client.read_artifact(tid, "proj/src/main.py", include_sha256=True)
    assert text.success, text
    assert text.content == "print(1)\n"
    assert text.object is None
    assert (text.bytes, text.file_size, text.truncated) == (9, 9, False)
    assert text.path == "proj/src/main.py"
    assert text.mime == "text/x-python"
    assert text.sha256 == files["src/main.py"]

    tiny = await stack.client.read_artifact(tid, "/workspace/proj/data/tiny.bin", encoding="base64")
    assert tiny.success, tiny
    assert base64.b64decode(tiny.content or "") == b"\x00\x01\xff"
    assert tiny.sha256 is None  # not asked for

    big = await stack.client.read_artifact(tid, "proj/data/blob.bin", encoding="base64")
    assert big.success, big
    assert big.content is None and big.object is not None
    assert big.object.size == big.bytes == big.file_size == 700_000
    assert big.object.sha256 == big.sha256 == files["data/blob.bin"]
    fetched = io.BytesIO()
    await stack.client.fetch_artifact(big.object, fetched)
    assert hashlib.sha256(fetched.getvalue()).hexdigest() == files["data/blob.bin"]

    head = await stack.client.read_artifact(tid, "proj/data/blob.bin", max_bytes=1000)
    assert head.success and head.truncated and head.bytes == 1000 and head.file_size == 700_000


@pytest.mark.parametrize(
    ("fill", "encoding", "inline"),
    [
        ("nul", "text", False),  # each NUL is six characters in JSON: 1.2 MB
        ("nul", "base64", True),
        ("random", "text", False),  # invalid bytes become U+FFFD, 3 bytes each, escapes 6
        ("random", "base64", True),
    ],
)
async def test_a_read_comes_inline_only_when_its_reply_fits_in_one_message(
    make_stack: StackFactory,
    trajectory: Callable[[], str],
    fill: str,
    encoding: Literal["text", "base64"],
    inline: bool,
) -> None:
    """The raw bytes are under the inline limit (256 KiB); their JSON decides."""
    stack = await make_stack(client_options={"execute_margin_s": 5})  # a lost reply fails fast
    tid = trajectory()
    source = "/dev/zero" if fill == "nul" else "/dev/urandom"
    made = await stack.client.execute(tid, "terminal", {"command": f"head -c 250000 {source} > f"})
    assert made.success, made
    data = (await _digests(stack.client, tid, "sha256sum f"))["f"]
    reply = await stack.client.read_artifact(
        tid, "f", encoding=encoding, include_sha256=True, timeout_s=20
    )
    assert reply.success, reply
    assert reply.bytes == 250_000 and reply.sha256 == data
    assert len(reply.model_dump_json().encode()) <= MAX_REPLY_JSON_BYTES
    if inline:
        assert reply.object is None and reply.content is not None
        assert hashlib.sha256(base64.b64decode(reply.content)).hexdigest() == data
    else:
        assert reply.content is None and reply.object is not None
        fetched = io.BytesIO()
        await stack.client.fetch_artifact(reply.object, fetched)
        assert hashlib.sha256(fetched.getvalue()).hexdigest() == data


async def test_reads_stop_at_the_artifact_limit(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack(worker_options={"artifact_limits": ArtifactLimits(max_bytes=4096)})
    tid = trajectory()
    await _tree(stack.client, tid)
    capped = await stack.client.read_artifact(tid, "proj/data/blob.bin", max_bytes=10**9)
    assert capped.success and capped.truncated
    assert capped.bytes == 4096


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../../etc/passwd", "Path escapes the workspace"),
        ("/etc/passwd", "Path escapes the workspace"),
        ("escape/passwd", "Path escapes the workspace"),  # a symlink to /etc
        ("proj", "is a directory"),
        ("no/such/file", "No such file"),
    ],
)
async def test_reads_outside_the_workspace_or_of_nothing_fail_precisely(
    make_stack: StackFactory, trajectory: Callable[[], str], path: str, message: str
) -> None:
    stack = await make_stack()
    tid = trajectory()
    await _tree(stack.client, tid)
    await stack.client.execute(tid, "terminal", {"command": "ln -s /etc escape"})
    result = await stack.client.read_artifact(tid, path)
    assert not result.success
    assert message in (result.error or ""), result
    assert result.content is None
    await _still_serving(stack.client, tid)


async def test_read_file_and_artifacts_read_agree_on_a_file_with_a_trailing_slash(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    await _tree(stack.client, tid)
    for path in ("proj/src/main.py/", "proj/src/main.py/x"):
        by_tool = await stack.client.execute(tid, "read_file", {"path": path})
        by_artifacts = await stack.client.read_artifact(tid, path)
        assert not by_tool.success and not by_artifacts.success
        assert by_tool.error == by_artifacts.error == f"Not a directory: {path}"
    directory = await stack.client.read_artifact(tid, "proj/src/")
    assert directory.error == "proj/src/ is a directory"


async def test_artifacts_of_a_trajectory_without_a_slot_are_not_found(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    with pytest.raises(NotFound, match="No active slot for trajectory"):
        await stack.client.read_artifact(tid, "x")
    with pytest.raises(NotFound, match="No active slot for trajectory"):
        await stack.client.archive_artifacts(tid)
    assert stack.workers[0].slots_free == 4  # asking did not take a slot


async def test_bad_artifact_requests_get_precise_errors(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    with pytest.raises(NotFound, match="Unknown artifact operation: delete"):
        await stack.client.request_raw("tools.artifacts.delete", b"{}")
    body = json.dumps({"trajectory_id": trajectory(), "format": "zip"}).encode()
    with pytest.raises(BadRequest, match="format"):
        await stack.client.request_raw("tools.artifacts.archive", body)
    with pytest.raises(BadRequest, match="request body is not valid JSON"):
        await stack.client.request_raw("tools.artifacts.read", b"{nope")


# -- list ---------------------------------------------------------------------------------------
async def test_list_walks_the_tree_without_following_links(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    await _tree(stack.client, tid)
    top = await stack.client.list_artifacts(tid, "proj")
    assert top.success, top
    assert [entry.path for entry in top.entries] == [
        "proj/data",
        "proj/empty",
        "proj/link.py",
        "proj/src",
    ]
    link = next(entry for entry in top.entries if entry.path == "proj/link.py")
    assert link.is_symlink and not link.is_dir

    everything = await stack.client.list_artifacts(tid, "proj", recursive=True)
    by_path = {entry.path: entry for entry in everything.entries}
    assert by_path["proj/src/pkg/mod.py"].size == 6
    assert by_path["proj/empty"].is_dir
    assert not everything.truncated

    capped = await stack.client.list_artifacts(tid, "proj", recursive=True, max_entries=3)
    assert capped.truncated and len(capped.entries) == 3


async def test_a_listing_of_long_non_ascii_names_is_cut_to_fit_one_message(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    """4000 names of 85 three-byte characters: 1.3 MB of JSON, though only 0.6 M characters."""
    stack = await make_stack(client_options={"execute_margin_s": 5})  # a lost reply fails fast
    tid = trajectory()
    name = "\u8a9e" * 81
    make = f'mkdir many && cd many && for i in $(seq -w 0 3999); do : > "$i{name}"; done'
    made = await stack.client.execute(tid, "terminal", {"command": make})
    assert made.success, made
    listed = await stack.client.list_artifacts(tid, "many", max_entries=5000, timeout_s=20)
    assert listed.success, listed
    assert listed.truncated and 0 < len(listed.entries) < 4000
    assert len(listed.model_dump_json().encode()) <= MAX_REPLY_JSON_BYTES
    assert listed.entries[0].path == f"many/0000{name}"


# -- archive ------------------------------------------------------------------------------------
async def test_an_archived_workspace_comes_back_file_by_file(
    make_stack: StackFactory, trajectory: Callable[[], str], tmp_path: Path
) -> None:
    stack = await make_stack()
    tid = trajectory()
    files = await _tree(stack.client, tid)

    reply = await stack.client.archive_artifacts(tid, "proj")
    assert reply.success, reply
    assert reply.object is not None and reply.bytes == reply.object.size
    assert not reply.truncated and reply.skipped == 0
    destination = tmp_path / "fetched.tar.gz"
    stored = await stack.client.fetch_artifact(reply.object, destination)
    assert stored.sha256 == reply.object.sha256

    unpacked = tmp_path / "unpacked"
    with tarfile.open(destination) as tar:
        assert reply.entry_count == len(tar.getmembers())
        tar.extractall(unpacked, filter="data")
    found = {
        path.relative_to(unpacked).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in unpacked.rglob("*")
        if path.is_file() and not path.is_symlink()
    }
    assert found == files
    assert (unpacked / "empty").is_dir() and not any((unpacked / "empty").iterdir())
    assert os.readlink(unpacked / "link.py") == "src/main.py"


async def test_an_archive_past_a_limit_is_truncated_and_says_which(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    await _tree(stack.client, tid)
    by_entries = await stack.client.archive_artifacts(tid, "proj", max_entries=2, format="tar")
    assert by_entries.success and by_entries.truncated
    assert by_entries.entry_count == 2
    assert "max_entries" in (by_entries.truncated_reason or "")
    by_bytes = await stack.client.archive_artifacts(tid, "proj", max_bytes=1000)
    assert by_bytes.success and by_bytes.truncated
    assert "max_bytes" in (by_bytes.truncated_reason or "")
    assert by_bytes.object is not None
    archive = io.BytesIO()
    await stack.client.fetch_artifact(by_bytes.object, archive)
    with tarfile.open(fileobj=io.BytesIO(archive.getvalue())) as tar:  # still a valid archive
        assert sum(member.size for member in tar.getmembers() if member.isfile()) <= 1000


async def test_archives_and_lists_refuse_paths_outside(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    tid = trajectory()
    await stack.client.execute(tid, "terminal", {"command": "ln -s / root"})
    for path in ("..", "/", "root", "root/etc"):
        archived = await stack.client.archive_artifacts(tid, path)
        assert not archived.success and "escapes the workspace" in (archived.error or "")
        listed = await stack.client.list_artifacts(tid, path)
        assert not listed.success and "escapes the workspace" in (listed.error or "")


# -- upload -------------------------------------------------------------------------------------
async def test_an_uploaded_archive_is_what_terminal_sees(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    stack = await make_stack()
    payload = os.urandom(200_000)
    archive = _tar(
        {
            "repo": None,
            "repo/README": b"hello\n",
            "repo/pkg": None,
            "repo/pkg/data.bin": payload,
            "repo/empty": None,
        }
    )
    ref = await stack.client.put_archive(archive)
    first, second = trajectory(), trajectory()
    for tid in (first, second):  # one archive, many workspaces
        reply = await stack.client.upload_archive(tid, ref, path="task")
        assert reply.success, reply
        assert reply.entry_count == 5 and reply.bytes == 200_006
        seen = await _digests(
            stack.client, tid, "cd task && find . -type f -exec sha256sum {} + | sort -k2"
        )
        assert seen == {
            "repo/README": hashlib.sha256(b"hello\n").hexdigest(),
            "repo/pkg/data.bin": hashlib.sha256(payload).hexdigest(),
        }
        # The slot's user owns what was unpacked: the agent can change it.
        edited = await stack.client.execute(
            tid, "terminal", {"command": "echo more >> task/repo/README && test -d task/repo/empty"}
        )
        assert edited.success, edited
    assert stack.workers[0].slots_free == 2  # each upload took its trajectory's slot


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"../evil": b"x"}, "evil"),
        ({"/abs/evil": b"x"}, "evil"),
        ({"link": "/etc", "link/evil": b"x"}, "link"),
    ],
)
async def test_uploads_cannot_write_outside_the_workspace(
    make_stack: StackFactory,
    trajectory: Callable[[], str],
    members: dict[str, bytes | str],
    message: str,
) -> None:
    stack = await make_stack()
    tid = trajectory()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    reply = await stack.client.upload_archive(tid, buffer.getvalue(), path="in")
    assert not reply.success
    assert message in (reply.error or ""), reply
    leaked = await stack.client.execute(
        tid, "terminal", {"command": "ls -A / /workspace | grep -c evil || true"}
    )
    assert leaked.output.strip() == "0"
    await _still_serving(stack.client, tid)


async def test_uploads_past_their_limits_or_corrupt_are_refused(
    make_stack: StackFactory, trajectory: Callable[[], str]
) -> None:
    limits = ArtifactLimits(max_upload_bytes=100_000, max_upload_entries=3)
    stack = await make_stack(worker_options={"artifact_limits": limits})
    tid = trajectory()

    too_big = await stack.client.upload_archive(tid, _tar({"a": os.urandom(150_000)}, gzip=False))
    assert not too_big.success and "the limit is 100000 bytes" in (too_big.error or "")

    unpacks_big = await stack.client.upload_archive(tid, _tar({"zeros": bytes(1_000_000)}))
    assert not unpacks_big.success and "max_bytes" in (unpacks_big.error or "")

    many = await stack.client.upload_archive(tid, _tar({f"f{i}": b"x" for i in range(10)}))
    assert not many.success and "max_entries" in (many.error or "")

    ref = await stack.client.put_archive(_tar({"ok": b"fine"}))
    wrong = ref.model_copy(update={"sha256": "0" * 64})
    corrupt = await stack.client.upload_archive(tid, wrong)
    assert not corrupt.success and "sha256" in (corrupt.error or "").lower()

    missing = await stack.client.upload_archive(tid, ref.model_copy(update={"name": "nope"}))
    assert not missing.success and "No object 'nope'" in (missing.error or "")
    await _still_serving(stack.client, tid)
