"""``rag``: the retriever. It embeds a query, searches an ANN index over a synthetic corpus and
optionally reranks, batching concurrent queries (``costmodel/retrieval.py``); it answers the
router's retrieval stages and any client of ``POST /v1/retrieve`` (``serve/rag_app.py``). It runs
no LLM engine and takes no generation requests."""

from __future__ import annotations

from emulator.roles import RoleInfo


def _problems(spec) -> list[str]:
    problems = []
    for i, pool in enumerate(spec.pools):
        if pool.role != "rag" or pool.rag is None:
            continue
        at = f"spec.pools[{i}].rag"
        if pool.rag.device == "gpu" and pool.rag.index.type == "hnsw":
            problems.append(
                f"{at}.index.type: hnsw is modelled on cpu only (GPU graph search is not); use device: cpu, or "
                "flat / ivfpq on the gpu"
            )
        if pool.rag.corpus.doc_tokens.type == "trace":
            problems.append(f"{at}.corpus.docTokens: use a fixed, uniform or lognormal length")
    return problems


ROLE = RoleInfo(
    name="rag",
    summary="the retriever: query embedding, ANN search and rerank over a synthetic corpus",
    engine=False,
    front=False,
    problems=_problems,
    service="emulator.serve.rag_app:create_rag_app",
)
