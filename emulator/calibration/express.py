"""A calibration row as an infemu spec: same checkpoint, GPU, engine, layout and load.

The served checkpoint follows from the row's model and precision: an FP4 row of a BF16
or FP8 model runs NVIDIA's NVFP4 release when the catalog has its config (attention kept in
BF16, FP8 KV cache, as that release declares); an FP8 row of a BF16 model runs the
model's FP8 release when the catalog has it, else the base architecture with the row's
GEMM / MoE precisions. gpt-oss always runs its native MXFP4 experts.

The load is the benchmark's: ``concurrency`` closed-loop clients, every request exactly
``isl`` / ``osl`` tokens (``ignore_eos``), a warm-up phase drained before the measured one
(AIPerf as aiconfigurator's generated benchmark runs it, README of the data).

A row infemu cannot express comes back as a ``Skip`` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from emulator.calibration.rows import CalibrationRow, Layout
from emulator.catalog.models import get_model, resolve
from emulator.errors import SpecError
from emulator.spec import InferenceCluster, parse_cluster

GPUS = {
    "h100_sxm": "h100-sxm",
    "h200_sxm": "h200-sxm",
    "b200_sxm": "b200",
    "b300_sxm": "b300",
    "gb200": "gb200",
    "gb300": "gb300",
}
NVL72 = {"gb200", "gb300"}


# The two benchmark set-ups aiconfigurator generates (data README): bench_run.sh sends 2C warm-up
# requests and leaves AIPerf's dataset at 100 prompts (repeats can hit the prefix cache); sflow
# sends C warm-up requests and a distinct prompt per request.
TEMPLATES = {"bench_run": (2, 100), "sflow": (1, None)}


@dataclass(frozen=True)
class LoadShape:
    """How the benchmark drove the deployment."""

    concurrency: int
    warmup: int
    rounds: int  # measured requests = rounds x concurrency
    prompt_pool: int | None


@dataclass(frozen=True)
class Expressed:
    row: CalibrationRow
    cluster: InferenceCluster
    load: LoadShape
    assumptions: tuple[str, ...] = ()

    @property
    def decode_tokens(self) -> int:
        """Output tokens the simulation generates (warm-up included): what a row costs to simulate,
        about a second per million on one core."""
        return (self.load.warmup + self.load.rounds * self.load.concurrency) * self.row.osl


# Rows costing more than this many simulated output tokens (a few dozen P/D rows with thousands of
# clients and 8k outputs: minutes each, and half of the whole set's simulation time) are skipped by
# default by the fit and the fidelity benchmark, and counted with the reason.
SIMULATION_BUDGET_TOKENS = 30_000_000


def over_budget(ex: Expressed, budget: float | None = SIMULATION_BUDGET_TOKENS) -> Skip | None:
    if budget and ex.decode_tokens > budget:
        return Skip(
            ex.row,
            f"over the simulation budget ({ex.decode_tokens / 1e6:.0f}M output tokens > {budget / 1e6:.0f}M;"
            " --max-simulated-tokens 0 includes it)",
        )
    return None


@dataclass(frozen=True)
class Skip:
    row: CalibrationRow
    reason: str


def checkpoint_for(row: CalibrationRow) -> tuple[str, dict, list[str]]:
    """(model name, explicit precision fields, assumptions) for the row's served checkpoint."""
    name = row.model_path
    org, _, base = name.partition("/")
    assumptions: list[str] = []
    fields: dict = {}
    if "gpt-oss" in name:
        return name, fields, assumptions  # native MXFP4 experts whatever the row's label
    if org == "nvidia" and base.endswith("-NVFP4") and resolve(name) is None:
        # NVIDIA releases without a shipped config: the base architecture (data README)
        name = {"DeepSeek-R1-NVFP4": "deepseek-ai/DeepSeek-R1", "Qwen3-32B-NVFP4": "Qwen/Qwen3-32B"}.get(base, name)
        org, _, base = name.partition("/")
    if row.gemm_quant == "nvfp4" or row.moe_quant == "nvfp4":
        release = f"nvidia/{base.removesuffix('-Instruct')}-NVFP4"
        if resolve(release) is not None:
            return release, fields, assumptions
        if base.startswith(("DeepSeek-R1", "DeepSeek-V3")):
            # NVIDIA's DeepSeek NVFP4 releases share one layout (attention BF16, FP8 KV cache); the
            # catalog has the V3.1 one, whose architecture is V3's = R1's.
            assumptions.append(f"no config for {release}: nvidia/DeepSeek-V3.1-NVFP4's (same architecture)")
            return "nvidia/DeepSeek-V3.1-NVFP4", fields, assumptions
        assumptions.append(f"no config for {release}: base architecture with NVFP4 weights, KV cache as the base")
        fields.update(dtype="nvfp4", moeDtype="nvfp4")
        return name, fields, assumptions
    checkpoint = get_model(name).quant
    if row.gemm_quant in ("fp8", "fp8_block") and checkpoint.gemm == "bf16" and checkpoint.moe == "bf16":
        release = f"{org}/{base}-FP8"
        if resolve(release) is not None:
            return release, fields, assumptions
        assumptions.append(f"no config for {release}: base architecture with the row's FP8 precisions")
        fields.update(dtype=row.gemm_quant)
        if row.moe_quant in ("fp8", "fp8_block"):
            fields.update(moeDtype=row.moe_quant)
    return name, fields, assumptions


