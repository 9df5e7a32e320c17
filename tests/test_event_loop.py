"""uvloop when installed (``toolbus[fast]``), asyncio's loop when declined or for a process
that starts processes (a sandbox worker).

These failed before services/_loop.py existed (shared/issue 10, item 5: an ImportError).
`toolbus serve` (its executor) runs on uvloop in test_cli.py: uvloop is a test dependency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import uvloop

from services import _loop


def test_uvloop_is_used_when_installed_unless_declined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_loop.EVENT_LOOP_ENV, raising=False)
    assert _loop.loop_factory() is uvloop.new_event_loop
    assert _loop.loop_name() == "uvloop"
    assert _loop.loop_factory(fast=False) is None  # what a sandbox worker runs on
    monkeypatch.setenv(_loop.EVENT_LOOP_ENV, "asyncio")
    assert _loop.loop_factory() is None
    assert _loop.loop_name() == "asyncio"


def test_run_runs_a_coroutine_on_the_chosen_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    async def loop_type() -> type[asyncio.AbstractEventLoop]:
        return type(asyncio.get_running_loop())

    def run_in_a_thread() -> type[asyncio.AbstractEventLoop]:
        # A thread of its own: asyncio's Runner sets (and then clears) the thread's event loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(_loop.run, loop_type()).result(timeout=30)

    monkeypatch.delenv(_loop.EVENT_LOOP_ENV, raising=False)
    assert run_in_a_thread() is uvloop.Loop
    monkeypatch.setenv(_loop.EVENT_LOOP_ENV, "asyncio")
    assert not issubclass(run_in_a_thread(), uvloop.Loop)
