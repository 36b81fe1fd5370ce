"""A synthetic corpus: every document's token length and every query's results, from the seed alone.

Nothing is stored per document, so a corpus of 10^9 documents costs nothing: a document's length is
the inverse CDF of the spec's length law at a hash of (seed, id), and a query's top-k are drawn from a
Zipf popularity over ranks (a seeded affine permutation maps ranks to ids) with a generator seeded
by (seed, query). The simulator, the retriever worker and the router's pipelines all call these
functions, so the same query retrieves the same documents in every mode, and the documents that many
queries share — what a prefix cache or a KV store can reuse — are the popular ones.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from emulator.serve.tokens import word_pieces
from emulator.spec import CorpusSpec, FixedLength, LognormalLength, UniformLength

DOC_CONTENT_BASE = 8_000_000_000  # content ids of documents in prompt segments (clear of trace and pool ids)
_STD_NORMAL = NormalDist()


def _unit(*parts: object) -> float:
    """A uniform number in (0, 1) from a stable hash of the parts."""
    d = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return (int.from_bytes(d, "little") + 0.5) / 2**64


@dataclass(frozen=True)
class Document:
    id: int
    tokens: int
    score: float


class Corpus:
    def __init__(self, spec: CorpusSpec) -> None:
        if not isinstance(spec.doc_tokens, (FixedLength, UniformLength, LognormalLength)):
            raise ValueError("corpus.docTokens: use a fixed, uniform or lognormal length (a trace gives its own)")
        self.spec = spec
        self.n = spec.documents
        # rank r (0 = most popular) -> document id: an affine permutation of 0..n-1
        self._mul = self._coprime(int(_unit(spec.seed, "mul") * self.n) | 1)
        self._add = int(_unit(spec.seed, "add") * self.n)

    def _coprime(self, a: int) -> int:
        a = max(1, a % self.n) if self.n > 1 else 1
        while math.gcd(a, self.n) != 1:
            a += 1
        return a

    def doc_tokens(self, doc_id: int) -> int:
        law = self.spec.doc_tokens
        if isinstance(law, FixedLength):
            return law.value
        u = _unit(self.spec.seed, "len", doc_id)
        if isinstance(law, UniformLength):
            return law.min + min(int(u * (law.max - law.min + 1)), law.max - law.min)
        mu = math.log(law.mean) - law.sigma**2 / 2  # E[length] = mean, as the workload's lognormal
        value = round(math.exp(mu + law.sigma * _STD_NORMAL.inv_cdf(u)))
        return int(min(max(value, law.min), law.max))

    def doc_of_rank(self, rank: int) -> int:
        return (self._mul * rank + self._add) % self.n

    def _rank(self, u: float) -> int:
        """Inverse CDF of a continuous Zipf(s) law over ranks 1..n, returned 0-based."""
        s, n = self.spec.popularity, self.n
        if s == 0:
            x = u * n
        elif abs(s - 1.0) < 1e-9:
            x = n**u
        else:
            x = ((n ** (1 - s) - 1) * u + 1) ** (1 / (1 - s))
        return min(max(int(x) - (0 if s == 0 else 1), 0), n - 1)

    def search(self, query: str, k: int, among: tuple[int, ...] | None = None) -> list[Document]:
        """The top-k documents of a query, best first. ``among`` restricts the results to those ids
        (a vector store's id filter): a trace replay names the documents each request used."""
        if among is not None:
            picked = [d % self.n for d in among][:k]
        else:
            k = min(k, self.n)
            rng = np.random.default_rng(int(_unit(self.spec.seed, "q", query) * 2**63))
            picked, seen = [], set()
            while len(picked) < k:
                for u in rng.random(2 * k):
                    doc = self.doc_of_rank(self._rank(float(u)))
                    if doc not in seen:
                        seen.add(doc)
                        picked.append(doc)
                        if len(picked) == k:
                            break
                if len(seen) >= self.n:
                    break
        return [Document(d, self.doc_tokens(d), round(1.0 - 0.01 * i, 4)) for i, d in enumerate(picked)]


def document_segment(doc: Document) -> tuple[int, int]:
    """A document's place in a prompt: (content id, tokens), shared by every prompt that quotes it."""
    return (DOC_CONTENT_BASE + doc.id, doc.tokens)


# words the tokenizer counts as one piece each, so a document's text is exactly its token length
# when a client quotes it
_DOC_WORDS = tuple(
    w
    for w in "the of and to in is that for it as with was on be by this are from at or an have not model token "
    "cache node link data fast load time path area core rack disk page unit rate flow".split()
    if word_pieces(w) == 1
)


def document_text(doc: Document) -> str:
    """A document's synthetic text: ``doc.tokens`` words, the same for every reader."""
    h = hashlib.blake2b(f"doc:{doc.id}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(h, "little"))
    picks = rng.integers(0, len(_DOC_WORDS), doc.tokens)
    return " ".join(_DOC_WORDS[i] for i in picks)
