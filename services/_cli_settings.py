"""The settings on the command line, and in the environment of the workers ``serve`` starts.

Each ``Settings`` field is a flag of the commands that use it (``--batch-window-ms``); the flags
given win over the environment when ``Settings`` reads it. A local worker gets the settings
back as ``TOOLBUS_*`` variables.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import get_args, get_origin

from . import _loop
from .settings import Settings

# What local workers inherit besides the settings: OpenTelemetry's variables, and the basics.
_INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", _loop.EVENT_LOOP_ENV)


def add_settings_flags(
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


def worker_uid_range(settings: Settings, k: int) -> dict[str, str]:
    """The k-th local worker's sandbox users follow the previous worker's, so no two slots on
    this host share a uid (and with it RLIMIT_NPROC and file ownership)."""
    if settings.sandbox_uid_base == 0:
        return {}
    # Each slot of a worker has its user, and its image slots one more (``SandboxFactory``).
    per_worker = settings.slots + settings.spare_slots + 1
    return {"TOOLBUS_SANDBOX_UID_BASE": str(settings.sandbox_uid_base + k * per_worker)}
