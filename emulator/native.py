"""The engine core compiled to C with mypyc, used when it is built and matches its sources.

Why: a simulation spends much of its time in the engine's per-sequence bookkeeping (the scheduler,
the KV cache manager, the block pool, the request), plain Python that mypyc compiles from the same
annotated source (benchmarks/sim_speed.py, issue 17: the Azure conversation trace on one A100
replays about 1.5x faster compiled, 64 one-GPU instances about 1.3x). The ``.py`` files stay the
reference and the only code anyone edits: ``tools/build_native.py`` (``make native``; ``make test``
runs it) records each source's SHA-256 beside the build, and a build whose sources changed since is
not loaded (with a warning naming the file), so an edit is never shadowed by stale machine code.
Without a C compiler, or with ``INFEMU_PURE_PYTHON=1``, everything runs as plain Python; the tests
compare both to the bit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

# What is compiled: the per-sequence work of every engine step. The rest (the simulator's event
# loop, the cost model's numpy pricing, the services) gained nothing measurable compiled.
COMPILED_MODULES = (
    "emulator.engine.request",
    "emulator.engine.block_pool",
    "emulator.engine.kv_cache",
    "emulator.engine.scheduler",
)
NATIVE_DIR = Path(__file__).resolve().parent / "_native"
MANIFEST_NAME = "manifest.json"
DISABLE_ENV = "INFEMU_PURE_PYTHON"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def source_path(module: str) -> Path:
    return _PACKAGE_ROOT.joinpath(*module.split(".")).with_suffix(".py")


def source_digest(module: str) -> str:
    return hashlib.sha256(source_path(module).read_bytes()).hexdigest()


def manifest() -> dict:
    """What a build records: the Python it was built for and each compiled module's source hash."""
    return {
        "cache_tag": sys.implementation.cache_tag,
        "modules": {m: source_digest(m) for m in COMPILED_MODULES},
    }


def child_env(*, pure: bool) -> dict[str, str]:
    """This process's environment for a child that runs the pure-Python core (``pure``) or the
    compiled one where it is built: the benchmarks, the build's load probe and the tests start both."""
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    if pure:
        env[DISABLE_ENV] = "1"
    return env


def check(native_dir: Path = NATIVE_DIR) -> str | None:
    """None when the build in ``native_dir`` is to be loaded, else why not (for a status line)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"{DISABLE_ENV} is set"
    return build_problem(native_dir)


def build_problem(native_dir: Path = NATIVE_DIR) -> str | None:
    """None when the build in ``native_dir`` exists and matches this Python and the sources, whatever
    the environment asks, else what is wrong with it."""
    path = native_dir / MANIFEST_NAME
    if not path.is_file():
        return "not built (make native: needs a C compiler and Python's headers)"
    try:
        built = json.loads(path.read_text())
        tag, modules = built["cache_tag"], built["modules"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({e}): rebuild it with make native"
    if tag != sys.implementation.cache_tag:
        return f"built for {tag}, this is {sys.implementation.cache_tag}: rebuild it with make native"
    if sorted(modules) != sorted(COMPILED_MODULES):
        return "built from another module list: rebuild it with make native"
    stale = [str(source_path(m).relative_to(_PACKAGE_ROOT)) for m in COMPILED_MODULES if modules[m] != source_digest(m)]
    if stale:
        return f"{', '.join(stale)} changed since the build: rebuild it with make native"
    return None


@functools.cache
def _reason() -> str | None:
    why = check()
    if why is not None and "changed since the build" in why:
        warnings.warn(f"infemu runs its engine core as pure Python: {why}", RuntimeWarning, stacklevel=3)
    return why


def attach(package: str, path: list[str]) -> None:
    """Put the package's compiled modules ahead of its sources (a package ``__init__`` calls this
    with its ``__name__`` and ``__path__``) when the build is current; otherwise change nothing."""
    if _reason() is not None:
        return
    root = str(NATIVE_DIR)
    if root not in sys.path:
        sys.path.append(root)  # mypyc's shared library of the whole group is a top-level module there
    path.insert(0, str(NATIVE_DIR.joinpath(*package.split("."))))


def status() -> str:
    """How the engine core runs in this process (imports it to find out)."""
    import emulator.engine.scheduler as scheduler

    if not scheduler.__file__ or scheduler.__file__.endswith(".py"):
        return f"pure Python ({_reason() or 'the build did not load'})"
    return "compiled (mypyc)"
