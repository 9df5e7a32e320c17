"""The built-in tools: their arguments, descriptions and aliases.

Argument models ignore unknown fields: policy fields a model might send (``allow_network``,
``require_sandbox``) are dropped here and set by the service instead.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from .messages import FunctionSpec, JsonFloat, JsonInt, ToolSpec

_ARGS = ConfigDict(extra="ignore")


def _refuse_nul(value: str) -> str:
    # No argv, environment or path (C strings all) can hold a NUL: refused here, saying where,
    # rather than failing somewhere below.
    if "\x00" in value:
        raise PydanticCustomError(
            "string_nul",
            "String should not contain a NUL character (one is at character {index})",
            {"index": value.index("\x00")},
        )
    return value


# Text that becomes a command line or a path.
CommandText = Annotated[str, AfterValidator(_refuse_nul)]


class TerminalArgs(BaseModel):
    model_config = _ARGS

    command: CommandText = Field(
        min_length=1, description="Shell command, run with bash -c in /workspace."
    )
    timeout: JsonFloat | None = Field(
        default=None, gt=0, description="Seconds before it is killed."
    )
    background: bool = Field(default=False, description="Not supported; must be false.")


class StatefulTerminalArgs(BaseModel):
    model_config = _ARGS

    command: CommandText = Field(
        min_length=1,
        description="Shell command for the trajectory's persistent bash: cwd, exported and shell "
        "variables and functions carry over between calls.",
    )
    timeout: JsonFloat | None = Field(
        default=None, gt=0, description="Seconds before it is killed (and the shell restarted)."
    )


class TmuxArgs(BaseModel):
    model_config = _ARGS

    action: Literal["start", "send_keys", "capture", "stream", "stop"] = Field(
        description="start a session; send_keys; capture the screen; stream new output; stop."
    )
    keys: str | list[str] | None = Field(
        default=None,
        description="send_keys: text (typed literally) or a list of text and tmux key names "
        "such as 'Enter', 'C-c', 'Up', 'Tab'.",
    )
    block: bool = Field(default=False, description="send_keys: wait for the screen to settle.")
    min_wait_s: JsonFloat = Field(
        default=0.5, ge=0, le=60, description="send_keys+block: wait at least."
    )
    max_wait_s: JsonFloat = Field(
        default=10.0, ge=0, le=600, description="send_keys+block: at most."
    )
    capture_entire: bool = Field(default=False, description="capture: the whole history.")
    max_bytes: JsonInt = Field(default=50_000, ge=1, le=1_000_000, description="stream: at most.")
    reset: bool = Field(default=False, description="stream: forget what was streamed so far.")
    width: JsonInt = Field(default=200, ge=20, le=1000, description="start: columns.")
    height: JsonInt = Field(default=50, ge=5, le=500, description="start: rows.")

    @field_validator("keys")
    @classmethod
    def _keys_without_nul(cls, keys: str | list[str] | None) -> str | list[str] | None:
        for text in [keys] if isinstance(keys, str) else keys or []:
            _refuse_nul(text)
        return keys


class ReadFileArgs(BaseModel):
    model_config = _ARGS

    path: CommandText = Field(min_length=1, description="File path, relative to /workspace.")


class WriteFileArgs(BaseModel):
    model_config = _ARGS

    path: CommandText = Field(min_length=1, description="File path, relative to /workspace.")
    content: str = Field(description="Full new content of the file.")


class BuiltinTool:
    __slots__ = ("args_model", "description", "name")

    def __init__(self, name: str, description: str, args_model: type[BaseModel]) -> None:
        self.name = name
        self.description = description
        self.args_model = args_model

    def spec(self) -> ToolSpec:
        return ToolSpec(
            function=FunctionSpec(
                name=self.name,
                description=self.description,
                parameters=self.args_model.model_json_schema(),
            )
        )


BUILTIN_TOOLS: dict[str, BuiltinTool] = {
    tool.name: tool
    for tool in (
        BuiltinTool(
            "terminal",
            "Run a shell command in the trajectory's sandbox workspace and return its output.",
            TerminalArgs,
        ),
        BuiltinTool(
            "terminal_stateful",
            "Run a command in the trajectory's persistent shell (state carries over).",
            StatefulTerminalArgs,
        ),
        BuiltinTool(
            "tmux",
            "Drive an interactive terminal (a tmux session in the sandbox): start, send_keys, "
            "capture, stream, stop.",
            TmuxArgs,
        ),
        BuiltinTool("read_file", "Read a text file from the workspace.", ReadFileArgs),
        BuiltinTool(
            "write_file",
            "Create or overwrite a file in the workspace (parent directories are created).",
            WriteFileArgs,
        ),
    )
}

TOOL_ALIASES: dict[str, str] = {"bash": "terminal"}


def canonical_tool_name(name: str) -> str | None:
    """The built-in tool a name refers to, or None when there is none."""
    name = TOOL_ALIASES.get(name, name)
    return name if name in BUILTIN_TOOLS else None
