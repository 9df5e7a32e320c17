"""Generate the JSON Schema files under schemas/json/ from the pydantic models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import artifacts, errors, messages, tools

SCHEMA_DIR = Path(__file__).parent / "json"

# file stem -> model; the public contract a client in another language needs.
PUBLIC_MODELS: dict[str, type[BaseModel]] = {
    "execute_request": messages.ExecuteRequest,
    "tool_result": messages.ToolResult,
    "release_request": messages.ReleaseRequest,
    "release_reply": messages.ReleaseReply,
    "status_reply": messages.StatusReply,
    "tool_list_reply": messages.ToolListReply,
    "error_body": errors.ErrorBody,
    **{
        f"artifact_{operation}_{role}": model
        for operation, models in artifacts.ARTIFACT_OPERATIONS.items()
        for role, model in zip(("request", "reply"), models, strict=True)
    },
    **{f"tool_{name}_arguments": tool.args_model for name, tool in tools.BUILTIN_TOOLS.items()},
}


def _is_input(stem: str) -> bool:
    return stem.endswith(("_request", "_arguments"))


def render_schemas() -> dict[str, str]:
    """File name -> file text, for every public model."""
    rendered: dict[str, str] = {}
    for stem, model in PUBLIC_MODELS.items():
        schema: dict[str, Any] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"toolbus/{stem}.json",
            **model.model_json_schema(mode="validation" if _is_input(stem) else "serialization"),
        }
        rendered[f"{stem}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return rendered


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
