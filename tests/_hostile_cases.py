"""The generated hostile requests of test_hostile_input.py: a seeded generator of requests the
executor must refuse at the door.

Every case is invalid by construction (a request that passed would take a slot and run a
command); it carries the error it must get and a part of that error's message.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from typing import Any

from schemas.messages import JSON_PARSER_MAX_DEPTH, MAX_JSON_DEPTH

MAX_REQUEST_BYTES = 256 * 1024  # the executor's default limit


# The error code of each error kind the cases expect.
CODES = {
    "invalid_json": 400,
    "invalid_request": 400,
    "payload_too_large": 413,
    "unknown_tool": 404,
    "no_active_slot": 404,
}


@dataclass(frozen=True)
class Case:
    label: str
    subject: str
    body: bytes
    # The error kind the reply must carry; None: a normal reply (a ToolResult, a status, ...).
    error: str | None
    message: str = ""  # a part of the error message the reply must carry
    headers: dict[str, str] | None = None
    # Sandbox cases: the ToolResult's error_kind (None: success), or "artifact-failure".
    sandboxed: bool = False
    result_kind: str | None = None


def nested(depth: int, leaf: Any = 0) -> Any:
    """``depth`` levels of alternating arrays and objects around ``leaf``."""
    value = leaf
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


_JUNK: tuple[Any, ...] = (None, [], {}, [1, 2], {"a": {"b": []}}, 1.5, -7, 2**70, "x", "\x00", "☃")


# -- the generator ------------------------------------------------------------------------------
class Generator:
    """Builds hostile cases, each invalid at the executor by construction."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.count = 0

    # A trajectory id no slot is held for: a valid request naming it is refused, not served.
    def stranger(self) -> str:
        return f"fuzz-nobody-{self.rng.getrandbits(48):012x}"

    def execute_body(self, **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "trajectory_id": self.stranger(),
            "tool": {"name": "terminal", "arguments": {"command": "true"}},
        }
        body.update(overrides)
        return body

    def artifact_body(self, operation: str) -> dict[str, Any]:
        body: dict[str, Any] = {"trajectory_id": self.stranger()}
        if operation == "read":
            body["path"] = "f.txt"
        if operation == "upload":
            body["name"] = "archive.tar"
        return body

    def junk_value(self) -> Any:
        return self.rng.choice(_JUNK)

    def text(self, length: int) -> str:
        alphabet = "aZ09 _-./\\'\"\t\u00e9\u2603\U0001f600\u202e\u0000\ufeff"
        return "".join(self.rng.choice(alphabet) for _ in range(length))

    def case(self) -> Case:
        """One hostile case, made by one of the ``hostile_*`` methods."""
        self.count += 1
        kinds = [getattr(self, name) for name in dir(self) if name.startswith("hostile_")]
        case: Case = self.rng.choice(kinds)()
        return dataclasses.replace(case, label=f"#{self.count} {case.label}")

    def hostile_malformed_json(self) -> Case:
        subject, valid = self.rng.choice(
            [
                ("tools.execute.terminal", dumps(self.execute_body())),
                ("tools.release", dumps({"trajectory_id": self.stranger()})),
                ("tools.artifacts.read", dumps(self.artifact_body("read"))),
            ]
        )
        how = self.rng.randrange(5)
        if how == 0:  # every proper prefix of an object is invalid
            body = valid[: self.rng.randrange(len(valid))]
        elif how == 1:
            body = valid + self.rng.choice([b"x", b"}", b"{}", b",", b"\x00"])
        elif how == 2:
            body = valid.replace(b'"', b"'", 1)
        elif how == 3:
            body = valid[:-1] + b',"extra":}'
        else:
            noise = bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(1, 60)))
            body = b"{" + noise + b"\x01"  # no JSON text ends with \x01
        return Case(
            f"malformed json {subject} {body[:40]!r}",
            subject,
            body,
            "invalid_json",
            "request body is not valid JSON",
        )

    def hostile_invalid_utf8(self) -> Case:
        bad = self.rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        body = dumps(self.execute_body()).replace(b"fuzz-nobody", b"fuzz" + bad, 1)
        return Case(f"invalid utf-8 {bad!r}", "tools.execute.terminal", body, "invalid_json")

    def hostile_wrong_type(self) -> Case:
        choices: list[tuple[str, str, Any]] = [
            ("trajectory_id", "execute", self.rng.choice([None, 7, [], {}, True])),
            ("tool", "execute", self.rng.choice([None, "terminal", [], 3])),
            ("tool.name", "execute", self.rng.choice([None, 1, [], {}])),
            ("tool.arguments", "execute", self.rng.choice([[], 5, True, "not json", "[1]"])),
            ("tool.uniq_id", "execute", self.rng.choice([1, [], {}])),
            ("timeout_s", "execute", self.rng.choice([[], {}, 0, -1, "soon"])),
            ("allow_network", "execute", self.rng.choice([[], {}, "maybe", 2])),
            ("reset_workspace", "release", self.rng.choice([[], {}, "maybe", 2])),
            ("path", "read", self.rng.choice([None, 1, [], ""])),
            ("encoding", "read", self.rng.choice(["utf-16", 1, None])),
            ("max_bytes", "read", self.rng.choice([0, -5, 1.5, [], "1"])),
            ("recursive", "list", self.rng.choice([[], "maybe", 3])),
            ("format", "archive", self.rng.choice(["zip", 1, []])),
            ("max_entries", "archive", self.rng.choice([0, 2.5, {}])),
            ("bucket", "upload", self.rng.choice(["a b", "../x", 1, "*"])),
            ("sha256", "upload", self.rng.choice(["xyz", "0" * 63, 1])),
        ]
        name, where, value = self.rng.choice(choices)
        if where == "execute":
            body = self.execute_body()
            if name.startswith("tool."):
                body["tool"][name.split(".", 1)[1]] = value
            else:
                body[name] = value
            subject = "tools.execute.terminal"
        elif where == "release":
            body = {"trajectory_id": self.stranger(), name: value}
            subject = "tools.release"
        else:
            body = {**self.artifact_body(where), name: value}
            subject = f"tools.artifacts.{where}"
        return Case(
            f"wrong type {subject} {name}={value!r}",
            subject,
            dumps(body),
            "invalid_request",
            name.rsplit(".", 1)[-1],
        )

    def _number_fields(self) -> tuple[str, dict[str, Any], str, str]:
        """(subject, body, field, 'number' or 'integer') with one numeric field to spoil."""
        subject, body, name, kind = self.rng.choice(
            [
                ("tools.execute.terminal", self.execute_body(), "timeout_s", "number"),
                ("tools.artifacts.read", self.artifact_body("read"), "max_bytes", "integer"),
                ("tools.artifacts.read", self.artifact_body("read"), "timeout_s", "number"),
                ("tools.artifacts.list", self.artifact_body("list"), "max_entries", "integer"),
                ("tools.artifacts.archive", self.artifact_body("archive"), "max_bytes", "integer"),
                (
                    "tools.artifacts.archive",
                    self.artifact_body("archive"),
                    "max_entries",
                    "integer",
                ),
                ("tools.artifacts.upload", self.artifact_body("upload"), "timeout_s", "number"),
            ]
        )
        return subject, body, name, kind

    def hostile_boolean_for_number(self) -> Case:
        subject, body, name, kind = self._number_fields()
        body[name] = self.rng.choice([True, False])
        return Case(
            f"boolean {subject} {name}",
            subject,
            dumps(body),
            "invalid_request",
            f"{name}: Input should be a valid {kind}",
        )

    def hostile_numeric_string_for_number(self) -> Case:
        subject, body, name, kind = self._number_fields()
        body[name] = self.rng.choice(["1", "30", "2.5", "1e3"])
        return Case(
            f"numeric string {subject} {name}",
            subject,
            dumps(body),
            "invalid_request",
            f"{name}: Input should be a valid {kind}",
        )

    def hostile_not_finite(self) -> Case:
        number = self.rng.choice([b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity"])
        body = dumps(self.execute_body(timeout_s=12345.5)).replace(b"12345.5", number)
        return Case(
            f"not finite timeout_s {number!r}",
            "tools.execute.terminal",
            body,
            "invalid_request",
            "timeout_s: Input should be a finite number",
        )

    def hostile_deep_arguments(self) -> Case:
        depth = self.rng.choice([MAX_JSON_DEPTH + 1, MAX_JSON_DEPTH + 2, 64, 150, 196, 197, 198])
        arguments = {"command": "true", "x": nested(depth - 1)}
        body = self.execute_body()
        body["tool"]["arguments"] = arguments
        return Case(
            f"arguments nested {depth}",
            "tools.execute.terminal",
            dumps(body),
            "invalid_request",
            "nested too deeply",
        )

    def hostile_deep_arguments_string(self) -> Case:
        depth = self.rng.choice([MAX_JSON_DEPTH + 1, 198, 500, 999, 5_000])
        body = self.execute_body()
        body["tool"]["arguments"] = '{"command": "true", "x": ' + "[" * depth + "]" * depth + "}"
        message = (
            "nested too deeply" if depth < JSON_PARSER_MAX_DEPTH else ("recursion limit exceeded")
        )
        return Case(
            f"arguments string nested {depth}",
            "tools.execute.terminal",
            dumps(body),
            "invalid_request",
            message,
        )

    def hostile_deep_body(self) -> Case:
        depth = self.rng.choice([JSON_PARSER_MAX_DEPTH + 1, 999, 1_000, 5_000, 40_000])
        subject = self.rng.choice(
            ["tools.execute.terminal", "tools.release", "tools.artifacts.list"]
        )
        opener, closer = self.rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        body = opener * depth + b"1" + closer * depth
        return Case(f"body nested {depth}", subject, body, "invalid_json", "nested too deeply")

    def hostile_deep_unknown_field(self) -> Case:
        depth = self.rng.choice([10, 100, 190])
        body = self.execute_body(extra=nested(depth))
        return Case(
            f"unknown field nested {depth}",
            "tools.execute.terminal",
            dumps(body),
            "invalid_request",
            "extra: Extra inputs are not permitted",
        )

    def hostile_oversized(self) -> Case:
        size = self.rng.choice([MAX_REQUEST_BYTES + 1, 300_000, 900_000])
        body = self.execute_body()
        body["tool"]["arguments"] = {"command": "true", "pad": "x" * size}
        return Case(
            f"oversized {size}",
            "tools.execute.terminal",
            dumps(body),
            "payload_too_large",
            f"the limit is {MAX_REQUEST_BYTES}",
        )

    def hostile_unknown_tool(self) -> Case:
        name = self.rng.choice(
            ["nope", "rm", "Terminal", "terminal2", "ünïcødé", "☃", "x" * 128, "a-b_c"]
        )
        body = self.execute_body()
        body["tool"]["name"] = name
        return Case(
            f"unknown tool {name[:20]}",
            f"tools.execute.{name}",
            dumps(body),
            "unknown_tool",
            f"Unknown tool: {name}",
        )

    def hostile_tool_mismatch(self) -> Case:
        name = self.rng.choice(["read_file", "", "terminal\u0000", "bash ", "☃", "x" * 129])
        body = self.execute_body()
        body["tool"]["name"] = name
        return Case(
            f"tool mismatch {name[:20]!r}",
            "tools.execute.terminal",
            dumps(body),
            "invalid_request",
            "tool.name",
        )

    def hostile_unknown_field(self) -> Case:
        where = self.rng.choice(["top", "tool", "release", "read"])
        key = self.rng.choice(["timeout", "trajectoryId", "☃", "", "\u0000", "__class__"])
        if where == "top":
            body, subject = self.execute_body(**{key: 1}), "tools.execute.terminal"
        elif where == "tool":
            body, subject = self.execute_body(), "tools.execute.terminal"
            body["tool"][key] = self.junk_value()
        elif where == "release":
            body, subject = {"trajectory_id": self.stranger(), key: True}, "tools.release"
        else:
            body, subject = {**self.artifact_body("read"), key: 1}, "tools.artifacts.read"
        return Case(
            f"unknown field {where} {key!r}",
            subject,
            dumps(body),
            "invalid_request",
            "Extra inputs are not permitted",
        )

    def hostile_huge_string(self) -> Case:
        where, limit = self.rng.choice(
            [("trajectory_id", 512), ("tool.name", 128), ("tool.uniq_id", 256)]
        )
        value = self.text(limit + 1) if self.rng.random() < 0.5 else "é" * 100_000
        body = self.execute_body()
        if where.startswith("tool."):
            body["tool"][where.split(".", 1)[1]] = value
        else:
            body[where] = value
        return Case(
            f"huge {where} ({len(value)} chars)",
            "tools.execute.terminal",
            dumps(body),
            "invalid_request",
            f"at most {limit} characters",
        )

    def hostile_raw_control_characters(self) -> Case:
        # An unescaped control character inside a JSON string is invalid JSON.
        char = self.rng.choice([b"\x00", b"\x01", b"\n", b"\x1f"])
        body = dumps(self.execute_body()).replace(b"fuzz-nobody", b"fuzz" + char, 1)
        return Case(
            f"raw control char {char!r}",
            "tools.execute.terminal",
            body,
            "invalid_json",
            "control character",
        )

    def hostile_artifact_hostile(self) -> Case:
        operation = self.rng.choice(["read", "list", "archive"])
        body = self.artifact_body(operation)
        body["path"] = self.rng.choice(
            ["../../etc/passwd", "/etc/shadow", "a\u0000b", "☃/\U0001f600", ".", "~", "\\"]
        )
        # No slot is held for the trajectory: refused before anything runs.
        return Case(
            f"artifact {operation} of a stranger {body['path']!r}",
            f"tools.artifacts.{operation}",
            dumps(body),
            "no_active_slot",
            "No active slot",
        )

    def hostile_unknown_artifact_operation(self) -> Case:
        operation = self.rng.choice(["delete", "READ", "exec", "☃"])
        return Case(
            f"artifact operation {operation}",
            f"tools.artifacts.{operation}",
            dumps(self.artifact_body("read")),
            "unknown_tool",
            "Unknown artifact operation",
        )

    def hostile_release_hostile(self) -> Case:
        tid = self.rng.choice([self.stranger(), "\u0000", "☃" * 10, "*", ">", "a.b.c"])
        return Case(
            f"release {tid!r}",
            "tools.release",
            dumps({"trajectory_id": tid}),
            "no_active_slot",
            "No active slot",
        )

    def hostile_status_or_list(self) -> Case:
        subject = self.rng.choice(["tools.status", "tools.list"])
        body = self.rng.choice([b"", b"{", b"\xff\xfe", b"[" * 5_000, b"null"])
        headers = self.rng.choice(
            [
                None,
                {"traceparent": "garbage"},
                {"traceparent": "00-" + "0" * 32 + "-x-01"},
                {"Authorization": "Bearer \u2603"},
            ]
        )
        return Case(f"{subject} {body[:10]!r} {headers}", subject, body, None, headers=headers)
