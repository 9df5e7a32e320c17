"""Turning pydantic validation errors into one precise, traceback-free sentence."""

from __future__ import annotations

from pydantic import ValidationError

_MAX_ISSUES = 5


def describe_validation_error(exc: ValidationError) -> str:
    """``field.path: message; ...`` for the first few problems, never the input values."""
    issues = []
    for error in exc.errors(include_url=False, include_input=False)[:_MAX_ISSUES]:
        location = ".".join(str(part) for part in error["loc"]) or "body"
        issues.append(f"{location}: {error['msg']}")
    more = exc.error_count() - len(issues)
    if more > 0:
        issues.append(f"and {more} more")
    return "; ".join(issues)
