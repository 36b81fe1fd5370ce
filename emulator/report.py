"""Human-readable output of the CLI (rich tables) and the report folder of a run."""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console
from rich.table import Table

from emulator.results import write_jsonl
from emulator.trust import MIN_TIMED_STEPS, timing_judged

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_summary_table(cluster, result, wall_s: float | None = None) -> None:
    s = result.summary
    slo = cluster.spec.slo
    title = f"{cluster.name}: {s['requests']} requests, {s['completed']} completed, {s['failed']} failed"
    trust = getattr(result, "trust", None)
    if trust:  # an emulated run: whether its numbers hold on this host, before the numbers
        console.print(trust["line"], style=None if trust["verdict"] == "faithful" else "bold red")
    console.print(title)
    t = Table()
    t.add_column("metric")
    for col in ("mean", "p50", "p90", "p99"):
        t.add_column(col, justify="right")
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("e2e_ms", "E2E ms")):
        row = s[key]
        t.add_row(label, *(_fmt(row[c]) for c in ("mean", "p50", "p90", "p99")))
    console.print(t)
    target = slo.attainment_target
    verdict = "meets" if s["slo_attainment"] >= target else "misses"
    console.print(
        f"  output {s['output_tokens_per_s']:.1f} tok/s over {s['duration_s']:.1f} s (first arrival to last"
        " completion);"
        f" SLO attainment {100 * s['slo_attainment']:.1f}% (TTFT<={slo.ttft_ms:g} ms, TPOT<={slo.tpot_ms:g} ms"
        f"{'' if slo.e2e_ms is None else f', E2E<={slo.e2e_ms:g} ms'}),"
        f" {verdict} the {100 * target:.0f}% target"
    )
    if s.get("client_waited"):
        w = s["client_wait_ms"]
        console.print(
            f"  client: {s['client_waited']} requests waited for a free connection (workload.client.maxConnections),"
            f" mean {w['mean']:.1f} ms, p99 {w['p99']:.1f} ms; the wait is in their TTFT",
            style="yellow",
        )
    if s.get("pipeline"):
        parts = s["pipeline"]["stages_ms"]
        where = ", ".join(f"{k} {v['mean']:.1f}" for k, v in parts.items() if v["mean"] and v["mean"] >= 0.05)
        console.print(f"  {s['pipeline']['type']} pipelines, where the end-to-end time goes (mean ms): {where}")
        if len(s["pipeline"]["by_type"]) > 1:
            per = ", ".join(
                f"{t} {v['requests']} (E2E {v['e2e_ms']['mean']:.0f} ms)" for t, v in s["pipeline"]["by_type"].items()
            )
            console.print(f"  mix: {per}")
    if s.get("kvstore"):
        kv = s["kvstore"]
        console.print(
            f"  KV store: {100 * kv['hit_rate']:.1f}% of the blocks asked for were held;"
            f" {kv['bytes_fetched'] / 1e9:.2f} GB fetched, {kv['bytes_written'] / 1e9:.2f} GB written,"
            f" {kv['evicted_blocks']} blocks evicted; {s.get('kv_fetched_tokens', 0)} prompt tokens fetched"
            " instead of computed"
        )
    if s.get("failed"):
        reasons = ", ".join(f"{k} {v}" for k, v in s.get("failed_by_reason", {}).items())
        console.print(f"  failed by reason: {reasons}; lost (no answer at all): {s.get('lost', 0)}")
    if s.get("faults"):
        _print_faults(s["faults"])
    if wall_s is not None:
        console.print(f"  simulated {result.simulated_s:.1f} s in {wall_s:.2f} s wall ({result.events} events)")
    elif getattr(result, "instances", None):
        for name, st in result.instances.items():
            if "afd_exchanges" in st:  # AFD's FFN side: no engine of its own, the activations it took in
                console.print(
                    f"  {name} ({st.get('role')}): {int(st['afd_exchanges'])} activation exchanges,"
                    f" {st.get('afd_rx_bytes', 0) / 1e9:.2f} GB in (logical)"
                )
                continue
            if st.get("role") == "rag":
                q, b = st.get("retrieval_queries", 0), st.get("retrieval_batches", 0)
                console.print(f"  {name} (rag): {int(q)} queries in {int(b)} batches (mean {q / b if b else 0:.1f})")
                continue
            if st.get("role") == "kvstore":
                asked = st.get("lookup_blocks", 0)
                console.print(
                    f"  {name} (kvstore): {int(st.get('blocks', 0))} blocks held;"
                    f" {100 * st.get('hit_blocks', 0) / asked if asked else 0:.1f}% of {int(asked)} blocks asked for"
                    f" were held, {int(st.get('fetched_blocks', 0))} fetched,"
                    f" {int(st.get('evicted_blocks', 0))} evicted"
                )
                continue
            q = st.get("prefix_cache_queries", 0)
            hit = f"prefix hits {100 * st.get('prefix_cache_hits', 0) / q:.0f}%" if q else "no prefix queries"
            ratio = 100 * st.get("timing_error_ratio", 0)
            flag = " (over the 5% budget: raise spec.emulation.timeDilation)" if st.get("overloaded") else ""
            p99_ms = 1e3 * st.get("timing_error_p99_s", 0)
            timing = (
                f"step timing error p99 {p99_ms:.2f} ms = {ratio:.1f}% of the median step"
                if timing_judged(st)
                else f"step timing not judged: {int(st['timed_steps'])} steps timed (a p99 needs {MIN_TIMED_STEPS})"
            )
            console.print(
                f"  {name} ({st.get('role')}): {hit}, {int(st.get('preemptions', 0))} preemptions, {timing}{flag}"
            )


