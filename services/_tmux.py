"""``tmux``: a tmux session inside the slot's sandbox, for interactive (TUI) programs.

Actions: ``start``, ``send_keys`` (``keys``; with ``block`` it waits ``min_wait_s``, then until
the screen stops changing or ``max_wait_s``), ``capture`` (the screen, or with
``capture_entire`` the whole history), ``stream`` (what the pane printed since the last stream,
up to ``max_bytes``; ``reset`` starts over) and ``stop``. The server runs inside the sandbox with
its socket in the sandbox's private /tmp, so it lives as long as the slot's sandbox.

``stream`` counts the pane's raw bytes: its offset moves by exactly the bytes it returned, and
what it returns fits one NATS message (``STREAM_JSON_BUDGET``); ``more_pending`` says whether
more is waiting already. Bytes that are not UTF-8 come as U+FFFD, one per byte; a character
whose last bytes have not been printed yet waits for them.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
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
# The most one ``stream`` returns, as JSON (a control character takes 6 bytes there): with the
# rest of the result it stays well under nats-server's default max_payload of 1 MiB.
STREAM_JSON_BUDGET = 256 * 1024
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)
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
    return await _stream(args, sandbox, state, max_chars)


async def _stream(
    args: TmuxArgs, sandbox: Sandbox, state: TmuxState, max_chars: int
) -> tuple[str, dict[str, object]]:
    if args.reset:
        state.stream_offset = 0
        await _checked(sandbox, f": > {_LOG}", max_chars)
    limit = args.max_bytes
    # One byte more than asked for: whether more is there already.
    outcome = await run_command(
        sandbox,
        f"tail -c +{state.stream_offset + 1} {_LOG} 2>/dev/null | head -c {limit + 1}",
        timeout_s=_COMMAND_TIMEOUT_S,
        max_output_chars=limit + 1,
    )
    read = outcome.stdout.data
    text, used = take_stream_text(read[:limit], STREAM_JSON_BUDGET, at_end=len(read) <= limit)
    state.stream_offset += used
    more_pending = used < len(read) and not (len(read) <= limit and _incomplete(read[used:]))
    return text, {"bytes": used, "offset": state.stream_offset, "more_pending": more_pending}


def _json_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode())


def _incomplete(data: bytes) -> bool:
    """Whether ``data`` is only the start of one UTF-8 character."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        return decoder.decode(data) == "" and bool(data)
    except UnicodeDecodeError:
        return False


def take_stream_text(data: bytes, budget: int, *, at_end: bool) -> tuple[str, int]:
    """The text of the longest start of ``data`` that fits ``budget`` bytes of JSON, and how
    many bytes of ``data`` it is. A character cut at the end of ``data`` is left for later,
    unless nothing else would come (``at_end`` false, one character longer than ``data``)."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    decoded = decoder.decode(data, final=False)
    if not decoded and not at_end:
        decoded = decoder.decode(b"", final=True)
    text = _ESCAPED.sub("\ufffd", decoded)  # one U+FFFD per byte that is not UTF-8
    if _json_size(text) > budget:
        # Every character takes 1 to 6 bytes of JSON: the cut is between budget/6 and budget.
        low, high = max(budget // 6 - 1, 0), min(len(text), budget)
        while low < high:
            middle = (low + high + 1) // 2
            if _json_size(text[:middle]) <= budget:
                low = middle
            else:
                high = middle - 1
        decoded, text = decoded[:low], text[:low]
    return text, len(decoded.encode("utf-8", "surrogateescape"))


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
