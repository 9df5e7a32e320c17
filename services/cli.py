"""``toolbus``: serve everything on one machine, run one part, or call the service.

toolbus serve                      embedded NATS + executor + local workers
toolbus executor | worker          one part alone, joining --nats-url
toolbus call TOOL --trajectory ID --arg command='ls -la'
toolbus release --trajectory ID [--reset]
toolbus status [--json] [--watch [--interval SECONDS] [--count N]] | toolbus tools

This module parses the command line and runs the command asked for. The commands: the
long-running ones in ``_cli_services.py``, ``status`` in ``_cli_status.py``, the other client
commands in ``_cli_client.py``; the parser in ``_cli_parser.py``, the settings as flags and as
the workers' environment in ``_cli_settings.py``, the NATS connection in ``_cli_nats.py``,
signals in ``_cli_signals.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from pydantic import ValidationError

from observability.logging import configure_logging
from observability.metrics import configure_metrics
from observability.tracing import configure_tracing

from . import _cli_parser, _loop
from ._cli_client import run_archive, run_call, run_release, run_tools, run_upload
from ._cli_nats import connect, nats_servers_and_auth
from ._cli_services import run_executor, run_serve, run_worker
from ._cli_settings import load_settings, settings_env, worker_uid_range
from ._cli_status import DEFAULT_STATUS_INTERVAL_S, run_status
from ._validation import describe_validation_error
from .exceptions import ToolbusError
from .settings import Settings

# Each command lives in a module of its own (services/_cli_*.py); they are importable from here.
__all__ = [
    "DEFAULT_STATUS_INTERVAL_S",
    "build_parser",
    "load_settings",
    "main",
    "nats_servers_and_auth",
    "run_archive",
    "run_call",
    "run_executor",
    "run_release",
    "run_serve",
    "run_status",
    "run_tools",
    "run_upload",
    "run_worker",
    "settings_env",
]

# Their names when they were defined here, for the tests and benchmarks that use them.
_connect = connect
_worker_uid_range = worker_uid_range

_SERVICE_NAMES = {"serve": "toolbus", "executor": "toolbus-executor", "worker": "toolbus-worker"}


def build_parser() -> argparse.ArgumentParser:
    """The command line, described by this module's first line."""
    return _cli_parser.build_parser(description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        print(f"toolbus: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    service_name = _SERVICE_NAMES.get(args.command, "toolbus-cli")
    try:
        # Off (and free) unless the OTEL_* variables ask for an exporter.
        tracer_provider = configure_tracing(service_name=service_name)
        meter_provider = configure_metrics(service_name=service_name)
    except ValueError as exc:
        print(f"toolbus: invalid OpenTelemetry settings: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, settings)
    finally:
        for provider in (tracer_provider, meter_provider):
            if provider is not None:
                provider.shutdown()  # flushes what is still buffered


def _run(args: argparse.Namespace, settings: Settings) -> int:
    runners: dict[str, Callable[[], Coroutine[Any, Any, int | None]]] = {
        "serve": lambda: run_serve(settings),
        "executor": lambda: run_executor(settings),
        "worker": lambda: run_worker(settings),
        "call": lambda: run_call(settings, args),
        "release": lambda: run_release(settings, args),
        "status": lambda: run_status(settings, args),
        "tools": lambda: run_tools(settings, args),
        "upload": lambda: run_upload(settings, args),
        "archive": lambda: run_archive(settings, args),
    }
    try:
        # A worker starts sandboxes: asyncio's loop starts processes faster (see _loop.py).
        code = _loop.run(runners[args.command](), fast=args.command != "worker")
    except ToolbusError as exc:
        print(f"toolbus: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code or 0