def _print_faults(faults: list[dict]) -> None:
    """Per fault: its window, then the arrivals before / during / after it."""
    t = Table(title="faults (arrivals before / during / after each window)")
    for col in ("fault", "window s", "sent", "failed", "lost", "TTFT p99 ms", "attainment", "recovery s"):
        t.add_column(col, justify="right" if col not in ("fault",) else "left")
    for f in faults:
        w = [f["before"], f["during"], f["after"]]

        def three(key: str, fmt, w=w) -> str:
            return " / ".join("-" if x[key] is None else fmt(x[key]) for x in w)

        t.add_row(
            f"{f['name']} ({f['kind']})",
            f"{f['start_s']:.1f}-{f['end_s']:.1f}",
            three("sent", str),
            three("failed", str),
            three("lost", str),
            three("ttft_ms_p99", lambda v: f"{v:.0f}"),
            three("slo_attainment", lambda v: f"{100 * v:.0f}%"),
            "-" if f["recovery_s"] is None else f"{f['recovery_s']:.2f}",
        )
    console.print(t)


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)


def write_report(out_dir: str, cluster, result) -> None:
    """The files every driver's report folder has: requests.jsonl, summary.json, instances.json."""
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "requests.jsonl"), result.records)
    write_json(os.path.join(out_dir, "summary.json"), result.summary)
    write_json(os.path.join(out_dir, "instances.json"), result.instances)


