"""``toolbus``: serve everything on one machine, run one part, or call the service.

toolbus serve                      embedded NATS + executor + local workers
toolbus executor | worker          one part alone, joining --nats-url
toolbus call TOOL --trajectory ID --arg command='ls -la'
toolbus release --trajectory ID [--reset]
toolbus status [--json] [--watch [--interval SECONDS] [--count N]] | toolbus tools
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import nats
import nats.errors
import structlog
from nats.aio.client import Client
from pydantic import ValidationError

from backends.local import LocalWorkers
from backends.nomad import NomadConfig, NomadWorkers
from observability.logging import configure_logging
from observability.metrics import configure_metrics
from observability.tracing import configure_tracing

from . import _loop
from ._embedded import EmbeddedNatsServer
from ._status_view import render_status
from ._validation import describe_validation_error
from .client import ToolbusClient
from .exceptions import ToolbusError
from .executor import ExecutorConfig, ExecutorService
from .settings import Settings
from .worker import SandboxWorker, WorkerConfig, new_worker_id

log = structlog.get_logger("toolbus.cli")

_CLIENT_FIELDS = ("nats_url", "host", "port", "prefix", "token", "log_level", "log_format")
_ARTIFACT_CLIENT_FIELDS = (*_CLIENT_FIELDS, "artifacts_bucket")
_SERVICE_NAMES = {"serve": "toolbus", "executor": "toolbus-executor", "worker": "toolbus-worker"}
# What local workers inherit besides the settings: OpenTelemetry's variables, and the basics.
_INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", _loop.EVENT_LOOP_ENV)
_CONNECT_DEADLINE_S = 15.0
DEFAULT_STATUS_INTERVAL_S = 2.0
_T = TypeVar("_T")
_CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase the screen


# -- settings <-> flags -------------------------------------------------------------------------
def _add_settings_flags(
    parser: argparse.ArgumentParser, fields: Sequence[str] | None = None
) -> None:
    group = parser.add_argument_group("settings (each also TOOLBUS_<NAME> in the environment)")
    for name, field in Settings.model_fields.items():
        if fields is not None and name not in fields:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [default: {field.get_default(call_default_factory=True)}]"
        annotation = field.annotation
        if annotation is bool:
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        choices = (
            get_args(annotation)
            if get_origin(annotation) is not None
            and all(isinstance(arg, str) for arg in get_args(annotation))
            else None
        )
        group.add_argument(
            flag,
            dest=name,
            default=argparse.SUPPRESS,
            choices=choices or None,
            metavar=name.upper(),
            help=help_text,
        )


def load_settings(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**given)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as TOOLBUS_* variables, for child processes, with the OTEL_* variables and
    the few basics (PATH, HOME, ...) this process has."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name.startswith("OTEL_") or name in _INHERITED_ENV
    }
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"TOOLBUS_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    return env


def _worker_uid_range(settings: Settings, k: int) -> dict[str, str]:
    """The k-th local worker's sandbox users follow the previous worker's, so no two slots on
    this host share a uid (and with it RLIMIT_NPROC and file ownership)."""
    if settings.sandbox_uid_base == 0:
        return {}
    return {"TOOLBUS_SANDBOX_UID_BASE": str(settings.sandbox_uid_base + k * settings.slots)}


def _nats_url(settings: Settings) -> str:
    return settings.nats_url or f"nats://{settings.host}:{settings.port}"


def nats_servers_and_auth(url: str) -> tuple[list[str], dict[str, str]]:
    """The server URLs without credentials, and the credentials as connect options.

    ``url`` may list several servers, comma-separated. nats-py uses credentials written in a
    URL for that server only, not for the cluster's other servers it learns of or fails over
    to; as connect options they go to every server. Percent-escapes in them are decoded, so a
    password may hold any character (``%40`` for ``@``).
    """
    servers: list[str] = []
    auth: dict[str, str] = {}
    for given in (part.strip() for part in url.split(",")):
        if not given:
            continue
        parts = urllib.parse.urlsplit(given if "://" in given else f"nats://{given}")
        if parts.username is not None and not auth:
            username = urllib.parse.unquote(parts.username)
            if parts.password is None:
                auth = {"token": username}
            else:
                auth = {"user": username, "password": urllib.parse.unquote(parts.password)}
        host = parts.hostname or "127.0.0.1"
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        servers.append(urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")))
    return servers, auth


async def _connect(settings: Settings, name: str, *, service: bool = True) -> Client:
    """Connect to NATS; a service keeps reconnecting later, a one-shot command does not."""
    servers, auth = nats_servers_and_auth(_nats_url(settings))
    url = ",".join(servers)  # for messages: never the credentials

    async def on_error(exc: Exception) -> None:
        if service:  # one line, no traceback: the reconnect loop will try again
            log.warning("nats connection error", url=url, error=str(exc) or type(exc).__name__)

    try:
        return await asyncio.wait_for(
            nats.connect(
                servers,
                name=name,
                **auth,
                connect_timeout=2,
                error_cb=on_error,
                allow_reconnect=service,
                # nats-py reads 0 as "no limit" here; a one-shot command tries twice.
                max_reconnect_attempts=-1 if service else 1,
                reconnect_time_wait=1 if service else 0.1,
            ),
            _CONNECT_DEADLINE_S if service else None,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        detail = (
            "no server answered"
            if isinstance(exc, nats.errors.NoServersError)
            else (str(exc) or type(exc).__name__)
        )
        raise ToolbusError(f"cannot connect to NATS at {url}: {detail}") from None


# -- long-running commands ----------------------------------------------------------------------
async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:  # also when cancelled: the loop must not keep handlers for a stopped service
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_serve(settings: Settings, *, ready: Callable[[str], None] | None = None) -> None:
    if settings.backend == "nomad" and settings.nats_url is None:
        raise ToolbusError(
            "--backend nomad needs --nats-url: Nomad runs the workers on other hosts, which "
            "cannot reach an embedded NATS server"
        )
    # Exit order is the reverse: executor stops accepting, then workers, then NATS.
    async with AsyncExitStack() as stack:
        if settings.nats_url is None:
            server = await stack.enter_async_context(
                EmbeddedNatsServer(
                    store_dir=settings.data_dir / "nats", host=settings.host, port=settings.port
                )
            )
            settings = settings.model_copy(update={"nats_url": server.url})
        url = _nats_url(settings)
        nc = await _connect(settings, "toolbus-executor")
        stack.push_async_callback(nc.drain)
        workers: LocalWorkers | NomadWorkers | None = None
        if settings.backend == "local" and settings.workers > 0:
            workers = await stack.enter_async_context(
                LocalWorkers(
                    count=settings.workers,
                    env=settings_env(settings),
                    env_for=lambda k: _worker_uid_range(settings, k),
                )
            )
        elif settings.backend == "nomad":
            config = NomadConfig.from_settings(
                settings,
                settings_env(settings),
                token=settings.nomad_token,
                nats_address=settings.nomad_nats_address,
            )
            workers = await stack.enter_async_context(NomadWorkers(config))
        executor = await stack.enter_async_context(
            ExecutorService(nc, ExecutorConfig.from_settings(settings))
        )
        if workers is not None:
            await workers.wait_registered(lambda: executor.status().pool.containers)
        (ready or _print_banner)(url)
        await _until_signalled()
        log.info("stopping")


def _print_banner(url: str) -> None:
    example = json.dumps(
        {
            "trajectory_id": "demo",
            "tool": {"name": "terminal", "arguments": {"command": "uname -a"}},
        }
    )
    print(
        f"toolbus is ready on {url}\n"
        f"  try:  toolbus call terminal --nats-url {url} --trajectory demo "
        "--arg command='uname -a'\n"
        f"  or, with the nats CLI:  nats --server {url} request tools.execute.terminal "
        f"{shlex.quote(example)}\n"
        "  Ctrl-C stops everything.",
        flush=True,
    )


async def run_executor(settings: Settings) -> None:
    nc = await _connect(settings, "toolbus-executor")
    try:
        async with ExecutorService(nc, ExecutorConfig.from_settings(settings)):
            await _until_signalled()
    finally:
        await nc.drain()


async def run_worker(settings: Settings) -> None:
    worker_id = settings.worker_id or new_worker_id()
    config = WorkerConfig.from_settings(settings, worker_id)
    nc = await _connect(settings, f"toolbus-worker-{worker_id}")
    try:
        async with SandboxWorker(nc, config):
            await _until_signalled()
    finally:
        await nc.drain()


# -- client commands ----------------------------------------------------------------------------
async def _with_client(
    settings: Settings, action: Callable[[ToolbusClient], Awaitable[int]]
) -> int:
    nc = await _connect(settings, "toolbus-cli", service=False)
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

    return await _with_client(settings, action)


async def run_release(settings: Settings, args: argparse.Namespace) -> int:
    async def action(client: ToolbusClient) -> int:
        reply = await client.release(args.trajectory, reset_workspace=args.reset)
        print(reply.model_dump_json())
        return 0

    return await _with_client(settings, action)


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

    return await _with_client(settings, watch if args.watch else once)


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
    with _stop_on_signals(stop):
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


@contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM set ``stop`` instead of interrupting, so a watch ends cleanly (exit
    0). Off the main thread (a test calling ``main``) signals cannot be caught: nothing to do."""
    loop = asyncio.get_running_loop()
    caught: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (ValueError, RuntimeError, NotImplementedError):
            break
        caught.append(sig)
    try:
        yield
    finally:
        for sig in caught:
            loop.remove_signal_handler(sig)


