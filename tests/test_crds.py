"""The CRD is generated from the spec model: no drift, structural, valid for Kubernetes, and every
example is a valid custom resource under it. (API-server acceptance runs with a real cluster.)"""

from __future__ import annotations

import glob
import os

import jsonschema
import pytest
import yaml
from conftest import EXAMPLES, ROOT, crd_json_schemas

from emulator.loadtest import parse_loadtest
from infemu_operator.crds import all_crds

CRD_DIR = os.path.join(ROOT, "charts", "infemu", "crds")


def test_committed_crds_match_the_generator():
    assert sorted(os.listdir(CRD_DIR)) == sorted(all_crds()), "run `infemu crds`"
    for name, crd in all_crds().items():
        with open(os.path.join(CRD_DIR, name), encoding="utf-8") as fh:
            assert yaml.safe_load(fh) == crd, f"{name} drifted from the models: run `infemu crds`"


def _walk(node, path="spec"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.get("properties", {}).items():
            yield from _walk(value, f"{path}.{key}")
        if "items" in node:
            yield from _walk(node["items"], f"{path}[]")


@pytest.mark.parametrize("crd", list(all_crds()))
def test_schema_is_structural(crd):
    schema = all_crds()[crd]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "oneOf" not in node and "anyOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path


@pytest.mark.parametrize("crd", list(all_crds()))
def test_crd_manifest_validates_against_kubernetes_1_30_in_strict_mode(crd):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(all_crds()[crd], "1.30", strict=True)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))))
def test_every_example_is_a_valid_custom_resource(path):
    schemas = crd_json_schemas()
    with open(path, encoding="utf-8") as fh:
        for doc in yaml.safe_load_all(fh):
            jsonschema.validate(doc, schemas[doc["kind"]])
            if doc["kind"] == "LoadTest":
                parse_loadtest(doc, path)  # and the model's own rules


def test_the_schema_rejects_what_the_api_server_would():
    schema = crd_json_schemas()["InferenceCluster"]
    bad = {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "InferenceCluster",
        "metadata": {"name": "x"},
        "spec": {"model": {"name": "m"}, "pools": [{"name": "a", "tp": 0}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
