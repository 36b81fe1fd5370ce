"""One retriever's batch, as the simulator and the retriever service both run it: what each query
finds (its top-k; with a reranker, the candidates it scores) and how long the batch takes."""

from __future__ import annotations

from emulator.costmodel.retrieval import RetrievalCostModel, RetrievalTime
from emulator.rag.corpus import Corpus, Document
from emulator.spec import RagSpec

# (query text, its tokens, top_k, the ids a replay names or None)
Query = tuple[str, int, int, tuple[int, ...] | None]


class RetrieverModel:
    def __init__(self, spec: RagSpec, gpu) -> None:
        self.spec = spec
        self.corpus = Corpus(spec.corpus)
        self.cost = RetrievalCostModel(spec, gpu)

    def batch(self, queries: list[Query]) -> tuple[list[list[Document]], RetrievalTime]:
        rerank = self.spec.rerank is not None
        found: list[list[Document]] = []
        candidates: list[list[int]] = []
        for query, _, top_k, among in queries:
            docs = self.corpus.search(query, self.spec.rerank_candidates if rerank else top_k, among)
            candidates.append([d.tokens for d in docs])
            found.append(docs[:top_k])
        return found, self.cost.batch_time([tokens for _, tokens, _, _ in queries], candidates if rerank else None)
