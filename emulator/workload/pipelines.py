"""Multi-stage requests: what each stage of a rag, multihop, reasoning or agentic pipeline does.

A pipeline is a generator of stages: it yields a ``Retrieve``, is sent the documents retrieved, and
yields the ``Generate`` whose prompt quotes them; it yields ``Think`` for an agent's tool call. The
simulator and the router's orchestrator drive the same generator, so both run identical stages.

Prompts are content segments (``engine/hashing.py``): one system prompt every request shares, each
document by its corpus id (so the same documents after the same system prompt share KV blocks), the
question and earlier answers unique to the request. A stage's answer enters later prompts as a
segment of its length (the engines cache prompt blocks only, so its content does not matter).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

from emulator.rag.corpus import Document, document_segment
from emulator.spec import PipelineSpec
from emulator.workload.traces import RAGPULSE_PART_IDS, ragpulse_part

SYSTEM_CONTENT_ID = 8_900_000_000  # the system prompt every pipeline request shares
_UNIQUE_BASE = 9_000_000_000  # a request's own content: question, answers, tool results
_PER_REQUEST = 4096  # content ids per request (stages x kinds)


@dataclass(frozen=True)
class Retrieve:
    query: str  # what the retriever embeds and searches with (its results follow from it)
    query_tokens: int
    top_k: int
    among: tuple[int, ...] | None = None  # a replay names the documents (the retriever's id filter)
    hop: int = 0


@dataclass(frozen=True)
class Generate:
    segments: tuple[tuple[int, int], ...]
    output_tokens: int  # visible answer
    hidden_tokens: int = 0  # reasoning decoded before the answer (not shown, still decoded)
    final: bool = False  # the answer the user waits for: TTFT and TPOT are read from it
    hop: int = 0

    @property
    def prompt_tokens(self) -> int:
        return sum(n for _, n in self.segments)

    @property
    def max_tokens(self) -> int:
        return self.hidden_tokens + self.output_tokens


@dataclass(frozen=True)
class Think:
    seconds: float
    hop: int = 0


Stage = Retrieve | Generate | Think
Pipeline = Generator[Stage, list[Document] | None, None]


def _unique(index: int, k: int) -> int:
    return _UNIQUE_BASE + index * _PER_REQUEST + k


def replay_question_tokens(segments: tuple[tuple[int, int], ...]) -> int:
    """What a traced RAGPulse request asked (its user input, or its unnamed tail): the retrieval's query."""
    return sum(n for c, n in segments if ragpulse_part(c) in (None, "user_input"))


def replay_documents(segments: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """The RAGPulse passages a traced prompt quotes (their content ids carry the passage ids)."""
    return tuple(c % RAGPULSE_PART_IDS for c, _ in segments if ragpulse_part(c) == "passages_ids")


def pipeline_stages(
    spec: PipelineSpec,
    index: int,
    question_tokens: int,
    output_tokens: int,
    traced: tuple[tuple[int, int], ...] = (),
) -> Pipeline:
    """The stages of request ``index``. ``traced``: a replayed prompt's segments (RAGPulse): its
    passages are retrieved by id and the prompt is the trace's own."""
    system = ((SYSTEM_CONTENT_ID, spec.system_tokens),) if spec.system_tokens else ()
    question = (_unique(index, 0), question_tokens)
    if spec.type == "rag" and traced:
        docs = replay_documents(traced)
        query = replay_question_tokens(traced) or question_tokens
        yield Retrieve(f"q{index}", query, max(len(docs), 1), docs or None)
        yield Generate(traced, output_tokens, final=True)
        return
    if spec.type == "rag":
        found = yield Retrieve(f"q{index}", question_tokens, spec.top_k)
        yield Generate(system + _docs(found) + (question,), output_tokens, final=True)
        return
    if spec.type == "multihop":
        answers: tuple[tuple[int, int], ...] = ()
        for hop in range(spec.hops):
            found = yield Retrieve(
                f"q{index}.h{hop}", question_tokens + sum(n for _, n in answers), spec.top_k, hop=hop
            )
            last = hop == spec.hops - 1
            yield Generate(system + _docs(found) + (question,) + answers, output_tokens, final=last, hop=hop)
            answers = (*answers, (_unique(index, 1 + hop), output_tokens))
        return
    if spec.type == "reasoning":
        docs_part: tuple[tuple[int, int], ...] = ()
        if spec.retrieve:
            docs_part = _docs((yield Retrieve(f"q{index}", question_tokens, spec.top_k)))
        yield Generate(system + docs_part + (question,), output_tokens, spec.reasoning_tokens, final=True)
        return
    # agentic: generate, call a tool, see its result, generate again; the context keeps growing
    context = (*system, question)
    for turn in range(spec.turns):
        last = turn == spec.turns - 1
        yield Generate(context, output_tokens, final=last, hop=turn)
        if last:
            return
        yield Think(spec.think_time_ms * 1e-3, hop=turn)
        context = (*context, (_unique(index, 1 + 2 * turn), output_tokens))
        if spec.tool_tokens:
            context = (*context, (_unique(index, 2 + 2 * turn), spec.tool_tokens))


def _docs(found: list[Document] | None) -> tuple[tuple[int, int], ...]:
    return tuple(document_segment(d) for d in found or ())
