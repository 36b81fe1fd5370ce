"""The run directory's fault record, ``faults.json``: what `infemu fault list` shows.

Three kinds of process write it while a cluster runs: `infemu fault inject|clear` (the hand-injected
faults: ``active`` by name, and their ``timeline`` in wall-clock seconds), the detached process that
ends a fault when its duration is up, and `infemu run`'s fault runner (the spec's scheduled faults:
``schedule``, in emulated seconds since the run began, and the injector's ``log``). Each keeps to its
own keys and changes the file only by a read-modify-write under an exclusive lock on a sidecar file,
so none of them loses what another wrote in between.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

from emulator.atomic_file import write_atomically

FAULTS_FILE = "faults.json"


def _path(run_dir: str) -> str:
    return os.path.join(run_dir, FAULTS_FILE)


def read(run_dir: str) -> dict:
    """The record as it stands, with every key present (a missing or unreadable file is empty)."""
    try:
        with open(_path(run_dir), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    for key, empty in (("active", {}), ("timeline", []), ("schedule", []), ("log", [])):
        if not isinstance(data.get(key), type(empty)):
            data[key] = empty
    return data


@contextmanager
def updating(run_dir: str) -> Iterator[dict]:
    """The record to change in place; written back (atomically) when the block ends without an error.
    Hold it only for the change itself, never across calls to instances: other writers wait for it."""
    with open(_path(run_dir) + ".lock", "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = read(run_dir)
            yield data
            write_atomically(_path(run_dir), json.dumps(data, indent=1))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
