"""The ``toolbus`` command line: its commands, their arguments, and the settings flags of each."""

from __future__ import annotations

import argparse

from ._cli_settings import add_settings_flags
from ._cli_status import DEFAULT_STATUS_INTERVAL_S

_CLIENT_FIELDS = ("nats_url", "host", "port", "prefix", "token", "log_level", "log_format")
_ARTIFACT_CLIENT_FIELDS = (*_CLIENT_FIELDS, "artifacts_bucket")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {text!r}")
    return value


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolbus", description=description)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, help_text in (
        ("serve", "run everything on this machine (embedded NATS unless --nats-url)"),
        ("executor", "run one executor, joining --nats-url"),
        ("worker", "run one sandbox worker, joining --nats-url"),
    ):
        add_settings_flags(commands.add_parser(name, help=help_text))

    call = commands.add_parser("call", help="execute one tool call and print the result")
    call.add_argument("tool", help="tool name, e.g. terminal, read_file, write_file")
    call.add_argument("--trajectory", required=True, help="trajectory id")
    call.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a string argument (repeatable)",
    )
    call.add_argument("--args", metavar="JSON", help="arguments as a JSON object")
    call.add_argument("--timeout", type=float, help="timeout in seconds")
    call.add_argument("--uniq-id", help="id echoed back in the result")
    call.add_argument("--json", action="store_true", help="print the whole result as JSON")
    add_settings_flags(call, _CLIENT_FIELDS)

    release = commands.add_parser("release", help="release a trajectory's slot")
    release.add_argument("--trajectory", required=True)
    release.add_argument("--reset", action="store_true", help="wipe the workspace")
    add_settings_flags(release, _CLIENT_FIELDS)

    status = commands.add_parser(
        "status", help="show the executor's queue and call rates, the slots and the workers"
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print the status reply as JSON (with --watch: one object per line)",
    )
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument(
        "--interval",
        type=_positive_float,
        metavar="SECONDS",
        help=f"seconds between refreshes with --watch [default: {DEFAULT_STATUS_INTERVAL_S}]",
    )
    status.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="with --watch: stop after N refreshes (for scripts)",
    )
    add_settings_flags(status, _CLIENT_FIELDS)

    upload = commands.add_parser(
        "upload", help="unpack a tar or tar.gz archive into a trajectory's workspace"
    )
    upload.add_argument("archive", help="the archive file")
    upload.add_argument("--trajectory", required=True)
    upload.add_argument("--path", default=".", help="directory in the workspace (default .)")
    add_settings_flags(upload, _ARTIFACT_CLIENT_FIELDS)

    archive = commands.add_parser(
        "archive", help="archive a directory of a trajectory's workspace (and fetch it)"
    )
    archive.add_argument("path", nargs="?", default=".", help="directory in the workspace")
    archive.add_argument("--trajectory", required=True)
    archive.add_argument("--format", choices=["tar.gz", "tgz", "tar"], default="tar.gz")
    archive.add_argument("-o", "--output", help="fetch the archive into this file")
    add_settings_flags(archive, _ARTIFACT_CLIENT_FIELDS)

    tools = commands.add_parser("tools", help="list the tools (OpenAI function format)")
    add_settings_flags(tools, _CLIENT_FIELDS)
    return parser
