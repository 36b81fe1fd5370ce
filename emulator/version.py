"""The installed package's version (``infemu --version``, the servers' ``/version``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("infemu")
    except PackageNotFoundError:
        return "0+unknown (not installed)"
