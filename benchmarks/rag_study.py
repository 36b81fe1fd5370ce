"""RAG pipelines, a remote KV store and a reasoning stage: what each does to latency (simulated).

1. RAGPulse replay. The first N requests of the RAGPulse trace (``../shared/data/traces/ragpulse``,
   a production RAG service's week: system prompts, retrieved passages, history and question per
   request, by content id) replayed as RAG pipelines on ``examples/rag.yaml``'s cluster (a CPU
   retriever, 2 prefill + 1 decode Llama-3.1-8B on H100): each request retrieves the passages the
   trace names (the retriever's id filter), then generates with the trace's own prompt. Arrivals are
   compressed so N requests arrive at ``--rate`` req/s. The prefill engines are given a small KV
   cache (``--prefill-memory``, a fraction of HBM) so that their own prefix caches evict; the runs
   differ only in the KV tier: none, a store node over the InfiniBand scale-out network (Mooncake
   Store style), or a store in the node's CPU memory over PCIe 5 (LMCache's local backend style).
   Printed: the engines' own prefix-cache hit rate, the store's hit rate (blocks found of those asked
   for after the engine's own prefix), the prompt tokens fetched instead of computed, GB moved, TTFT
   and end-to-end latency (mean / p90), and the prefill engines' busy fraction.

2. A HERMES-style case (Bambhaniya et al., "HERMES: understanding and optimizing multi-stage AI
   inference pipelines", 2025): the synthetic RAG workload of ``examples/rag.yaml`` as rag, as
   reasoning after retrieval (512 and 2048 hidden tokens), and as 4-turn agent sessions (the context
   grows each turn; the P/D router places each turn by load, not by session), with and without the
   KV store. Printed: end-to-end latency, TTFT, the prompt tokens fetched from the store, and where
   the time goes (retrieval, prefill, reasoning, decode, think).

    python benchmarks/rag_study.py                    # both studies (about a minute)
    python benchmarks/rag_study.py --requests 800 --json rag.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emulator.sim.simulator import simulate  # noqa: E402
from emulator.spec import parse_cluster  # noqa: E402
from emulator.workload.plan import plan_for  # noqa: E402
from emulator.workload.traces import read_ragpulse  # noqa: E402

TRACE = os.path.join(ROOT, "..", "shared", "data", "traces", "ragpulse", "0_trace.jsonl")
STORES = {
    "none": None,
    "store over IB (scale-out)": {"capacityGb": 256},
    "store in host memory (pcie5)": {"capacityGb": 256, "tier": "pcie5"},
}


def base_doc() -> dict:
    with open(os.path.join(ROOT, "examples", "rag.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def with_store(doc: dict, store: dict | None) -> dict:
    doc = copy.deepcopy(doc)
    pools = [p for p in doc["spec"]["pools"] if p["role"] != "kvstore"]
    if store is not None:
        pools.insert(1, {"name": "store", "role": "kvstore", "replicas": 1, "kvstore": store})
    doc["spec"]["pools"] = pools
    return doc


def replay_doc(requests: int, rate: float, prefill_memory: float) -> dict:
    records = read_ragpulse(TRACE)[:requests]
    span = records[-1].timestamp_s - records[0].timestamp_s
    doc = base_doc()
    for p in doc["spec"]["pools"]:
        if p["role"] == "prefill":
            p["gpuMemoryUtilization"] = prefill_memory
        if p["role"] in ("prefill", "decode"):
            p["maxModelLen"] = 32768  # the trace's prompts stay far below
        if p["role"] == "rag":  # the trace's passage ids are corpus ids
            p["rag"]["corpus"]["documents"] = 10_000
    doc["spec"]["workload"] = {
        "pipeline": {"type": "rag"},
        "arrival": {"type": "trace", "path": TRACE, "format": "ragpulse", "timeScale": (requests / rate) / span},
        "requests": requests,
        "seed": 11,
    }
    doc["spec"]["slo"] = {"ttftMs": 1000, "tpotMs": 50, "e2eMs": 15000}
    return doc


def _stats(values) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(np.percentile(arr, 90))


def measure(doc: dict) -> dict:
    cluster = parse_cluster(doc)
    t0 = time.perf_counter()
    res = simulate(cluster, plan_for(cluster, ROOT))
    done = [r for r in res.records if r.ok]
    front = [v for v in res.instances.values() if v["role"] == "prefill"]
    prompt = sum(v["prompt_tokens"] for v in front) or 1
    store = next((v for v in res.instances.values() if v["role"] == "kvstore"), None)
    parts = sorted({k for r in done for k in (r.breakdown_ms or {})})
    return {
        "completed": len(done),
        "failed": len(res.records) - len(done),
        "local_prefix_hit_rate": sum(v["prefix_hit_rate"] * v["prompt_tokens"] for v in front) / prompt,
        "store_hit_rate": store["hit_rate"] if store else None,
        "fetched_token_share": sum(r.kv_fetched_tokens for r in done) / max(sum(r.prompt_tokens for r in done), 1),
        "gb_fetched": store["bytes_fetched"] / 1e9 if store else 0.0,
        "gb_written": store["bytes_written"] / 1e9 if store else 0.0,
        "ttft_ms": _stats([r.ttft_ms for r in done]),
        "e2e_ms": _stats([r.e2e_ms for r in done]),
        "prefill_busy": float(np.mean([v["busy_fraction"] for v in front])),
        "slo_attainment": res.summary["slo_attainment"],
        "breakdown_ms": {k: float(np.mean([(r.breakdown_ms or {}).get(k, 0.0) for r in done])) for k in parts},
        "wall_s": time.perf_counter() - t0,
    }


def replay_study(requests: int, rate: float, prefill_memory: float) -> dict:
    doc = replay_doc(requests, rate, prefill_memory)
    return {name: measure(with_store(doc, store)) for name, store in STORES.items()}


def hermes_study(requests: int) -> dict:
    out = {}
    base = base_doc()
    base["spec"]["workload"]["requests"] = requests
    variants = {
        "rag": {"type": "rag", "topK": 4, "systemTokens": 512},
        "rag + reasoning 512": {"type": "reasoning", "retrieve": True, "reasoningTokens": 512, "systemTokens": 512},
        "rag + reasoning 2048": {"type": "reasoning", "retrieve": True, "reasoningTokens": 2048, "systemTokens": 512},
        # multi-turn agent sessions: each turn's prompt extends the last; P/D routing picks a prefill instance by
        # load, so a turn often lands on the instance that did not compute the previous one
        "agentic, 4 turns": {"type": "agentic", "turns": 4, "toolTokens": 512, "thinkTimeMs": 500, "systemTokens": 512},
    }
    for name, pipeline in variants.items():
        for store_name in ("none", "store over IB (scale-out)"):
            doc = with_store(base, STORES[store_name])
            doc["spec"]["workload"]["pipeline"] = pipeline
            doc["spec"]["slo"]["e2eMs"] = 15000
            out[f"{name} | {store_name}"] = measure(doc)
    return out


def _print_replay(rows: dict, requests: int, rate: float, memory: float) -> None:
    print(
        f"\nRAGPulse replay: first {requests} requests at {rate:g} req/s as RAG pipelines on examples/rag.yaml "
        f"(prefill KV cache: gpuMemoryUtilization {memory:g})"
    )
    head = (
        f"{'KV tier':30s} {'own hits':>8s} {'store hits':>10s} {'fetched':>8s} {'GB in':>6s} {'GB out':>7s} "
        f"{'TTFT mean/p90 ms':>17s} {'E2E mean/p90 ms':>17s} {'prefill busy':>12s}"
    )
    print(head)
    for name, m in rows.items():
        store = "-" if m["store_hit_rate"] is None else f"{100 * m['store_hit_rate']:.1f}%"
        print(
            f"{name:30s} {100 * m['local_prefix_hit_rate']:7.1f}% {store:>10s} {100 * m['fetched_token_share']:7.1f}% "
            f"{m['gb_fetched']:6.1f} {m['gb_written']:7.1f} {m['ttft_ms'][0]:8.0f}/{m['ttft_ms'][1]:<8.0f} "
            f"{m['e2e_ms'][0]:8.0f}/{m['e2e_ms'][1]:<8.0f} {100 * m['prefill_busy']:11.0f}%"
        )


def _print_hermes(rows: dict) -> None:
    print("\nHERMES-style: a reasoning stage and remote KV retrieval, synthetic RAG workload of examples/rag.yaml")
    print(f"{'pipeline | KV tier':50s} {'E2E ms':>8s} {'TTFT ms':>8s} {'fetched':>8s}  where the time goes (mean ms)")
    for name, m in rows.items():
        parts = ", ".join(f"{k} {v:.0f}" for k, v in m["breakdown_ms"].items() if v >= 0.5)
        fetched = f"{100 * m['fetched_token_share']:.0f}%"
        print(f"{name:50s} {m['e2e_ms'][0]:8.0f} {m['ttft_ms'][0]:8.0f} {fetched:>8s}  {parts}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="RAGPulse requests replayed (default 400)")
    ap.add_argument("--rate", type=float, default=4.0, help="replay arrival rate, req/s (default 4)")
    ap.add_argument("--prefill-memory", type=float, default=0.4, help="prefill gpuMemoryUtilization (default 0.4)")
    ap.add_argument("--hermes-requests", type=int, default=120, help="requests per HERMES-style case (default 120)")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)
    replay = replay_study(args.requests, args.rate, args.prefill_memory)
    _print_replay(replay, args.requests, args.rate, args.prefill_memory)
    hermes = hermes_study(args.hermes_requests)
    _print_hermes(hermes)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"replay": replay, "hermes": hermes}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
