"""The compiled engine core (emulator/native.py): loaded only when current, and the same to the bit.

``make test`` builds it first (tools/build_native.py), so the rest of the suite runs the compiled core;
these tests run the pure-Python core beside it. Where no build exists (no C compiler), the whole suite
already runs pure Python and the comparisons skip with that reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emulator import native

ROOT = Path(__file__).resolve().parent.parent


def _write_build(tmp_path: Path, **changes) -> Path:
    record = native.manifest()
    record.update(changes)
    (tmp_path / native.MANIFEST_NAME).write_text(json.dumps(record))
    return tmp_path


def test_a_build_is_loaded_only_while_it_matches_its_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    assert native.check(tmp_path) == "not built (make native: needs a C compiler and Python's headers)"
    assert native.check(_write_build(tmp_path)) is None

    edited = native.manifest()["modules"]
    edited["emulator.engine.scheduler"] = "0" * 64  # the source changed after the build
    why = native.check(_write_build(tmp_path, modules=edited))
    assert why == "emulator/engine/scheduler.py changed since the build: rebuild it with make native"

    why = native.check(_write_build(tmp_path, cache_tag="cpython-399"))
    assert why.startswith("built for cpython-399") and "make native" in why

    fewer = dict(native.manifest()["modules"])
    fewer.pop("emulator.engine.request")
    assert "another module list" in native.check(_write_build(tmp_path, modules=fewer))

    (tmp_path / native.MANIFEST_NAME).write_text("{not json")
    assert "unreadable" in native.check(tmp_path)

    monkeypatch.setenv(native.DISABLE_ENV, "1")
    assert native.check(_write_build(tmp_path)) == f"{native.DISABLE_ENV} is set"


def _python(*args: str, pure: bool) -> str:
    """stdout of this Python run with ``args`` on the pure or the compiled core; it must succeed."""
    out = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=native.child_env(pure=pure),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


# whether a current build exists, even when this run was asked for the pure core (INFEMU_PURE_PYTHON)
needs_build = pytest.mark.skipif(
    native.build_problem() is not None, reason=f"no compiled engine core here: {native.build_problem()}"
)


@needs_build
def test_the_compiled_core_loads_when_built_and_steps_aside_when_asked():
    where = "import emulator.engine.scheduler as s, emulator.native as n; print(s.__file__); print(n.status())"
    compiled = _python("-c", where, pure=False).splitlines()
    assert compiled[0].endswith(".so") and compiled[1] == "compiled (mypyc)"
    pure = _python("-c", where, pure=True).splitlines()
    assert pure[0].endswith("scheduler.py") and pure[1] == f"pure Python ({native.DISABLE_ENV} is set)"


# Every request's timeline, the engines' counters and the run's figures, as JSON (floats written exactly).
_SIMULATE = """
import json
from emulator.overrides import WorkloadOverrides, apply_overrides
from emulator.sim.simulator import simulate
from emulator.spec import load_clusters
from emulator.workload.plan import build_plan

out = {}
for name, requests in [("examples/quickstart.yaml", 400), ("examples/pd-llama70b-h100.yaml", 150),
                       ("examples/chaos.yaml", 300), ("examples/tp-vs-pp.yaml", 150),
                       ("examples/moe-qwen3-30b-afd.yaml", 100), ("examples/moe-dsv32-pd.yaml", 60)]:
    cluster = apply_overrides(load_clusters(name)[0], WorkloadOverrides(requests=requests))
    result = simulate(cluster, build_plan(cluster.spec.workload))
    out[name] = {
        "records": [[r.request_id, r.ok, r.first_token_s, r.finish_s, r.output_tokens, r.cached_tokens,
                     r.preemptions, r.itl_max_ms] for r in result.records],
        "summary": result.summary,
        "instances": result.instances,
        "events": result.events,
    }
print(json.dumps(out, sort_keys=True, default=repr))
"""


@needs_build
@pytest.mark.slow
def test_compiled_and_pure_python_simulations_agree_to_the_bit():
    """Aggregated with prefix caching, P/D, faults, pipeline parallelism, attention-FFN
    disaggregation and a DSA MoE: the same timelines, counters and report from both cores."""
    compiled, pure = _python("-c", _SIMULATE, pure=False), _python("-c", _SIMULATE, pure=True)
    assert json.loads(compiled) == json.loads(pure)


@needs_build
def test_the_engine_unit_tests_pass_on_the_pure_python_core():
    """The suite runs the compiled core; the engine's own tests run on the sources as well."""
    out = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_engine.py", pure=True)
    assert " passed" in out and "failed" not in out
