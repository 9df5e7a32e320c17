"""``toolbus status``: the executor's status once, or watched (``--watch``) until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable
from contextlib import suppress
from typing import TypeVar

import nats.errors

from ._cli_client import with_client
from ._cli_signals import stop_on_signals
from ._status_view import render_status
from .client import ToolbusClient
from .exceptions import ToolbusError
from .settings import Settings

DEFAULT_STATUS_INTERVAL_S = 2.0
_T = TypeVar("_T")
_CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase the screen


async def run_status(settings: Settings, args: argparse.Namespace) -> int:
    if not args.watch and (args.interval is not None or args.count is not None):
        raise ToolbusError("--interval and --count go with --watch")

    async def once(client: ToolbusClient) -> int:
        status = await client.status()
        print(status.model_dump_json(indent=2) if args.json else render_status(status))
        return 0

    async def watch(client: ToolbusClient) -> int:
        interval = DEFAULT_STATUS_INTERVAL_S if args.interval is None else args.interval
        return await _watch_status(client, interval=interval, count=args.count, as_json=args.json)

    return await with_client(settings, watch if args.watch else once)


async def _watch_status(
    client: ToolbusClient, *, interval: float, count: int | None, as_json: bool
) -> int:
    """Refresh the status every ``interval`` seconds until Ctrl-C (exit 0) or ``count`` views.

    On a terminal each view replaces the last; into a file or pipe views follow each other
    under a separator line, and ``--json`` writes one JSON object per line. A failed request is
    shown and retried at the next refresh: an executor restarting should not end the watch.
    """
    on_tty = sys.stdout.isatty() and not as_json
    stop = asyncio.Event()
    shown = 0
    with stop_on_signals(stop):
        while not stop.is_set():
            out = sys.stdout
            try:
                status = await _unless_stopped(client.status(), stop)
            except ToolbusError as exc:
                text = f"toolbus: {exc}"
                out = sys.stderr if as_json else sys.stdout  # keep stdout valid JSON Lines
            except nats.errors.Error as exc:  # the connection is gone: watching is over
                raise ToolbusError(f"lost the NATS connection: {exc}") from None
            else:
                if status is None:
                    break
                text = status.model_dump_json() if as_json else render_status(status)
            clock = time.strftime("%H:%M:%S")
            if on_tty:
                text = f"{_CLEAR_SCREEN}every {interval:g}s, Ctrl-C stops    {clock}\n\n{text}"
            elif shown and not as_json:
                text = f"-- {clock} {'-' * 60}\n{text}"
            print(text, file=out, flush=True)
            shown += 1
            if count is not None and shown >= count:
                break
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    return 0


async def _unless_stopped(work: Awaitable[_T], stop: asyncio.Event) -> _T | None:
    """``work``'s result, or None as soon as ``stop`` is set (Ctrl-C need not wait a reply)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task in done else None