async def run_upload(settings: Settings, args: argparse.Namespace) -> int:
    archive = Path(args.archive)
    if not archive.is_file():
        raise ToolbusError(f"no such file: {archive}")

    async def action(client: ToolbusClient) -> int:
        reply = await client.upload_archive(args.trajectory, archive, path=args.path)
        print(reply.model_dump_json(indent=2))
        return 0 if reply.success else 1

    return await _with_client(settings, action)


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

    return await _with_client(settings, action)


async def run_tools(settings: Settings, args: argparse.Namespace) -> int:
    async def action(client: ToolbusClient) -> int:
        print((await client.list_tools()).model_dump_json(indent=2))
        return 0

    return await _with_client(settings, action)


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


# -- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolbus", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, help_text in (
        ("serve", "run everything on this machine (embedded NATS unless --nats-url)"),
        ("executor", "run one executor, joining --nats-url"),
        ("worker", "run one sandbox worker, joining --nats-url"),
    ):
        _add_settings_flags(commands.add_parser(name, help=help_text))

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
    _add_settings_flags(call, _CLIENT_FIELDS)

    release = commands.add_parser("release", help="release a trajectory's slot")
    release.add_argument("--trajectory", required=True)
    release.add_argument("--reset", action="store_true", help="wipe the workspace")
    _add_settings_flags(release, _CLIENT_FIELDS)

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
    _add_settings_flags(status, _CLIENT_FIELDS)

    upload = commands.add_parser(
        "upload", help="unpack a tar or tar.gz archive into a trajectory's workspace"
    )
    upload.add_argument("archive", help="the archive file")
    upload.add_argument("--trajectory", required=True)
    upload.add_argument("--path", default=".", help="directory in the workspace (default .)")
    _add_settings_flags(upload, _ARTIFACT_CLIENT_FIELDS)

    archive = commands.add_parser(
        "archive", help="archive a directory of a trajectory's workspace (and fetch it)"
    )
    archive.add_argument("path", nargs="?", default=".", help="directory in the workspace")
    archive.add_argument("--trajectory", required=True)
    archive.add_argument("--format", choices=["tar.gz", "tgz", "tar"], default="tar.gz")
    archive.add_argument("-o", "--output", help="fetch the archive into this file")
    _add_settings_flags(archive, _ARTIFACT_CLIENT_FIELDS)

    tools = commands.add_parser("tools", help="list the tools (OpenAI function format)")
    _add_settings_flags(tools, _CLIENT_FIELDS)
    return parser


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
