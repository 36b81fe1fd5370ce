"""Cross-field checks of a spec against the catalogs: the problems a schema cannot see.

Each problem is one line ``<field path>: <value and what is wrong>; <fix>``.
"""

from __future__ import annotations

from emulator.capacity import effective_max_model_len, pool_memory_plan, profile_of
from emulator.catalog.gpus import GPUS, get_gpu
from emulator.catalog.links import TIERS
from emulator.checkpoint import served_model
from emulator.roles import get_role, role_problems
from emulator.spec import ConcurrencyArrival, InferenceCluster, MMPPArrival, TraceArrival, TraceLength
from emulator.topology import PlacementError, place

# the InferencePool's targetPorts (gateway-api-inference-extension v1 CRD: maxItems 8): a dense pod
# (emulator.packing) exposes one port per instance, each an endpoint of its own to the endpoint picker
MAX_INFERENCE_POOL_PORTS = 8


def cross_field_problems(cluster: InferenceCluster) -> list[str]:
    spec = cluster.spec
    problems: list[str] = []
    try:
        model = served_model(spec.model)
    except (KeyError, ValueError, OSError) as exc:
        return [f"spec.model.name: {spec.model.name!r}: {str(exc).strip(chr(34))}"]
    try:
        gpu = get_gpu(spec.gpu)
    except KeyError:
        return [f"spec.gpu: {spec.gpu!r}: unknown GPU; known: {', '.join(sorted(GPUS))}"]
    try:
        profile_of(spec)
    except KeyError as exc:
        return [f"spec.engine.name: {spec.engine.name!r}: {str(exc).strip(chr(34))}"]
    q = model.quant
    for field, precision in (("dtype", q.gemm), ("dtype", q.attention), ("moeDtype", q.moe)):
        if precision in ("fp8", "fp8_block") and gpu.fp8_flops is None:
            problems.append(
                f"spec.model.{field}: {precision!r}: {gpu.name} has no FP8 tensor cores; set bf16 (or a 4-bit"
                " weight-only precision)"
            )
            break
    if q.kv_cache == "fp8" and gpu.fp8_flops is None:
        problems.append(f"spec.model.kvCacheDtype: 'fp8': {gpu.name} has no FP8 support; use bf16")
    for field, tier in (("scaleUp", spec.topology.scale_up.tier), ("scaleOut", spec.topology.scale_out.tier)):
        if tier is not None and tier.lower() not in TIERS:
            problems.append(f"spec.topology.{field}.tier: {tier!r}: unknown tier; known: {', '.join(TIERS)}")
    domain = min(spec.topology.scale_up.size, spec.topology.nodes * spec.topology.gpus_per_node)

    names = [p.name for p in spec.pools]
    for i, pool in enumerate(spec.pools):
        at = f"spec.pools[{i}]"
        if names.count(pool.name) > 1:
            problems.append(f"{at}.name: {pool.name!r} is used by more than one pool; names must be unique")
        engine = get_role(pool.role).engine  # an FFN instance's tp splits experts, not heads
        if engine and model.heads % pool.tp:
            problems.append(f"{at}.tp: {pool.tp} does not divide the model's {model.heads} attention heads")
        elif engine and not model.is_mla and model.kv_heads % pool.tp and pool.tp % model.kv_heads:
            problems.append(
                f"{at}.tp: {pool.tp} neither divides nor is a multiple of the model's {model.kv_heads} KV heads"
            )
        if pool.pp > model.layers:
            problems.append(f"{at}.pp: {pool.pp} exceeds the model's {model.layers} layers")
        if pool.dp > 1 and not model.is_moe:
            problems.append(
                f"{at}.dp: {pool.dp}: attention data parallelism needs an MoE model; for {model.name} use"
                f" replicas: {pool.replicas * pool.dp} and dp: 1"
            )
        if pool.ep > 1:
            if not model.is_moe:
                problems.append(f"{at}.ep: {pool.ep} needs an MoE model; {model.name} is dense, use ep: 1")
            elif (pool.tp * pool.dp) % pool.ep:
                problems.append(
                    f"{at}.ep: {pool.ep} must divide tp x dp ({pool.tp * pool.dp}): experts are split over those GPUs"
                )
            elif model.num_experts % pool.ep:
                problems.append(f"{at}.ep: {pool.ep} does not divide the model's {model.num_experts} experts")
        if pool.gpus_per_instance > domain and not spec.topology.allow_cross_domain_tp:
            problems.append(
                f"{at}: tp*pp*dp = {pool.gpus_per_instance} GPUs exceeds the {domain}-GPU scale-up domain; "
                "lower tp/pp/dp or set spec.topology.allowCrossDomainTp: true"
            )
        if not engine:  # (an FFN pool's memory: its role's checks)
            continue
        plan = pool_memory_plan(spec, pool, model, gpu)
        if plan.weights >= plan.usable:
            problems.append(
                f"{at}: weights need {plan.weights / 1e9:.1f} GB per GPU"
                f" (model {model.weight_bytes() / 1e9:.1f} GB over tp {pool.tp} x pp {pool.pp}"
                f"{f' x dp {pool.dp} for the experts' if pool.dp > 1 else ''}) but {gpu.name} x gpuMemoryUtilization"
                f" {plan.usable / gpu.hbm_bytes:.2f} gives {plan.usable / 1e9:.1f} GB; raise tp or pp, or quantize"
                " (dtype fp8)"
            )
            continue
        if plan.num_gpu_blocks < 1:
            problems.append(
                f"{at}: no memory is left for the KV cache after weights ({plan.weights / 1e9:.1f} GB) and the"
                f" activation reserve ({plan.reserve / 1e9:.1f} GB); raise tp/pp or gpuMemoryUtilization"
            )
            continue
        max_len = effective_max_model_len(pool, model)
        if pool.max_model_len and pool.max_model_len > model.max_model_len:
            problems.append(
                f"{at}.maxModelLen: {pool.max_model_len} exceeds the model's {model.max_model_len} positions"
            )
        if plan.num_gpu_blocks * pool.block_size < max_len:
            problems.append(
                f"{at}.maxModelLen: {max_len} tokens do not fit in the KV cache "
                f"({plan.num_gpu_blocks * pool.block_size} tokens); set maxModelLen lower or add GPUs"
            )

    problems.extend(role_problems(spec))
    per = spec.emulation.instances_per_process
    if spec.gateway.inference_pool.enabled and per > MAX_INFERENCE_POOL_PORTS:
        problems.append(
            f"spec.emulation.instancesPerProcess: {per} instances per pod need {per} ports, and an InferencePool "
            f"(spec.gateway.inferencePool) lists at most {MAX_INFERENCE_POOL_PORTS}; use {MAX_INFERENCE_POOL_PORTS} "
            "or fewer, or disable the InferencePool"
        )
    if spec.gateway.inference_pool.enabled and per > 1:
        # the InferencePool sends to every listed port of every selected pod: a pool's last pod must
        # host a full set of instances, or the endpoint picker would pick ports nothing listens on
        for i, pool in enumerate(spec.pools):
            if get_role(pool.role).engine and pool.replicas % per:
                fuller = -(-pool.replicas // per) * per
                problems.append(
                    f"spec.pools[{i}].replicas: {pool.replicas} instances at {per} per pod "
                    f"(spec.emulation.instancesPerProcess) leave the last pod {pool.replicas % per}, and the "
                    f"InferencePool (spec.gateway.inferencePool) sends to all {per} ports of every pod; use a "
                    f"multiple of {per} (e.g. {fuller}) or an instancesPerProcess that divides {pool.replicas}"
                )

    if not problems:
        try:
            topo = place(spec)
        except PlacementError as exc:
            problems.append(str(exc))
        else:
            from emulator.faults.schedule import fault_problems

            problems.extend(fault_problems(spec, topo))
        total = spec.topology.nodes * spec.topology.gpus_per_node
        if spec.topology.scale_up.size > total:
            pass  # a domain larger than the cluster is simply the whole cluster

    wl = spec.workload
    open_loop = not isinstance(wl.arrival, ConcurrencyArrival | TraceArrival | MMPPArrival)
    if open_loop and wl.rate is None:
        problems.append("spec.workload.rate: required for poisson/gamma/constant arrivals (requests per second)")
    has_rag = any(p.role == "rag" and p.replicas > 0 for p in spec.pools)
    named = [("pipeline", wl.pipeline)] if wl.pipeline else list(enumerate(wl.pipelines or []))
    for at, pipe in named:
        where = at if isinstance(at, str) else f"pipelines[{at}]"
        if (pipe.type in ("rag", "multihop") or (pipe.type == "reasoning" and pipe.retrieve)) and not has_rag:
            problems.append(f"spec.workload.{where}.type: {pipe.type!r} retrieves documents; add a pool with role rag")
    if not isinstance(wl.arrival, TraceArrival):
        for field, dist in (("inputLength", wl.input_length), ("outputLength", wl.output_length)):
            if isinstance(dist, TraceLength):
                problems.append(f"spec.workload.{field}: type 'trace' needs arrival type 'trace'")
    return problems