def deployment(backend: str, role: str, batch: int | None, isl: int, concurrency: int | None = None) -> dict:
    """Engine limits as aiconfigurator's generator sets them for a benchmark deployment
    (src/aiconfigurator/generator/rule_plugin/{vllm,sglang,trtllm}.rule @095f58a): the batch limit
    is 512, or twice the planned batch above that (TensorRT-LLM: the planned batch); the token
    budget holds the batch plus one whole prompt (+1500 vLLM, +500 TensorRT-LLM rounded to its
    32-token blocks); SGLang keeps its own chunked-prefill size but mixes chunks into decode steps.

    An aggregated TensorRT-LLM row whose batch field is below its concurrency (66 simulated rows,
    mostly the older Qwen3-32B dumps) is taken to have run with the concurrency as its limit:
    with the batch as the limit the closed-loop clients queue behind it and the simulated TTFT
    came out a median 229% high on those rows (2026-11-26 benchmark), where the measured TTFTs
    stay near one prefill."""
    b = batch or 0
    seqs = (b or 128) if backend == "trtllm" else (512 if b < 512 else 2 * b)
    if backend == "trtllm" and role == "aggregated" and concurrency:
        seqs = max(seqs, concurrency)
    if role == "prefill":
        seqs = max(1, b or 1)
    out: dict = {"maxNumSeqs": seqs}
    if backend == "vllm":
        out["maxNumBatchedTokens"] = {"prefill": isl + 1500, "decode": seqs}.get(role, seqs + isl + 1500)
    elif backend == "trtllm":
        tokens = {"prefill": isl + 500, "decode": seqs}.get(role, seqs + isl + 500)
        out["maxNumBatchedTokens"] = -(-tokens // 32) * 32
        out["blockSize"] = 32
    return out


def _pool(name: str, role: str, lay: Layout, replicas: int, max_len: int, dense: bool, limits: dict) -> dict:
    pool = {
        "name": name,
        "role": role,
        "replicas": replicas * (lay.dp if dense else 1),
        "tp": lay.tp,
        "pp": lay.pp,
        "maxModelLen": max_len,
        **limits,
    }
    if not dense:
        pool["dp"] = lay.dp
        pool["ep"] = lay.moe_ep
    return pool


def _topology(system: str, gpus: int, widest: int) -> dict:
    if system in NVL72:  # GB200/GB300 NVL72: 4 GPUs per compute tray, one 72-GPU NVLink domain
        nodes = max(1, math.ceil(gpus / 4))
        return {"nodes": nodes, "gpusPerNode": 4, "scaleUp": {"size": 72}, "allowCrossDomainTp": widest > 72}
    nodes = max(1, math.ceil(gpus / 8))
    return {"nodes": nodes, "gpusPerNode": 8, "scaleUp": {"size": 8}, "allowCrossDomainTp": widest > 8}


# aiconfigurator infers an FP8 KV cache for every FP8, block-FP8 or NVFP4 checkpoint, whatever the
# checkpoint's own KV setting (aiconfigurator_core sdk/models/helpers.py _infer_quant_modes_from_raw_config,
# 0.12.0), and its generator passes that mode to the deployment as --kv-cache-dtype (generator/
# module_bridge.py: kv_cache_dtype = kvcache_quant_mode): the generator's rows ran FP8 KV caches there.
GENERATOR_FP8_KV_QUANTS = {"fp8", "fp8_block", "nvfp4"}

# Measured rounds the simulation runs when the caller does not fix them: the benchmark's 20 while
# a row's rounds cost at most this many output tokens, fewer (down to 3) above. Closed-loop clients
# with identical requests settle slowly: arrivals come in bursts that spread a little each round
# (Llama-3.1-70B FP8 on one B200, c16, 1024/1024: mean TTFT 363 ms in round 1, 229 ms from round 7
# on), so a run of 3 rounds that lets its middle round stand for 18 over-states TTFT at low
# concurrency; large rows (thousands of clients) are near their steady state by round 2.
AUTO_ROUNDS_TOKENS = 2_000_000
BENCHMARK_ROUNDS = 20  # aiconfigurator's benchmark sends 20 x C measured requests (bench_run.sh, sflow)
MIN_ROUNDS = 3  # first, one middle, last: predict._round_weighted needs all three


def auto_rounds(row: CalibrationRow, budget_tokens: int = AUTO_ROUNDS_TOKENS) -> int:
    per_round = max(1, (row.concurrency or 1) * row.osl)
    return int(max(MIN_ROUNDS, min(BENCHMARK_ROUNDS, budget_tokens // per_round)))


def express(
    row: CalibrationRow, rounds: int | None = None, template: str = "sflow", client_overhead_ms: float | None = None
) -> Expressed | Skip:
    """``rounds``: measured rounds to simulate; None picks them by the row's size (auto_rounds)."""
    if row.conflict:
        return Skip(row, row.conflict)
    if row.system not in GPUS:
        return Skip(row, f"GPU system {row.system!r} is not in the catalog")
    if row.concurrency is None:
        return Skip(row, "the row records no concurrency")
    try:
        model_name, precision, assumptions = checkpoint_for(row)
        model = get_model(model_name)
    except (KeyError, ValueError) as exc:
        return Skip(row, f"model: {exc}")
    if row.harness == "generator":
        served = {precision.get("dtype") or model.quant.gemm, precision.get("moeDtype") or model.quant.moe}
        if served & GENERATOR_FP8_KV_QUANTS and model.quant.kv_cache != "fp8":
            precision["kvCacheDtype"] = "fp8"
            assumptions.append(
                "FP8 KV cache: aiconfigurator's generator deploys FP8/NVFP4 checkpoints with --kv-cache-dtype fp8"
            )
    dense = not model.is_moe
    if rounds is None:
        rounds = auto_rounds(row)
    warmup_rounds, prompt_pool = TEMPLATES[template]
    max_len = row.isl + row.osl + 1500  # max_seq_len in the generator's rules
    if row.mode == "agg":
        lay = row.agg
        assert lay is not None
        if not dense and lay.moe_tp * lay.moe_ep != lay.tp * lay.dp:
            return Skip(row, f"moe_tp x moe_ep = {lay.moe_tp * lay.moe_ep} != tp x attention_dp {lay.tp * lay.dp}")
        limits = deployment(row.backend, "aggregated", lay.batch, row.isl, row.concurrency)
        pools = [_pool("agg", "aggregated", lay, 1, max_len, dense, limits)]
        gpus = lay.tp * lay.pp * lay.dp
        widest = lay.tp * lay.pp * (1 if dense else lay.dp)
    else:
        pre, dec = row.prefill, row.decode
        if pre is None or dec is None or not pre.workers or not dec.workers:
            return Skip(row, "disaggregated row without worker counts (aiconfigurator's own tools skip these)")
        pools = [
            _pool(
                "prefill",
                "prefill",
                pre,
                pre.workers,
                max_len,
                dense,
                deployment(row.backend, "prefill", pre.batch, row.isl),
            ),
            _pool(
                "decode",
                "decode",
                dec,
                dec.workers,
                max_len,
                dense,
                deployment(row.backend, "decode", dec.batch, row.isl),
            ),
        ]
        gpus = pre.tp * pre.pp * pre.dp * pre.workers + dec.tp * dec.pp * dec.dp * dec.workers
        widest = max(p.tp * p.pp * (1 if dense else p.dp) for p in (pre, dec))
    doc = {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "InferenceCluster",
        "metadata": {"name": "row"},
        "spec": {
            "model": {"name": model_name, **precision},
            "engine": {
                "name": row.backend,
                **({"version": row.version} if row.version else {}),
                # aiconfigurator's generator passes --enable-mixed-chunk; the gap-analysis harness ran SGLang's default
                **({"scheduling": "mixed"} if row.backend == "sglang" and row.harness == "generator" else {}),
            },
            "gpu": GPUS[row.system],
            "topology": _topology(row.system, gpus, widest),
            "pools": pools,
            # the benchmark's clients talk to the engine's own API server: no router admission limits or deadlines
            "router": {
                "policy": "least_loaded" if row.mode == "agg" else "pd",
                "admission": {"maxWaitingPerBackend": 1_000_000, "maxInFlight": 1_000_000},
                "timeouts": {"firstByteMs": 86_400_000, "idleMs": 86_400_000, "requestMs": 86_400_000},
            },
            "workload": {
                "arrival": {"type": "concurrency", "n": row.concurrency},
                "requests": rounds * row.concurrency,
                "inputLength": {"type": "fixed", "value": row.isl},
                "outputLength": {"type": "fixed", "value": row.osl},
                "client": {
                    **({"overheadMs": client_overhead_ms} if client_overhead_ms is not None else {}),
                    "warmupRequests": warmup_rounds * row.concurrency,
                    **({"promptPool": prompt_pool} if prompt_pool else {}),
                },
            },
        },
    }
    try:
        cluster = parse_cluster(doc, row.id)
    except SpecError as exc:
        if not any("no memory is left" in p or "weights need" in p for p in exc.problems):
            return Skip(row, "; ".join(p.split(": ", 1)[-1] for p in exc.problems))
        # The deployment ran, so it fit: it must have raised the engine's memory fraction.
        for pool in doc["spec"]["pools"]:
            pool["gpuMemoryUtilization"] = 0.95
        try:
            cluster = parse_cluster(doc, row.id)
        except SpecError as exc2:
            return Skip(row, "; ".join(p.split(": ", 1)[-1] for p in exc2.problems))
        assumptions.append("the engine's default memory fraction leaves no KV cache: run at 0.95")
    load = LoadShape(row.concurrency, warmup_rounds * row.concurrency, rounds, prompt_pool)
    return Expressed(row, cluster, load, tuple(assumptions))
