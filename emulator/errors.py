"""User-facing errors: one line per problem, naming the field, the value and the fix."""

from __future__ import annotations


class SpecError(Exception):
    """A spec (or CLI input) that cannot be used. ``problems`` are ready-to-print lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class InputError(SpecError):
    """Bad command-line input (a flag value or a file) rather than a bad spec field."""

    def __init__(self, problem: str) -> None:
        super().__init__([problem])
