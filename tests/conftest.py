"""Shared fixtures: paths to the examples and to the reference data beside the checkout."""

from __future__ import annotations

import copy
import glob
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import settings

# Property tests are derandomized (the same examples every run: CI must pass every time, not most
# times); HYPOTHESIS_PROFILE=explore searches afresh on a developer's machine.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))


@pytest.fixture(autouse=True, scope="session")
def _own_run_registry(tmp_path_factory):
    """The suite's clusters register in a registry of their own (XDG_STATE_HOME, inherited by every
    `infemu` it starts): `infemu down` in a test never stops a cluster the user is running."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield


def example(name: str) -> str:
    return os.path.join(EXAMPLES, name)


def example_files(kind: str = "InferenceCluster") -> list[str]:
    """The example files holding at least one resource of ``kind`` (InferenceCluster, LoadTest)."""
    out = []
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))):
        with open(path, encoding="utf-8") as fh:
            if any(d and d.get("kind") == kind for d in yaml.safe_load_all(fh)):
                out.append(path)
    return out


@pytest.fixture
def shared_data() -> str:
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"reference data not found at {SHARED_DATA} (CI clones with shared/ beside the checkout)")
    return SHARED_DATA


def run_infemu(*args: str, cwd: str = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """The ``infemu`` command as a user runs it, from this checkout, in a given folder."""
    return subprocess.run(
        [sys.executable, "-m", "emulator.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


def metric_value(url: str, sample: str, **labels: str) -> float:
    """The value of one sample in an instance's /metrics (summed over the label sets that carry
    ``labels``, e.g. ``le="0.002"``); it must exist."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    values = [
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert values, f"{url}/metrics has no {sample}"
    return sum(values)


def metric_samples(text: str) -> dict:
    """An exposition's samples by (name, finished_reason label)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(text)
    return {(s.name, s.labels.get("finished_reason")): s.value for f in families for s in f.samples}


async def until_aborted(worker) -> dict:
    """Poll a worker's /metrics (an aiohttp TestClient) until it has counted one aborted request, which it
    does at the first write after its client left; its samples then."""
    import asyncio

    for _ in range(500):
        await asyncio.sleep(0.01)
        now = metric_samples(await (await worker.get("/metrics")).text())
        if now[("vllm:request_success_total", "abort")] == 1.0:
            return now
    raise AssertionError("the request was never counted as aborted")


def skip_if_workers_overloaded(urls: list[str]) -> None:
    """A timing gate's escape on a busy host: when any worker measured its own engine steps waking too
    late to be faithful (``infemu_emulation_overloaded``), the host, not the code, is what failed; skip
    with that reason. A quiet CI machine never trips it at the dilations the gates use."""
    busy = [u for u in urls if metric_value(u, "infemu_emulation_overloaded") > 0]
    if busy:
        ratios = [f"{metric_value(u, 'infemu_iteration_timing_error_ratio'):.0%}" for u in busy]
        pytest.skip(f"host overloaded: {len(busy)} worker(s) measured step timing error p99 at {', '.join(ratios)}"
                    " of their median step (budget 5%); timing gates are meaningless here")  # fmt: skip


def skip_if_host_lags(limit_s: float = 0.005, seconds: float = 0.5) -> None:
    """Skip a client-timing gate when this process's own event loop wakes more than ``limit_s`` late
    (p99 over ``seconds`` of 1 ms sleeps): other work is taking the cores."""
    import asyncio
    import time

    async def sample() -> list[float]:
        late = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append(time.perf_counter() - t - 0.001)
        return sorted(late)

    late = asyncio.run(sample())
    p99 = late[int(0.99 * (len(late) - 1))]
    if p99 > limit_s:
        pytest.skip(f"host busy: asyncio wakes {p99 * 1e3:.1f} ms late at p99 (limit {limit_s * 1e3:.0f} ms)")


def restricted_violations(pod: dict) -> list[str]:
    """The Pod Security Standard "restricted" checks (kubernetes.io/docs/concepts/security/
    pod-security-standards) that a pod spec can fail."""
    out = []
    pod_sc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(key)
    out += [f"volume {v['name']}: hostPath" for v in pod.get("volumes", []) if "hostPath" in v]
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds {sc['capabilities']['add']}")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")) or sc.get("runAsUser") == 0:
            out.append(f"{name}: must run as non-root")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault")
    return out


def _as_json_schema(node):
    """OpenAPI 3.0 -> JSON Schema for checking examples: nullable, boolean exclusive bounds."""
    node = copy.deepcopy(node)
    if isinstance(node, dict):
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        for bound, key in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if node.get(key) is True:
                node[key] = node.pop(bound)
        for k in [k for k in node if k.startswith("x-kubernetes")]:
            node.pop(k)
        return {k: _as_json_schema(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_as_json_schema(v) for v in node]
    return node


def crd_json_schemas() -> dict:
    """Kind -> the CRD's openAPIV3Schema as JSON Schema (what the API server checks on apply)."""
    from infemu_operator.crds import all_crds

    return {
        c["spec"]["names"]["kind"]: _as_json_schema(c["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        for c in all_crds().values()
    }
