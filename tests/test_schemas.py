"""The committed JSON Schema files are exactly what the models generate."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas._generate import PUBLIC_MODELS, SCHEMA_DIR, render_schemas
from schemas.internal import BatchItem
from schemas.messages import JSON_PARSER_MAX_DEPTH, MAX_JSON_DEPTH, ExecuteRequest
from schemas.tools import (
    ReadFileArgs,
    StatefulTerminalArgs,
    TerminalArgs,
    TmuxArgs,
    WriteFileArgs,
)
from services._batcher import OutgoingItem
from services._replies import parse_request
from services._validation import describe_validation_error
from services.exceptions import BadRequest


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
    assert set(schema["properties"]) == {
        "trajectory_id",
        "tool",
        "timeout_s",
        "allow_network",
        "image",  # toolbus's own (issue 12): the slot's environment
    }
    tool = schema["$defs"]["ToolCall"]
    assert set(tool["properties"]) == {"name", "arguments", "uniq_id"}


def test_arguments_may_be_a_json_string() -> None:
    request = ExecuteRequest.model_validate(
        {"trajectory_id": "t", "tool": {"name": "terminal", "arguments": '{"command": "ls"}'}}
    )
    assert request.tool.arguments == {"command": "ls"}


# -- hostile input: nesting, numbers, strings ---------------------------------------------------
def _nested(depth: int, leaf: Any = 0) -> Any:
    """``depth`` levels of alternating objects and arrays around ``leaf`` (built without
    recursion, so any depth can be made)."""
    value = leaf
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


def _deep_body(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def _execute_body(arguments: Any) -> bytes:
    return json.dumps(
        {"trajectory_id": "t", "tool": {"name": "terminal", "arguments": arguments}}
    ).encode()


def test_the_json_parser_reads_exactly_json_parser_max_depth_levels() -> None:
    """Pins pydantic-core's (jiter's) recursion limit that JSON_PARSER_MAX_DEPTH names."""
    alternating: Callable[[int], str] = lambda depth: json.dumps(_nested(depth))  # noqa: E731
    for shape in (alternating, _arrays, _objects):
        TypeAdapter(Any).validate_json(shape(JSON_PARSER_MAX_DEPTH))
        with pytest.raises(ValidationError, match="recursion limit exceeded"):
            TypeAdapter(Any).validate_json(shape(JSON_PARSER_MAX_DEPTH + 1))


def _arrays(depth: int) -> str:
    return "[" * depth + "0" + "]" * depth


def _objects(depth: int) -> str:
    return '{"a":' * depth + "0" + "}" * depth


@pytest.mark.parametrize("depth", [JSON_PARSER_MAX_DEPTH + 1, 999, 5_000, 100_000])
def test_a_body_nested_past_the_parser_limit_gets_a_precise_400(depth: int) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_request(ExecuteRequest, _deep_body(depth), max_bytes=10_000_000)
    assert refused.value.kind == "invalid_json"
    assert refused.value.message == (
        "request body is nested too deeply: JSON arrays and objects may nest at most "
        f"{JSON_PARSER_MAX_DEPTH} levels (tool arguments at most {MAX_JSON_DEPTH})"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "request body is not valid JSON: EOF while parsing a value at line 1 column 0"),
        (b'{"a": 1,}', "request body is not valid JSON: trailing comma at line 1 column 9"),
        (b'{"a": "\xff"}', "request body is not valid JSON: invalid unicode code point"),
        (b'{"a": "\\ud800"}', "request body is not valid JSON: unexpected end of hex escape"),
    ],
)
def test_invalid_json_is_described_without_parsing_it_again(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_request(ExecuteRequest, body, max_bytes=1000)
    assert refused.value.kind == "invalid_json"
    assert refused.value.message.startswith(message)


@pytest.mark.parametrize("as_string", [False, True], ids=["object", "json-string"])
def test_arguments_may_nest_max_json_depth_levels_and_no_more(as_string: bool) -> None:
    def body(depth: int) -> bytes:
        # The arguments object is the first level.
        arguments: Any = {"command": "ls", "deep": _nested(depth - 1)}
        return _execute_body(json.dumps(arguments) if as_string else arguments)

    request = parse_request(ExecuteRequest, body(MAX_JSON_DEPTH), max_bytes=1_000_000)
    assert request.tool.arguments["command"] == "ls"
    for depth in (MAX_JSON_DEPTH + 1, 198):
        with pytest.raises(BadRequest) as refused:
            parse_request(ExecuteRequest, body(depth), max_bytes=1_000_000)
        assert refused.value.message == (
            "invalid ExecuteRequest: tool.arguments: JSON arrays and objects nested too deeply: "
            f"at most {MAX_JSON_DEPTH} levels"
        )


@pytest.mark.parametrize("depth", [JSON_PARSER_MAX_DEPTH + 1, 999, 100_000])
def test_arguments_as_a_string_nested_past_any_limit_get_a_precise_400(depth: int) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_request(ExecuteRequest, _execute_body(_objects(depth)), max_bytes=1_000_000)
    assert refused.value.message.startswith(
        "invalid ExecuteRequest: tool.arguments: arguments is a string but not valid JSON: "
        "recursion limit exceeded at line 1 column "
    )


def test_arguments_as_a_string_are_parsed_like_the_body_lone_surrogates_refused() -> None:
    # json.loads accepts a lone surrogate; serializing it for the worker then fails.
    with pytest.raises(BadRequest, match="arguments is a string but not valid JSON"):
        parse_request(ExecuteRequest, _execute_body('{"command": "\\ud800"}'), max_bytes=1000)


def test_what_the_executor_accepts_the_worker_batch_parser_reads() -> None:
    arguments = {"command": "ls\nls", "deep": _nested(MAX_JSON_DEPTH - 1), "n": 1.5}
    body = _execute_body({**arguments, "big": 2**70, "surrogates": "\U0001f600"})
    # Non-finite numbers, which the request's parser takes (found in review: they went to the
    # worker as bare Infinity and NaN, where BatchItem.model_dump_json writes null).
    body = body.replace(b'"n": 1.5', b'"n": 1.5, "inf": Infinity, "nan": NaN')
    request = parse_request(ExecuteRequest, body, max_bytes=1_000_000)
    fields: dict[str, Any] = {
        "item_id": "executor.1",
        "trajectory_id": request.trajectory_id,
        "epoch": 3,
        "tool": "terminal",
        "arguments": request.tool.arguments,
        "timeout_s": 1.0,
        "uniq_id": "u-1",
        "allow_network": False,
        "trace_context": {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        "created_at": 1_700_000_000.25,
    }
    # The executor writes a BatchItem's JSON itself (no model on the hot path): it must read
    # back, in the worker, as the very BatchItem the same fields make.
    outgoing = OutgoingItem.encode(**fields)
    assert outgoing.payload == BatchItem(**fields).model_dump_json().encode()
    assert (outgoing.item_id, outgoing.timeout_s, outgoing.uniq_id) == ("executor.1", 1.0, "u-1")
    # A batch is JSON lines: the worker reads each item on its own line.
    assert b"\n" not in outgoing.payload
    read = BatchItem.model_validate_json(outgoing.payload).arguments
    assert (read["inf"], read["nan"], read["big"]) == (None, None, 2**70)
    assert {name: read[name] for name in arguments} == arguments


# Smallest valid body of each public input model, to which one numeric field is added.
_VALID_INPUTS: dict[str, dict[str, Any]] = {
    "execute_request": {"trajectory_id": "t", "tool": {"name": "terminal"}},
    "release_request": {"trajectory_id": "t"},
    "artifact_read_request": {"trajectory_id": "t", "path": "f"},
    "artifact_list_request": {"trajectory_id": "t"},
    "artifact_archive_request": {"trajectory_id": "t"},
    "artifact_upload_request": {"trajectory_id": "t", "name": "o"},
    "tool_terminal_arguments": {"command": "ls"},
    "tool_terminal_stateful_arguments": {"command": "ls"},
    "tool_tmux_arguments": {"action": "start"},
    "tool_read_file_arguments": {"path": "f"},
    "tool_write_file_arguments": {"path": "f", "content": ""},
}


def _numeric_fields() -> list[tuple[str, str, str, float]]:
    """(model stem, field, 'integer' or 'number', a valid value) of every input model."""
    fields = []
    for stem, model in PUBLIC_MODELS.items():
        if not stem.endswith(("_request", "_arguments")):
            continue
        schema = model.model_json_schema()
        for name, prop in schema["properties"].items():
            types = {option.get("type") for option in prop.get("anyOf", [prop])}
            for kind in ("integer", "number"):
                if kind in types:
                    low = prop.get("minimum", prop.get("exclusiveMinimum", 0) + 1)
                    fields.append((stem, name, kind, low))
    return fields


NUMERIC_FIELDS = _numeric_fields()


def test_every_input_model_is_covered_and_the_numeric_fields_are_found() -> None:
    inputs = {stem for stem in PUBLIC_MODELS if stem.endswith(("_request", "_arguments"))}
    assert inputs == set(_VALID_INPUTS)
    found = {(stem, name) for stem, name, _, _ in NUMERIC_FIELDS}
    assert {
        ("execute_request", "timeout_s"),
        ("artifact_read_request", "max_bytes"),
        ("artifact_archive_request", "max_entries"),
        ("tool_terminal_arguments", "timeout"),
        ("tool_tmux_arguments", "width"),
        ("tool_tmux_arguments", "min_wait_s"),
    } <= found
    assert len(found) == 16


@pytest.mark.parametrize(
    ("stem", "name", "kind", "valid"),
    NUMERIC_FIELDS,
    ids=[f"{stem}.{name}" for stem, name, _, _ in NUMERIC_FIELDS],
)
def test_numeric_fields_refuse_booleans_and_numeric_strings(
    stem: str, name: str, kind: str, valid: float
) -> None:
    model = PUBLIC_MODELS[stem]
    expected = (
        "Input should be a valid integer"
        if kind == "integer"
        else ("Input should be a valid number")
    )
    for hostile in (True, False, "1", "60", " 2 "):
        data = {**_VALID_INPUTS[stem], name: hostile}
        validations: list[Callable[[], object]] = [
            functools.partial(model.model_validate, data),
            functools.partial(model.model_validate_json, json.dumps(data)),
        ]
        for validate in validations:
            with pytest.raises(ValidationError) as refused:
                validate()
            assert describe_validation_error(refused.value) == f"{name}: {expected}"
    accepted = model.model_validate_json(json.dumps({**_VALID_INPUTS[stem], name: int(valid)}))
    value = getattr(accepted, name)
    assert value == int(valid) and not isinstance(value, bool)
    assert isinstance(value, int if kind == "integer" else float)


@pytest.mark.parametrize("number", ["1e999", "-1e999", "NaN", "Infinity"])
def test_float_fields_refuse_what_is_not_a_finite_number(number: str) -> None:
    body = b'{"trajectory_id": "t", "tool": {"name": "terminal"}, "timeout_s": %s}' % (
        number.encode()
    )
    with pytest.raises(BadRequest) as refused:
        parse_request(ExecuteRequest, body, max_bytes=1000)
    assert refused.value.message == (
        "invalid ExecuteRequest: timeout_s: Input should be a finite number"
    )


def test_a_boolean_timeout_gets_a_precise_message_without_the_value() -> None:
    body = b'{"trajectory_id": "t", "tool": {"name": "terminal"}, "timeout_s": true}'
    with pytest.raises(BadRequest) as refused:
        parse_request(ExecuteRequest, body, max_bytes=1000)
    assert (
        refused.value.message == "invalid ExecuteRequest: timeout_s: Input should be a valid number"
    )


@pytest.mark.parametrize(
    ("model", "arguments", "field", "index"),
    [
        (TerminalArgs, {"command": "echo a\x00b"}, "command", 6),
        (StatefulTerminalArgs, {"command": "\x00"}, "command", 0),
        (TmuxArgs, {"action": "send_keys", "keys": "a\x00"}, "keys", 1),
        (TmuxArgs, {"action": "send_keys", "keys": ["Enter", "\x00b"]}, "keys", 0),
        (ReadFileArgs, {"path": "d/\x00"}, "path", 2),
        (WriteFileArgs, {"path": "\x00", "content": "NUL is fine here: \x00"}, "path", 0),
    ],
)
def test_commands_keys_and_paths_refuse_nul_characters(
    model: type[BaseModel], arguments: dict[str, Any], field: str, index: int
) -> None:
    # A NUL cannot reach bash or tmux through argv: the call used to die by SIGKILL instead.
    with pytest.raises(ValidationError) as refused:
        model.model_validate(arguments)
    assert describe_validation_error(refused.value) == (
        f"{field}: String should not contain a NUL character (one is at character {index})"
    )
