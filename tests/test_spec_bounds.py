"""Every size a spec can ask for is bounded: hostile or mistyped input is one line naming the field,
never a traceback, a hang or a NaN report (issue 13's list of inputs that crashed validate/sim)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import example

from emulator.errors import SpecError
from emulator.spec import load_clusters

QUICKSTART = Path(example("quickstart.yaml")).read_text()
BASE = yaml.safe_load(QUICKSTART)


def _spec(tmp_path, mutate) -> str:
    doc = copy.deepcopy(BASE)
    mutate(doc["spec"])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def mutate(spec):
        node = spec
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return mutate


CASES = [
    ("seed", _set("workload", "seed", -1), "spec.workload.seed: -1"),
    ("cv tiny", _set("workload", "arrival", {"type": "gamma", "cv": 1e-300}), "spec.workload.arrival.cv"),
    ("cv inf", _set("workload", "arrival", {"type": "gamma", "cv": float("inf")}), "finite number"),
    ("cv huge", _set("workload", "arrival", {"type": "gamma", "cv": 1e300}), "spec.workload.arrival.cv"),
    ("length 2^64", _set("workload", "inputLength", {"type": "fixed", "value": 2**64}), "inputLength.value"),
    ("gpusPerNode", _set("topology", "gpusPerNode", 1_000_000_000), "spec.topology.gpusPerNode"),
    ("replicas", lambda s: s["pools"][0].__setitem__("replicas", 10_000), "spec.pools[0].replicas"),
    ("nodes 1e6", _set("topology", "nodes", 1e6), "spec.topology.nodes"),
    (
        "mmpp idle",
        _set("workload", "arrival", {"type": "mmpp", "burstRate": 10, "burstSeconds": 1, "idleSeconds": 1e300}),
        "spec.workload.arrival.idleSeconds",
    ),
    ("step inf", lambda s: s["pools"][0].__setitem__("stepOverheadUs", float("inf")), "stepOverheadUs: inf"),
    ("step nan", lambda s: s["pools"][0].__setitem__("stepOverheadUs", float("nan")), "stepOverheadUs"),
    (
        "total gpus",
        _set("topology", {"nodes": 4096, "gpusPerNode": 1024}),
        "spec.topology: nodes x gpusPerNode = 4194304 GPUs",
    ),
]


@pytest.mark.parametrize("mutate,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_out_of_range_values_name_the_field(tmp_path, mutate, expected):
    with pytest.raises(SpecError) as exc:
        load_clusters(_spec(tmp_path, mutate))
    assert any(expected in line for line in exc.value.problems), exc.value.problems


def test_hostile_files_are_one_line_errors(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    shallow_but_deep = tmp_path / "deep2.yaml"
    shallow_but_deep.write_text("a:\n" + "".join("  " * i + "- \n" for i in range(1, 90)))
    big = tmp_path / "big.yaml"
    big.write_text(QUICKSTART + "# " + "x" * 5_000_000 + "\n")
    for path, expected in (
        (binary, "not UTF-8"),
        (deep, "nested"),
        (shallow_but_deep, "nested"),
        (big, "a spec may be at most"),
        (tmp_path, "not a regular file"),
    ):
        with pytest.raises(SpecError) as exc:
            load_clusters(str(path))
        (line,) = exc.value.problems
        assert expected in line, line


def test_model_config_with_zero_heads_names_the_key(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "hidden_size": 4096,
                "num_attention_heads": 0,
                "num_hidden_layers": 32,
                "intermediate_size": 14336,
                "vocab_size": 128256,
            }
        )
    )
    with pytest.raises(SpecError) as exc:
        load_clusters(_spec(tmp_path, _set("model", {"name": str(config), "dtype": "bf16"})))
    assert "num_attention_heads is 0" in exc.value.problems[0]


@pytest.mark.parametrize("kind", ["directory", "not utf-8"])
def test_bad_trace_file_is_one_line_from_the_cli(tmp_path, kind):
    if kind == "directory":
        trace = tmp_path / "traces"
        trace.mkdir()
    else:
        trace = tmp_path / "trace.csv"
        trace.write_bytes(b"\xff\xfeTIMESTAMP,ContextTokens\n\x80\x81\n")
    spec = _spec(tmp_path, _set("workload", {"arrival": {"type": "trace", "path": str(trace), "format": "azure"}}))
    proc = subprocess.run(
        [sys.executable, "-m", "emulator.cli", "sim", spec], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert str(trace) in proc.stderr and ("not a regular file" in proc.stderr or "not UTF-8" in proc.stderr)


def test_a_bare_number_is_a_fixed_length(tmp_path):
    (cluster,) = load_clusters(
        _spec(tmp_path, _set("workload", {"requests": 5, "inputLength": 512, "outputLength": 64}))
    )
    assert cluster.spec.workload.input_length.value == 512 and cluster.spec.workload.output_length.value == 64