def print_cost_table(cluster, args) -> int:
    from emulator.build import build_instances
    from emulator.costmodel.interface import BatchShape
    from emulator.errors import SpecError
    from emulator.roles import get_role
    from emulator.roles.attention import afd_owners

    spec = cluster.spec
    pools = {p.name: p for p in spec.pools}
    name = args.pool or spec.pools[0].name
    if name not in pools:
        raise SpecError([f"--pool: {name!r} is not a pool of {cluster.name}; pools: {', '.join(pools)}"])
    if args.prefill_tokens == 0 and args.decode_batch == 0:
        raise SpecError(["--prefill-tokens / --decode-batch: give at least one token to price"])
    if not get_role(pools[name].role).engine:
        owner = ", ".join(p.name for p in afd_owners(spec, name))
        raise SpecError([f"--pool: {name!r} holds experts only; price it with its attention pool: --pool {owner}"])
    _, setups = build_instances(spec)
    setup = next(s for s in setups if s.pool.name == name)
    beyond = beyond_the_engine(setup.engine, args.prefill_tokens, args.prefill_context, args.decode_batch, args.context)
    shape = BatchShape(
        prefill_chunks=((args.prefill_tokens, args.prefill_context),) if args.prefill_tokens else (),
        num_decode=args.decode_batch,
        decode_kv_sum=args.decode_batch * args.context,
    )
    cm = setup.cost
    ops = cm.breakdown(shape)
    st = cm.step_time(shape)
    profile = cm.profile
    quant = cm.kernels.quant
    graph = cm.graph_tokens(shape)
    host = {
        "engine": f"{profile.name} {profile.version}",
        "async_overlap": profile.host.async_overlap,
        "async_scheduling": profile.async_scheduling,
        "cuda_graph": None if graph is None else graph,
        "eager_kernels": cm.kernels.eager_kernels(),
        "eager_launch_us_per_kernel": profile.host.eager_launch_s * 1e6,
        "step_fixed_us": profile.host.step_fixed_s * 1e6,
        "per_seq_us": profile.host.per_seq_s * 1e6,
        "api_latency_ms": profile.api.latency_s * 1e3,
        "api_per_prompt_token_us": profile.api.per_prompt_token_s * 1e6,
        "api_per_output_us": profile.api.per_output_s * 1e6,
        "pd_handoff_ms": profile.api.pd_handoff_s * 1e3,
        "fitted_on_groups": len(profile.fitted_on),
    }
    precisions = {
        "dense": quant.gemm,
        "attention": quant.attention,
        "experts": quant.moe,
        "kv_cache": quant.kv_cache,
        "source": quant.source,
    }
    afd = cm.kernels.terms(shape, graph) if hasattr(cm.kernels, "terms") else None
    if args.json:
        print(
            json.dumps(
                {
                    "pool": name,
                    **({"afd": afd} if afd is not None else {}),
                    "ops_ms": {k: v * 1e3 for k, v in ops.items()},
                    "step_ms": st.total_s * 1e3,
                    "interval_ms": st.interval_s * 1e3,
                    "sources": cm.sources,
                    "host": host,
                    "quantization": precisions,
                    "beyond_the_engine": beyond,
                }
            )
        )
        return 0
    pool = setup.pool
    t = Table(
        title=(
            f"{cluster.name}/{name}: {spec.model.name} on {pool.gpus_per_instance}x {spec.gpu}"
            f" (tp={pool.tp} pp={pool.pp} dp={pool.dp} ep={pool.ep}), {profile.name} {profile.version};"
            f" prefill {args.prefill_tokens} tokens (+{args.prefill_context} cached),"
            f" decode batch {args.decode_batch} at KV {args.context}"
        ),
        title_justify="left",
    )
    t.add_column("operator")
    t.add_column("ms", justify="right")
    t.add_column("share", justify="right")
    t.add_column("source")
    total = sum(ops.values())
    source_key = {
        "shared_expert_gate_up": "shared_expert_gate_up",
        "attention_prefill_sliding": "attention_prefill",
        "attention_decode_sliding": "attention_decode",
    }
    host_src = f"{profile.name} {profile.version} host-side model (emulator/costmodel/data/engine_constants.json)"
    for op, sec in ops.items():
        if op.startswith("host_"):
            src = host_src
        else:
            src = cm.sources.get(
                source_key.get(op, op),
                "alpha-beta"
                if op == "pp_send_recv"
                else "spec stepOverheadUs"
                if op == "step_overhead"
                else "roofline",
            )
        t.add_row(op, f"{sec * 1e3:.3f}", f"{100 * sec / total:.1f}%" if total else "-", src)
    t.add_row("step (launch to output)", f"{st.total_s * 1e3:.3f}", "", "")
    if pool.pp > 1:
        t.add_row("launch interval (pipelined)", f"{st.interval_s * 1e3:.3f}", "", "")
    console.print(t)
    for note in beyond:
        console.print(f"  [yellow]note:[/yellow] {note}")
    console.print(
        f"  precisions: dense {quant.gemm}, attention {quant.attention}, experts {quant.moe}, KV cache {quant.kv_cache}"
        f" (from {quant.source})"
    )
    kernels, launch_us = host["eager_kernels"], host["eager_launch_us_per_kernel"]
    eager = (
        f"eager (no CUDA graph): at least {kernels:.0f} kernel launches x {launch_us:.1f} us"
        f" = {kernels * launch_us / 1e3:.1f} ms"
    )
    console.print(
        f"  host side: {'CUDA graph at ' + str(graph) + ' tokens' if graph is not None else eager};"
        f" {'overlapped with the GPU (async scheduling)' if profile.host.async_overlap else 'serial with the GPU'};"
        + (
            " a request that comes during a step joins the step after the next (async scheduling);"
            if profile.async_scheduling
            else ""
        )
        + f" {host['step_fixed_us']:.0f} us per step + {host['per_seq_us']:.1f} us per sequence;"
        f" API server {host['api_latency_ms']:.1f} ms + {host['api_per_prompt_token_us']:.2f} us per prompt token,"
        f" {host['api_per_output_us']:.1f} us per streamed token"
        + (f"; P/D hand-off {host['pd_handoff_ms']:.0f} ms" if pool.role in ("prefill", "decode") else "")
    )
    if afd is not None:
        c = cm.kernels.afd
        console.print(
            f"  AFD: {pool.dp} attention rank(s) x {c.ffn_instances} FFN instance(s) of {c.ffn_gpus_per_instance} GPUs"
            f" over {c.tier.name}, {int(afd['micro_batches'])} micro-batch(es): attention busy"
            f" {afd['attention_busy_s'] * 1e3:.3f} ms ({100 * afd['attention_idle']:.0f}% idle), FFN busy"
            f" {afd['ffn_busy_s'] * 1e3:.3f} ms ({100 * afd['ffn_idle']:.0f}% idle), exchange"
            f" {afd['exchange_each_way_s'] * 1e3:.3f} ms and {afd['exchange_bytes_each_way'] / 1e6:.1f} MB each way"
        )
    mem = setup.memory
    # a hybrid model's linear-attention state is held per sequence, not per token: shown apart
    per_token = cm.kv_transfer_bytes(2) - cm.kv_transfer_bytes(1)
    per_seq = cm.kv_transfer_bytes(1) - per_token
    console.print(
        f"  per GPU: weights {mem.weights / 1e9:.1f} GB, reserve {mem.reserve / 1e9:.1f} GB,"
        f" KV {mem.kv / 1e9:.1f} GB = {mem.num_gpu_blocks} blocks x {pool.block_size} tokens;"
        f" KV per token (whole model) {per_token} B"
        + (f" + {per_seq / 1e6:.1f} MB per sequence (linear-attention state)" if per_seq else "")
    )
    return 0


