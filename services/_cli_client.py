"""The one-shot commands, each one ``ToolbusClient`` request: call, release, upload, archive
and tools (``status`` has its own module, for its watch)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ._cli_nats import connect
from .client import ToolbusClient
from .exceptions import ToolbusError
from .settings import Settings


async def with_client(settings: Settings, action: Callable[[ToolbusClient], Awaitable[int]]) -> int:
    nc = await connect(settings, "toolbus-cli", service=False)
    try:
        client = ToolbusClient(
            nc,
            prefix=settings.prefix,
            token=settings.token,
            artifacts_bucket=settings.artifacts_bucket,
        )
        return await action(client)
    finally:
        await nc.drain()


def _parse_arguments(pairs: list[str], raw_json: str | None) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    if raw_json:
        try:
            loaded = json.loads(raw_json)
        except json.JSONDecodeError as exc:
            raise ToolbusError(f"--args is not valid JSON: {exc.msg}") from None
        if not isinstance(loaded, dict):
            raise ToolbusError("--args must be a JSON object")
        arguments.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ToolbusError(f"--arg expects KEY=VALUE, got {pair!r}")
        arguments[key] = value
    return arguments


async def run_call(settings: Settings, args: argparse.Namespace) -> int:
    arguments = _parse_arguments(args.arg, args.args)

    async def action(client: ToolbusClient) -> int:
        result = await client.execute(
            args.trajectory, args.tool, arguments, uniq_id=args.uniq_id, timeout_s=args.timeout
        )
        if args.json:
            print(result.model_dump_json(indent=2))
        else:
            if result.output:
                print(result.output)
            if not result.success:
                print(f"error: {result.error}", file=sys.stderr)
        return 0 if result.success else 1

    return await with_client(settings, action)


async def run_release(settings: Settings, args: argparse.Namespace) -> int:
    async def action(client: ToolbusClient) -> int:
        reply = await client.release(args.trajectory, reset_workspace=args.reset)
        print(reply.model_dump_json())
        return 0

    return await with_client(settings, action)


async def run_upload(settings: Settings, args: argparse.Namespace) -> int:
    archive = Path(args.archive)
    if not archive.is_file():
        raise ToolbusError(f"no such file: {archive}")

    async def action(client: ToolbusClient) -> int:
        reply = await client.upload_archive(args.trajectory, archive, path=args.path)
        print(reply.model_dump_json(indent=2))
        return 0 if reply.success else 1

    return await with_client(settings, action)


async def run_archive(settings: Settings, args: argparse.Namespace) -> int:
    async def action(client: ToolbusClient) -> int:
        reply = await client.archive_artifacts(args.trajectory, args.path, format=args.format)
        print(reply.model_dump_json(indent=2))
        if not reply.success or reply.object is None:
            return 1
        if args.output:
            stored = await client.fetch_artifact(reply.object, Path(args.output))
            print(f"wrote {stored.size} bytes to {args.output} (sha256 {stored.sha256})")
        return 0

    return await with_client(settings, action)


async def run_tools(settings: Settings, args: argparse.Namespace) -> int:
    async def action(client: ToolbusClient) -> int:
        print((await client.list_tools()).model_dump_json(indent=2))
        return 0

    return await with_client(settings, action)
