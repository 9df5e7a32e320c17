"""The built-in tools: their arguments, descriptions and aliases.

Argument models ignore unknown fields: policy fields a model might send (``allow_network``,
``require_sandbox``) are dropped here and set by the service instead.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .messages import FunctionSpec, ToolSpec

_ARGS = ConfigDict(extra="ignore")


class TerminalArgs(BaseModel):
    model_config = _ARGS

    command: str = Field(min_length=1, description="Shell command, run with bash -c in /workspace.")
    timeout: float | None = Field(default=None, gt=0, description="Seconds before it is killed.")
    background: bool = Field(default=False, description="Not supported; must be false.")


class StatefulTerminalArgs(BaseModel):
    model_config = _ARGS

    command: str = Field(
        min_length=1,
        description="Shell command for the trajectory's persistent bash: cwd, exported and shell "
        "variables and functions carry over between calls.",
    )
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds before it is killed (and the shell restarted)."
    )


class ReadFileArgs(BaseModel):
    model_config = _ARGS

    path: str = Field(min_length=1, description="File path, relative to /workspace.")


class WriteFileArgs(BaseModel):
    model_config = _ARGS

    path: str = Field(min_length=1, description="File path, relative to /workspace.")
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
