"""Compile the engine core with mypyc into emulator/_native/ (emulator/native.py loads it).

    python tools/build_native.py          # make native

Builds in a scratch copy of the package (mypyc type-checks the modules it compiles against the rest),
puts the build in place of the old one, then checks in a fresh interpreter that it loads and reports
itself compiled. Any failure leaves no build behind, so the engine runs as pure Python, and exits
non-zero with the reason. Needs mypy (the dev extra), a C compiler and Python's headers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emulator import native  # noqa: E402


def compile_modules(scratch: Path) -> Path:
    """mypyc + setuptools in ``scratch``; returns the directory holding the built extensions."""
    shutil.copytree(
        ROOT / "emulator",
        scratch / "emulator",
        ignore=shutil.ignore_patterns("_native", "__pycache__", "*.so", "data"),
    )
    paths = [str(native.source_path(m).relative_to(ROOT)) for m in native.COMPILED_MODULES]
    lib, temp = scratch / "lib", scratch / "obj"
    script = (
        "from setuptools import setup\n"
        "from mypyc.build import mypycify\n"
        f"setup(name='infemu-native', ext_modules=mypycify({paths!r}, opt_level='3'),\n"
        f"      script_args=['build_ext', '--build-lib', {str(lib)!r}, '--build-temp', {str(temp)!r}])\n"
    )
    # in the scratch directory: no pyproject.toml there for setuptools to read, and mypy's cache stays there
    run = subprocess.run([sys.executable, "-c", script], cwd=scratch, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"mypyc failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
    return lib


def loads_compiled(candidate: Path) -> str:
    """What a fresh interpreter reports with ``candidate`` in place (the caller moved it there)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import emulator.native as n; print(n.status())"],
        cwd=ROOT,
        env=native.child_env(pure=False),
        capture_output=True,
        text=True,
    )
    return (probe.stdout + probe.stderr).strip()


def main() -> int:
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        print("build_native: mypyc is missing (pip install -e '.[dev]' installs mypy)", file=sys.stderr)
        return 1
    record = native.manifest()  # the sources as they are now: the build is of these
    target = native.NATIVE_DIR
    with tempfile.TemporaryDirectory(prefix="infemu-native-") as tmp:
        try:
            lib = compile_modules(Path(tmp))
        except RuntimeError as e:
            print(f"build_native: {e}", file=sys.stderr)
            return 1
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(lib, target)
    (target / native.MANIFEST_NAME).write_text(json.dumps(record, indent=1) + "\n")
    if native.manifest() != record:  # (before the probe: a stale build would not load either, for this reason)
        shutil.rmtree(target, ignore_errors=True)
        print("build_native: the sources changed during the build, removed it: run it again", file=sys.stderr)
        return 1
    status = loads_compiled(target)
    if status != "compiled (mypyc)":
        shutil.rmtree(target, ignore_errors=True)
        print(f"build_native: the build does not load, removed it: {status}", file=sys.stderr)
        return 1
    print(f"build_native: {', '.join(native.COMPILED_MODULES)} compiled into {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
