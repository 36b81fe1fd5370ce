"""What each kind of user asks: pure, seeded builders of OpenAI request bodies.

Chat (short in, medium out), coding (long input, short output), summarization (long
input), agentic sessions (K turns over a shared system prompt and the same tool definitions, which
the server's chat template renders into the prompt; each turn's messages are the previous context
plus the answer and a tool result, so the prefix is reused), multi-hop
chains (each call quotes the previous answer) and RAG (passages drawn from a synthetic
corpus with Zipf popularity, so popular passages share KV blocks). No I/O, no clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORDS = (
    "cache token prefill decode batch link latency bandwidth expert tensor pipeline kernel memory "
    "router queue stream model layer attention network cluster node switch fabric"
).split()
SYSTEM_PROMPT = "You are a careful assistant operating tools for an inference cluster. " + " ".join(
    WORDS * 12
)  # ~300 words shared by every agentic session


def _tool(name: str, description: str, **params: str) -> dict:
    """One tool in OpenAI's function-calling format (``tools`` of a chat completion request)."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {k: {"type": "string", "description": v} for k, v in params.items()},
                "required": list(params),
            },
        },
    }


# What an operations agent is given on every call: the same definitions each turn (the chat template
# puts them in the system turn, so they are part of the shared prefix), a few hundred prompt tokens
TOOLS = [
    _tool("get_metrics", "Read a Prometheus metric of the serving fleet.", query="PromQL expression", window="range"),
    _tool("scale_pool", "Change the replica count of a pool.", pool="pool name", replicas="new replica count"),
    _tool("drain_instance", "Stop routing new requests to an instance.", instance="instance name"),
    _tool("query_logs", "Search an instance's logs.", instance="instance name", pattern="regular expression"),
    _tool("set_link", "Degrade or restore a network link.", source="sender", target="receiver", factor="rate factor"),
    _tool("describe_pod", "Show a pod's status, events and resource use.", pod="pod name", namespace="namespace"),
]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Turn:
    body: dict
    think_s: float = 0.0


@dataclass
class Session:
    """A sequence of calls; ``next_turn(answer)`` builds the following call from the last answer."""

    kind: str
    turns_left: int
    rng: random.Random
    messages: list[dict] = field(default_factory=list)
    max_tokens: int = 64
    question: str = ""  # what the chain set out to answer (a multi-hop retrieval's query)

    def first(self) -> Turn:
        return Turn(self._body())

    def next_turn(self, answer: str) -> Turn | None:
        self.turns_left -= 1
        if self.turns_left <= 0:
            return None
        if self.kind == "agentic":
            self.messages.append({"role": "assistant", "content": answer})
            self.messages.append({"role": "tool", "content": f"tool result: {text(self.rng, 60)}"})
            self.messages.append({"role": "user", "content": f"next step: {text(self.rng, 12)}"})
            return Turn(self._body(), think_s=self.rng.uniform(0.2, 1.0))
        # multi-hop: the next question quotes the previous answer
        self.messages = [{"role": "user", "content": f"Given: {answer}\nAnswer the follow-up: {text(self.rng, 20)}"}]
        return Turn(self._body())

    def _body(self) -> dict:
        body = {"messages": list(self.messages), "max_tokens": self.max_tokens, "ignore_eos": True}
        if self.kind == "agentic":
            # the definitions are prompt tokens either way; "none" because a stock vLLM server (no
            # --enable-auto-tool-choice) refuses "auto", the default once tools are given, with a 400,
            # and still renders the tools into the prompt for "none" (`infemu loadtest --target` any server)
            body["tools"] = TOOLS
            body["tool_choice"] = "none"
        return body


def chat(rng: random.Random) -> dict:
    return {
        "messages": [{"role": "user", "content": text(rng, rng.randint(20, 200))}],
        "max_tokens": rng.randint(64, 384),
        "ignore_eos": True,
    }


def coding(rng: random.Random) -> dict:
    code = "\n".join(f"def f{i}(x): return x * {rng.randint(1, 99)}  # {text(rng, 8)}" for i in range(150))
    return {
        "messages": [{"role": "user", "content": f"Fix the bug:\n{code}"}],
        "max_tokens": rng.randint(32, 128),
        "ignore_eos": True,
    }


def summarization(rng: random.Random) -> dict:
    return {
        "messages": [{"role": "user", "content": f"Summarize: {text(rng, rng.randint(1000, 2500))}"}],
        "max_tokens": rng.randint(100, 250),
        "ignore_eos": True,
    }


def agentic(rng: random.Random, turns: int = 5) -> Session:
    s = Session(
        "agentic",
        turns,
        rng,
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"task: {text(rng, 20)}"}],
        max_tokens=48,
    )
    return s


def multihop(rng: random.Random, hops: int = 3) -> Session:
    question = text(rng, 30)
    s = Session("multihop", hops, rng, [{"role": "user", "content": f"Question: {question}"}], max_tokens=64)
    s.question = question
    return s


class Corpus:
    """Synthetic passages; popularity follows Zipf(s=1.1) so popular passages recur across prompts."""

    def __init__(self, n: int = 500, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.passages = [f"[doc {i}] {text(rng, rng.randint(80, 200))}" for i in range(n)]
        weights = [1.0 / (i + 1) ** 1.1 for i in range(n)]
        total = sum(weights)
        self.cdf = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cdf.append(acc)

    def draw(self, rng: random.Random, k: int) -> list[str]:
        import bisect

        return [
            self.passages[min(bisect.bisect_left(self.cdf, rng.random()), len(self.passages) - 1)] for _ in range(k)
        ]


def rag(rng: random.Random, corpus: Corpus, passages: int = 4, question: str | None = None) -> dict:
    """A RAG prompt from this process's synthetic corpus (a cluster without a retriever)."""
    return rag_prompt(rng, sorted(corpus.draw(rng, passages)), question)  # retrieval order: by document id


def rag_prompt(rng: random.Random, passages: list[str], question: str | None = None) -> dict:
    """System prompt, then the passages in retrieval order, then the question: the same passages after
    the same system prompt share their KV blocks."""
    context = "\n".join(passages)
    return {
        "messages": [
            {"role": "system", "content": "Answer from the passages."},
            {"role": "user", "content": f"{context}\nQuestion: {question or text(rng, 15)}"},
        ],
        "max_tokens": rng.randint(64, 200),
        "ignore_eos": True,
    }


def with_passages(body: dict, passages: list[str]) -> dict:
    """A call's body with retrieved passages placed before its messages (a hop of a multi-hop chain)."""
    context = {"role": "system", "content": "Passages:\n" + "\n".join(passages)}
    return {**body, "messages": [context, *body["messages"]]}


WORKLOADS = ("chat", "coding", "summarization", "agentic", "multihop", "rag")
