"""User-facing errors: one line per problem, naming the field, the value and the fix."""

from __future__ import annotations

import json


class SpecError(Exception):
    """A spec (or CLI input) that cannot be used. ``problems`` are ready-to-print lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class InputError(SpecError):
    """Bad command-line input (a flag value or a file) rather than a bad spec field."""

    def __init__(self, problem: str) -> None:
        super().__init__([problem])


def openai_error_code(body: bytes | str, default: str) -> str:
    """The ``code`` of an OpenAI error body (the router's reason: overloaded, backend_failed,
    deadline_exceeded, ...), else its ``type``, else ``default`` (a body that is not one)."""
    try:
        err = json.loads(body)["error"]
        return str(err.get("code") or err.get("type") or default)
    except (ValueError, KeyError, TypeError):
        return default
