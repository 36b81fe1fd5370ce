"""Shared fixtures: paths to the examples and to the reference data beside the checkout."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))


def example(name: str) -> str:
    return os.path.join(EXAMPLES, name)


@pytest.fixture
def shared_data() -> str:
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"reference data not found at {SHARED_DATA} (CI clones with shared/ beside the checkout)")
    return SHARED_DATA
