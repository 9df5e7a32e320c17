"""The committed JSON Schema files are exactly what the models generate."""

from __future__ import annotations

import json

from schemas._generate import SCHEMA_DIR, render_schemas
from schemas.messages import ExecuteRequest


def test_committed_json_schemas_match_the_models() -> None:
    rendered = render_schemas()
    committed = {path.name for path in SCHEMA_DIR.glob("*.json")}
    assert committed == set(rendered), "schemas/json has extra or missing files: python -m schemas"
    for name, text in rendered.items():
        assert (SCHEMA_DIR / name).read_text() == text, (
            f"schemas/json/{name} drifted from the models: run `python -m schemas` and commit"
        )


def test_execute_request_schema_names_the_seed_fields() -> None:
    schema = json.loads((SCHEMA_DIR / "execute_request.json").read_text())
    assert schema["required"] == ["trajectory_id", "tool"]
    assert set(schema["properties"]) == {"trajectory_id", "tool", "timeout_s", "allow_network"}
    tool = schema["$defs"]["ToolCall"]
    assert set(tool["properties"]) == {"name", "arguments", "uniq_id"}


def test_arguments_may_be_a_json_string() -> None:
    request = ExecuteRequest.model_validate(
        {"trajectory_id": "t", "tool": {"name": "terminal", "arguments": '{"command": "ls"}'}}
    )
    assert request.tool.arguments == {"command": "ls"}
