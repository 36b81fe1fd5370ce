"""The image installs the wheel: every module and data file must be in it, and the
Containerfile must copy every source folder the wheel is built from."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), ROOT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("infemu-*.whl"))).namelist())
    expected = [
        os.path.relpath(p, ROOT)
        for pattern in ("emulator/**/*.py", "loadgen/**/*.py", "emulator/**/*.npz", "emulator/**/*.json")
        for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
        if not os.path.relpath(p, ROOT).startswith("emulator/_native/")  # this machine's compiled core (make native)
    ]
    assert not [n for n in names if n.startswith("emulator/_native/")]  # never shipped: built for one Python
    expected += [f"infemu_operator/{os.path.basename(p)}" for p in glob.glob(f"{ROOT}/operator/infemu_operator/*.py")]
    assert [p for p in expected if p not in names] == []
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "infemu = emulator.cli:main" in zipfile.ZipFile(next(tmp_path.glob("*.whl"))).read(entry_points).decode()


def test_the_containerfile_copies_the_packaged_folders():
    with open(os.path.join(ROOT, "Containerfile"), encoding="utf-8") as fh:
        text = fh.read()
    copied = {m.group(1) for m in re.finditer(r"^COPY (?!--from)(\S+)", text, re.MULTILINE)}
    assert {"emulator", "loadgen", "operator", "pyproject.toml"} <= copied
    assert all(os.path.exists(os.path.join(ROOT, c)) for c in copied)
    assert "USER 10001" in text and not re.search(r"^ENTRYPOINT", text, re.MULTILINE)  # pods set args only
