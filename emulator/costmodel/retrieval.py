"""What a retrieval batch costs: query embedding, ANN search, optional cross-encoder rerank.

A batch of B queries runs the three phases one after the other (one embedding forward pass over
the batch, the searches, one rerank pass), as a retriever service with dynamic batching does.

Encoders (embedding, rerank) are dense transformers: ~2 x params FLOPs per token and one read of
the weights per pass, on the roofline of the device (``roofline.py`` for a GPU; the host CPU below).
Per-query attention terms are dropped: at the encoders' 512-token limit they are < 10% of the
GEMMs for a 24-layer, 1024-wide model (bge-large-en-v1.5, 335M parameters, BAAI model card).

ANN search, per query:
  flat   exact scan: 2 N d FLOPs and N d x 4 bytes (float32), read once per batch (Faiss runs a
         batch as one GEMM: Johnson, Douze, Jegou, "Billion-scale similarity search with GPUs",
         2017; on a GPU float16 vectors, 2 bytes).
  hnsw   greedy search on the HNSW graph (Malkov & Yashunin, TPAMI 2018): about efSearch x 2M
         distance evaluations on layer 0 (every expanded candidate scans its 2M neighbours) plus
         M per upper layer (ln N / ln M layers). Each is a dependent random read of a d x 4-byte
         vector: one DRAM latency plus the vector at one core's stream bandwidth, plus 2d FLOPs.
         Queries run one per core (cpu_cores in parallel). CPU only (GPU graph search, CAGRA, is
         not modelled).
  ivfpq  IVF with product quantization (Jegou, Douze, Schmid, TPAMI 2011): the coarse quantizer
         (2 nlist d FLOPs), a 256-entry distance table per sub-quantizer (2 x 256 x d FLOPs), and
         asymmetric distances over nprobe x N / nlist codes of pqBytes bytes: one table lookup
         and add per code byte, streamed from memory.
Rerank: a cross-encoder pass over rerankCandidates x (query + document) tokens per query.

The host CPU is a DGX H100's (two Xeon Platinum 8480C, 56 cores each: NVIDIA DGX H100 datasheet).
Per core: two AVX-512 FMA units = 64 FP32 FLOPs per cycle at the 2.0 GHz base clock (Intel
Sapphire Rapids optimization manual) = 128 GFLOP/s; 8 channels of DDR5-4800 per socket = 307 GB/s
(Intel ARK). One core streams ~12 GB/s and a dependent DRAM read takes ~100 ns: typical single-core
figures for this generation (assumptions, not measured here). Scale-up efficiency of encoder GEMMs
on CPU cores: 0.5 (an assumption). Check against a published figure: USearch's BENCHMARKS.md, HNSW
with M=16, ef=64, 256-d float32 on 64 Graviton-3 cores: 131,654 queries/s = 486 us per query per
core; this model gives ~0.4 ms for the same search (``tests/test_rag.py`` keeps it within 2x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from emulator.catalog.gpus import GPU
from emulator.costmodel.roofline import roofline_s
from emulator.spec import RagSpec


@dataclass(frozen=True)
class HostCPU:
    name: str = "2x Xeon Platinum 8480C (DGX H100)"
    core_flops: float = 128e9  # FP32 FLOP/s per core, peak
    core_stream_bw: float = 12e9  # bytes/s one core streams
    dram_latency_s: float = 100e-9  # a dependent random DRAM read
    socket_bw: float = 307e9  # bytes/s per socket (8 x DDR5-4800)
    gemm_efficiency: float = 0.5
    lut_ops_per_s: float = 2.0e9  # PQ table lookups + adds per core per second (one per cycle)


HOST = HostCPU()


@dataclass(frozen=True)
class RetrievalTime:
    embed_s: float
    search_s: float
    rerank_s: float

    @property
    def total_s(self) -> float:
        return self.embed_s + self.search_s + self.rerank_s

    def to_json(self) -> dict:
        return {"embed_ms": self.embed_s * 1e3, "search_ms": self.search_s * 1e3, "rerank_ms": self.rerank_s * 1e3}


class RetrievalCostModel:
    def __init__(self, spec: RagSpec, gpu: GPU, host: HostCPU = HOST) -> None:
        if spec.device == "gpu" and spec.index.type == "hnsw":
            raise ValueError("rag.index.type: hnsw runs on cpu here; use device: cpu, or flat / ivfpq on a gpu")
        self.spec = spec
        self.gpu = gpu
        self.host = host

    # ---- encoders ------------------------------------------------------------------------
    def encoder_s(self, params: float, tokens: int) -> float:
        """One forward pass over ``tokens`` tokens (a batch): weights read once."""
        if tokens <= 0:
            return 0.0
        flops = 2.0 * params * tokens
        if self.spec.device == "gpu":
            return float(roofline_s(self.gpu, flops, 2.0 * params))
        h = self.host
        cores = self.spec.cpu_cores
        compute = flops / (cores * h.core_flops * h.gemm_efficiency)
        memory = 4.0 * params / min(cores * h.core_stream_bw, h.socket_bw)
        return max(compute, memory)

    # ---- the index -------------------------------------------------------------------------
    def search_one_s(self) -> float:
        """One query's search on one core (hnsw, ivfpq on cpu)."""
        idx, h = self.spec.index, self.host
        n, d = self.spec.corpus.documents, self.spec.corpus.dimension
        if idx.type == "hnsw":
            layers = max(1.0, math.log(max(n, 2)) / math.log(idx.m))
            evals = max(idx.ef_search, 1) * 2 * idx.m + idx.m * layers
            per_eval = h.dram_latency_s + 4.0 * d / h.core_stream_bw + 2.0 * d / h.core_flops
            return min(evals, n) * per_eval
        if idx.type == "ivfpq":
            codes = idx.nprobe * n / idx.nlist
            compute = (2.0 * idx.nlist * d + 2.0 * 256 * d) / h.core_flops + codes * idx.pq_bytes / h.lut_ops_per_s
            memory = codes * idx.pq_bytes / h.core_stream_bw
            return max(compute, memory)
        return (2.0 * n * d) / h.core_flops + 4.0 * n * d / h.core_stream_bw  # flat, one core

    def search_s(self, batch: int) -> float:
        if batch <= 0:
            return 0.0
        idx = self.spec.index
        n, d = self.spec.corpus.documents, self.spec.corpus.dimension
        if self.spec.device == "gpu":
            if idx.type == "flat":
                return float(roofline_s(self.gpu, 2.0 * batch * n * d, 2.0 * n * d))
            codes = idx.nprobe * n / idx.nlist
            flops = batch * (2.0 * idx.nlist * d + 2.0 * 256 * d + 2.0 * codes * idx.pq_bytes)
            return float(roofline_s(self.gpu, flops, batch * codes * idx.pq_bytes + 2.0 * idx.nlist * d))
        h, cores = self.host, self.spec.cpu_cores
        if idx.type == "flat":  # one GEMM over the batch, on every core: the corpus is read once
            compute = 2.0 * batch * n * d / (cores * h.core_flops * h.gemm_efficiency)
            memory = 4.0 * n * d / min(cores * h.core_stream_bw, h.socket_bw)
            return max(compute, memory)
        return math.ceil(batch / cores) * self.search_one_s()

    # ---- a whole batch -------------------------------------------------------------------------
    def batch_time(self, query_tokens: list[int], candidates: list[list[int]] | None = None) -> RetrievalTime:
        """``query_tokens``: each query's length; ``candidates``: per query, the token lengths of the
        documents the cross-encoder scores (when the retriever reranks)."""
        s = self.spec
        q = [min(t, s.embedding.max_tokens) for t in query_tokens]
        embed = self.encoder_s(s.embedding.params, sum(q))
        search = self.search_s(len(q))
        rerank = 0.0
        if s.rerank is not None and candidates:
            limit = s.rerank.max_tokens
            pairs = sum(
                min(qt + dt, limit)
                for qt, docs in zip(q, candidates, strict=False)
                for dt in docs[: s.rerank_candidates]
            )
            rerank = self.encoder_s(s.rerank.params, pairs)
        return RetrievalTime(embed, search, rerank)
