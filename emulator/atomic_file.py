"""Files that other processes read while they change: written whole under a temporary name, then renamed.

A reader (a fault runner, ``infemu status``, a supervisor polling for a worker's port) sees the old
content or the new, never a half-written file; ``rename`` is atomic within one file system.
"""

from __future__ import annotations

import os


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    """``mode``: the file's permissions from its creation on (0o600 for one that holds a secret)."""
    tmp = f"{path}.{os.getpid()}.tmp"  # one name per process: two writers never share a temporary file
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
