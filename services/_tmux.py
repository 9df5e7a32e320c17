"""``tmux``: a tmux session inside the slot's sandbox, for interactive (TUI) programs.

Actions: ``start``, ``send_keys`` (``keys``; with ``block`` it waits ``min_wait_s``, then until
the screen stops changing or ``max_wait_s``), ``capture`` (the screen, or with
``capture_entire`` the whole history), ``stream`` (what the pane printed since the last stream,
up to ``max_bytes``; ``reset`` starts over) and ``stop``. The server runs inside the sandbox with
its socket in the sandbox's private /tmp, so it lives as long as the slot's sandbox.
"""

from __future__ import annotations

import asyncio
import shlex
from dataclasses import dataclass

from schemas.tools import TmuxArgs

from ._process import run_command
from ._sandbox import Sandbox

_SOCKET = "/tmp/.toolbus-tmux.sock"
_LOG = "/tmp/.toolbus-tmux.log"
_SESSION = "main"
_TMUX = f"tmux -S {_SOCKET}"
_SETTLE_POLL_S = 0.2
_COMMAND_TIMEOUT_S = 10.0
# tmux key names sent as keys, not as text (send-keys without -l).
_KEY_NAMES = frozenset(
    [
        "Enter",
        "Escape",
        "Tab",
        "BTab",
        "Space",
        "BSpace",
        "Up",
        "Down",
        "Left",
        "Right",
        "Home",
        "End",
        "PageUp",
        "PageDown",
        "PPage",
        "NPage",
        "IC",
        "DC",
        "C-m",
        "C-j",
    ]
    + [f"C-{c}" for c in "abcdefghijklmnopqrstuvwxyz[\\]"]
    + [f"M-{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    + [f"F{n}" for n in range(1, 13)]
)


class TmuxError(Exception):
    """The action failed; the message is for the model."""


@dataclass(slots=True)
class TmuxState:
    """Worker-side state of one slot's tmux: how far ``stream`` has read."""

    stream_offset: int = 0


def tmux_key_args(keys: str | list[str]) -> list[list[str]]:
    """send-keys invocations for ``keys``: key names as keys, everything else literally."""
    items = [keys] if isinstance(keys, str) else keys
    return [[item] if item in _KEY_NAMES else ["-l", item] for item in items]


async def _sh(sandbox: Sandbox, script: str, *, max_chars: int) -> tuple[int | None, str, str]:
    outcome = await run_command(
        sandbox, script, timeout_s=_COMMAND_TIMEOUT_S, max_output_chars=max_chars
    )
    return outcome.exit_code, outcome.stdout.text, outcome.stderr.text


async def run_tmux(
    args: TmuxArgs, sandbox: Sandbox, state: TmuxState, *, max_chars: int
) -> tuple[str, dict[str, object]]:
    """Do one action; returns the output and metadata, or raises TmuxError."""
    if args.action == "start":
        code, _, err = await _sh(
            sandbox,
            f"{_TMUX} has-session -t {_SESSION} 2>/dev/null && exit 3; "
            f"{_TMUX} new-session -d -s {_SESSION} -x {args.width} -y {args.height} "
            f"&& {_TMUX} pipe-pane -t {_SESSION} -o 'cat >> {_LOG}'",
            max_chars=max_chars,
        )
        if code == 3:
            return "tmux session already running", {"started": False}
        if code != 0:
            raise TmuxError(f"tmux could not start: {err.strip() or code}")
        state.stream_offset = 0
        return "tmux session started", {"started": True}
    if args.action == "stop":
        await _sh(sandbox, f"{_TMUX} kill-server; rm -f {_LOG}", max_chars=max_chars)
        state.stream_offset = 0
        return "tmux session stopped", {}
    if args.action == "send_keys":
        if args.keys is None or args.keys == [] or args.keys == "":
            raise TmuxError("send_keys needs keys")
        script = "; ".join(
            f"{_TMUX} send-keys -t {_SESSION} {shlex.join(key)}" for key in tmux_key_args(args.keys)
        )
        await _checked(sandbox, script, max_chars)
        if not args.block:
            return "", {}
        screen = await _settle(sandbox, args.min_wait_s, args.max_wait_s, max_chars)
        return screen, {"blocked": True}
    if args.action == "capture":
        history = "-S - " if args.capture_entire else ""
        return await _checked(
            sandbox, f"{_TMUX} capture-pane -p -J {history}-t {_SESSION}", max_chars
        ), {}
    # stream
    if args.reset:
        state.stream_offset = 0
        await _checked(sandbox, f": > {_LOG}", max_chars)
    limit = args.max_bytes
    code, out, err = await _sh(
        sandbox,
        f"tail -c +{state.stream_offset + 1} {_LOG} 2>/dev/null | head -c {limit}",
        max_chars=max(max_chars, limit),
    )
    state.stream_offset += len(out.encode())
    return out, {"bytes": len(out.encode()), "offset": state.stream_offset}


async def _checked(sandbox: Sandbox, script: str, max_chars: int) -> str:
    code, out, err = await _sh(sandbox, script, max_chars=max_chars)
    if code != 0:
        detail = err.strip() or f"exit code {code}"
        if any(
            sign in detail for sign in ("no server running", "find session", "error connecting")
        ):
            detail = "no tmux session: call tmux with action=start first"
        raise TmuxError(detail)
    return out


async def _settle(sandbox: Sandbox, min_wait_s: float, max_wait_s: float, max_chars: int) -> str:
    """Wait ``min_wait_s``, then until two captures in a row agree, at most ``max_wait_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(max_wait_s, min_wait_s)
    await asyncio.sleep(min_wait_s)
    capture = f"{_TMUX} capture-pane -p -J -t {_SESSION}"
    previous = await _checked(sandbox, capture, max_chars)
    while loop.time() < deadline:
        await asyncio.sleep(_SETTLE_POLL_S)
        current = await _checked(sandbox, capture, max_chars)
        if current == previous:
            return current
        previous = current
    return previous
