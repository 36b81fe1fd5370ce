"""Spec loading: every example is valid; bad input gives one line per problem, naming the field."""

from __future__ import annotations

import textwrap

import pytest
from conftest import example, example_files

from emulator.errors import SpecError
from emulator.spec import load_clusters

BASE = """
apiVersion: infemu.io/v1alpha1
kind: InferenceCluster
metadata: {{name: t}}
spec:
  model: {model}
  gpu: {gpu}
  topology: {{nodes: {nodes}, gpusPerNode: 8}}
  pools:
{pools}
  workload: {{requests: 10}}
"""


def write_spec(tmp_path, pools: str, model: str = "llama-3.1-70b", gpu: str = "h100-sxm", nodes: int = 1) -> str:
    p = tmp_path / "spec.yaml"
    p.write_text(BASE.format(model=model, gpu=gpu, nodes=nodes, pools=textwrap.indent(pools.strip(), "    ")))
    return str(p)


def problems(path: str) -> list[str]:
    with pytest.raises(SpecError) as exc:
        load_clusters(path)
    return exc.value.problems


@pytest.mark.parametrize("path", example_files())
def test_every_example_loads(path):
    assert load_clusters(path)


def test_tp_must_divide_heads(tmp_path):
    path = write_spec(tmp_path, "- {name: a, tp: 8}\n- {name: b, tp: 3}")
    assert problems(path) == [f"{path}: spec.pools[1].tp: 3 does not divide the model's 64 attention heads"]


def test_weights_must_fit(tmp_path):
    (line,) = problems(write_spec(tmp_path, "- {name: a, tp: 1}"))
    assert "spec.pools[0]: weights need 141.1 GB per GPU" in line and "raise tp or pp" in line


def test_pools_must_fit_on_the_gpus(tmp_path):
    (line,) = problems(write_spec(tmp_path, "- {name: a, tp: 4, replicas: 3}"))
    assert "spec.pools[0]: replica 2 needs 4 GPUs but only 0 of 8 GPUs are left" in line


def test_tp_stays_in_one_scale_up_domain(tmp_path):
    (line,) = problems(write_spec(tmp_path, "- {name: a, tp: 16}", nodes=2))
    assert "tp*pp*dp = 16 GPUs exceeds the 8-GPU scale-up domain" in line and "allowCrossDomainTp" in line


def test_schema_errors_name_path_value_and_allowed(tmp_path):
    path = write_spec(tmp_path, "- {name: a, tp: 8, role: mixer, maxNumSeqs: -1, bogus: 1}")
    got = problems(path)
    roles = "'aggregated', 'prefill', 'decode', 'attention', 'ffn', 'rag' or 'kvstore'"
    assert f"{path}: spec.pools[0].role: 'mixer': Input should be {roles}" in got
    assert f"{path}: spec.pools[0].maxNumSeqs: -1: Input should be greater than or equal to 1" in got
    assert f"{path}: spec.pools[0].bogus: 'bogus': unknown field (check spelling; keys are camelCase)" in got
    assert len(got) == 3


def test_unknown_model_and_gpu(tmp_path):
    (line,) = problems(write_spec(tmp_path, "- {name: a}", model="gpt-9"))
    assert line.startswith(f"{tmp_path}/spec.yaml: spec.model.name: 'gpt-9': unknown model")
    (line,) = problems(write_spec(tmp_path, "- {name: a}", model="llama-3.1-8b", gpu="tpu-v9"))
    assert "spec.gpu: 'tpu-v9': unknown GPU; known: a100-sxm-80g, b200, b300, gb200, gb300, h100-sxm, h200-sxm" in line


def test_fp8_needs_hopper_or_newer(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(BASE.format(model="{name: llama-3.1-8b, dtype: fp8}", gpu="a100", nodes=1, pools="    - {name: a}"))
    assert any("has no FP8 tensor cores" in line for line in problems(str(p)))


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    (line,) = problems(str(bad))
    assert "invalid YAML" in line and "line" in line
    (line,) = problems(str(tmp_path / "nope.yaml"))
    assert line.endswith("nope.yaml: no such file")


def test_a_file_of_other_kinds_says_what_it_holds_and_where_a_loadtest_runs():
    """`infemu run examples/loadtest-chat.yaml` (a LoadTest, the operator's) names what the file
    holds and how a LoadTest is run, instead of only what it lacks."""
    (line,) = problems(example("loadtest-chat.yaml"))
    assert "no InferenceCluster document found (it holds LoadTest)" in line
    assert "infemu loadtest --target" in line and "kubectl apply" in line


def test_gamma_cv_error_drops_the_union_tag(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(
        BASE.format(model="llama-3.1-8b", gpu="h100", nodes=1, pools="    - {name: a}").replace(
            "workload: {requests: 10}", "workload: {requests: 10, arrival: {type: gamma, cv: -2}}"
        )
    )
    (line,) = problems(str(p))
    assert "spec.workload.arrival.cv: -2: Input should be greater than or equal to 0.01" in line


def test_multi_document_spec_compares_designs():
    names = [c.name for c in load_clusters(example("tp-vs-pp.yaml"))]
    assert names == ["intra-op-tp2", "inter-op-pp2"]


def test_explicit_placement_sets_the_tier_between_instances(tmp_path):
    from emulator.topology import place

    pools = """
- {name: p, role: prefill, tp: 4, placement: [[8, 9, 10, 11]]}
- {name: d, role: decode, tp: 4, placement: [[12, 13, 14, 15]]}
- {name: q, role: prefill, tp: 4, placement: [[0, 1, 2, 3]]}
"""
    cluster = load_clusters(write_spec(tmp_path, pools, nodes=2))[0]
    topo = place(cluster.spec)
    p, d, q = topo.instances
    assert p.node == 1 and topo.tier_between(p, d).name == "nvlink4"
    assert topo.tier_between(q, d).name == "ib-ndr-400"


def test_bad_explicit_placement_names_the_field(tmp_path):
    (line,) = problems(write_spec(tmp_path, "- {name: a, tp: 4, placement: [[6, 7, 8, 9]]}", nodes=2))
    assert "spec.pools[0].placement[0]: GPUs [6, 7, 8, 9] straddle scale-up domains" in line
    (line,) = problems(write_spec(tmp_path, "- {name: a, tp: 4, replicas: 2, placement: [[0, 1, 2, 3], [3, 4, 5, 6]]}"))
    assert "spec.pools[0].placement[1]: GPUs [3] are already used" in line