def beyond_the_engine(engine, prefill_tokens: int, prefill_context: int, decode_batch: int, context: int) -> list[str]:
    """What of a priced step the pool's engine would not run as one step: the step is still priced (a
    what-if), but the reader learns that a real engine would queue, chunk or preempt instead. A
    sequence longer than the model's context window exists nowhere, so that is an error naming the flag."""
    from emulator.errors import SpecError

    window = engine.max_model_len
    if decode_batch and context + 1 > window:
        raise SpecError(
            [
                f"--context: {context} tokens plus the decoded one exceed the pool's context window"
                f" (max_model_len {window}); give at most {window - 1}"
            ]
        )
    if prefill_tokens and prefill_tokens + prefill_context > window:
        raise SpecError(
            [
                f"--prefill-tokens + --prefill-context: {prefill_tokens + prefill_context} tokens exceed"
                f" the pool's context window (max_model_len {window})"
            ]
        )
    notes = []
    if decode_batch + (1 if prefill_tokens else 0) > engine.max_num_seqs:
        notes.append(
            f"{decode_batch + (1 if prefill_tokens else 0)} sequences in one step; the engine runs at most"
            f" {engine.max_num_seqs} (max_num_seqs), the rest would wait"
        )
    if decode_batch + prefill_tokens > engine.max_num_batched_tokens:
        notes.append(
            f"{decode_batch + prefill_tokens} tokens in one step; the engine's step budget is"
            f" {engine.max_num_batched_tokens} (max_num_batched_tokens): it would chunk the prompt"
        )
    size = engine.block_size
    blocks = decode_batch * -(-(context + 1) // size) + (
        -(-(prefill_tokens + prefill_context) // size) if prefill_tokens else 0
    )
    if blocks > engine.num_gpu_blocks:
        notes.append(
            f"the step's KV takes {blocks} blocks of {size} tokens; an instance holds {engine.num_gpu_blocks}:"
            f" the engine would preempt or queue sequences"
        )
    return notes


def print_placement(cluster) -> None:
    from emulator.build import build_instances
    from emulator.costmodel.engines import profile_choice

    topo, setups = build_instances(cluster.spec)
    t = Table(
        title=f"{cluster.name}: {len(topo.instances)} instances on {topo.nodes}x{topo.gpus_per_node} {topo.gpu.name}"
        f" (scale-up {topo.scale_up.name} x{topo.domain_size}, scale-out {topo.scale_out.name})",
        title_justify="left",
    )
    for col in ("instance", "role", "gpus", "node", "domain", "KV blocks"):
        t.add_column(col)
    blocks = {s.instance.name: str(s.engine.num_gpu_blocks) for s in setups}
    for i in topo.instances:  # engines with their KV blocks; AFD's FFN instances hold experts only
        t.add_row(i.name, i.role, ",".join(map(str, i.gpus)), str(i.node), str(i.domain), blocks.get(i.name, "-"))
    console.print(t)
    console.print(f"  engine: {profile_choice(cluster.spec.engine.name, cluster.spec.engine.version)}")
    console.print("  spec is valid")


def print_catalog() -> None:
    from emulator.catalog.gpus import GPUS
    from emulator.catalog.links import TIERS
    from emulator.catalog.models import catalog_names, get_model

    t = Table(title="GPUs", title_justify="left")
    for col in (
        "name",
        "BF16 TFLOP/s",
        "FP8 TFLOP/s",
        "FP4 TFLOP/s",
        "HBM GB",
        "HBM TB/s",
        "NVLink GB/s",
        "NIC Gb/s",
        "tables",
    ):
        t.add_column(col)
    for g in GPUS.values():
        t.add_row(
            g.name,
            f"{g.bf16_flops / 1e12:.0f}",
            "-" if g.fp8_flops is None else f"{g.fp8_flops / 1e12:.0f}",
            "-" if g.fp4_flops is None else f"{g.fp4_flops / 1e12:.0f}",
            f"{g.hbm_bytes / 1e9:.0f}",
            f"{g.hbm_bw / 1e12:.2f}",
            f"{g.nvlink_bw / 1e9:.0f}",
            f"{g.nic_gbps:.0f}",
            g.table or "-",
        )
    console.print(t)
    t = Table(title="Link tiers", title_justify="left")
    for col in ("name", "kind", "GB/s per GPU", "latency us", "domain"):
        t.add_column(col)
    for lt in TIERS.values():
        t.add_row(lt.name, lt.kind, f"{lt.bandwidth / 1e9:g}", f"{lt.latency_s * 1e6:g}", str(lt.domain_size or "-"))
    console.print(t)
    t = Table(title="Models (name them by id, last part, or a path to a config.json)", title_justify="left")
    for col in ("Hugging Face id", "params B", "active B", "layers", "heads/kv", "KV B/token", "kind", "precisions"):
        t.add_column(col)
    for name in catalog_names():
        m = get_model(name)
        kind = " ".join(
            k
            for k in (
                "MLA" if m.is_mla else "",
                "DSA" if m.is_dsa else "",
                f"{m.sliding_layers} sliding" if m.sliding_layers else "",
                f"{m.linear_layers} linear-attn" if m.linear_layers else "",
                f"MoE {m.num_experts}x top{m.top_k}" if m.is_moe else "dense",
            )
            if k
        )
        q = m.quant
        t.add_row(
            name,
            f"{m.total_params() / 1e9:.1f}",
            f"{m.active_params() / 1e9:.1f}",
            str(m.layers),
            f"{m.heads}/{m.kv_heads}",
            str(m.kv_bytes_per_token(q.kv_cache)),
            kind,
            f"{q.gemm}/{q.attention}/{q.moe}, KV {q.kv_cache}",
        )
    console.print(t)


def print_endpoints(state) -> None:
    t = Table(title=f"{state.cluster}: ready (state and logs in {state.run_dir})", title_justify="left")
    for col in ("role", "instance", "URL"):
        t.add_column(col)
    t.add_row("router", "router", state.router)
    for p in state.workers():
        t.add_row(p.role, p.name, p.url)
    console.print(t)


def print_topology(cluster, topo) -> None:
    console.print(
        f"{cluster.name}: {topo.nodes} node(s) x {topo.gpus_per_node} {topo.gpu.name}; scale-up {topo.scale_up.name}"
        f" ({topo.scale_up.bandwidth / 1e9:g} GB/s per GPU, {topo.scale_up.latency_s * 1e6:g} us) in domains of"
        f" {topo.domain_size}; scale-out {topo.scale_out.name} ({topo.scale_out.bandwidth / 1e9:g} GB/s per GPU,"
        f" {topo.scale_out.latency_s * 1e6:g} us)"
    )
    t = Table(title="placement", title_justify="left")
    for col in ("instance", "role", "node", "domain", "GPUs"):
        t.add_column(col)
    for i in topo.instances:
        t.add_row(i.name, i.role, str(i.node), str(i.domain), ",".join(map(str, i.gpus)))
    console.print(t)
    t = Table(title="link tier between instances", title_justify="left")
    t.add_column("")
    for i in topo.instances:
        t.add_column(i.name)
    for i, row in zip(topo.instances, topo.tier_matrix(), strict=True):
        t.add_row(
            i.name,
            *["-" if a == i.name else tier for a, tier in zip([x.name for x in topo.instances], row, strict=True)],
        )
    console.print(t)
