"""Locust users for LLM serving, as a library (locust-plugins style).

Every call streams; TTFT, TPOT and E2E are fired into Locust's stats as their own request
types (so Locust's CSVs and UI show them), and each request is appended to a JSONL file
(``INFEMU_REQUESTS_JSONL``, one file per Locust process) with the simulator's fields.
Configuration comes from the environment the runner sets: ``INFEMU_MODEL``, ``INFEMU_SEED``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time

import gevent
from locust import HttpUser, constant, task

from emulator.errors import openai_error_code
from loadgen import workloads

_ids = itertools.count()
_lock = threading.Lock()
_sink = None
# the longest silence a user waits for between two reads; beyond the router's own deadline (600 s by
# default, router.timeouts.requestMs) a request with no answer is recorded as lost
DEADLINE_S = float(os.environ.get("INFEMU_DEADLINE_S", "900"))


def _write(record: dict) -> None:
    global _sink
    path = os.environ.get("INFEMU_REQUESTS_JSONL")
    if not path:
        return
    with _lock:
        if _sink is None:
            _sink = open(f"{path}.{os.getpid()}", "a", encoding="utf-8")  # noqa: SIM115 - process lifetime
        _sink.write(json.dumps(record) + "\n")
        _sink.flush()


class RetrievalFailed(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class StreamingUser(HttpUser):
    """Base: ``call(body, name)`` streams one chat completion and records it; returns the answer."""

    abstract = True
    wait_time = constant(0)  # closed loop: the next call starts when the last ends (plus think time)
    retrieval: str | None = None  # where the last call's passages came from (rag: the cluster's retriever)

    def retrieve(self, query: str, k: int) -> list[dict] | None:
        """The cluster's retriever through the router; None when the cluster has none (503 no_backend).
        Locust records it as its own request type (POST /v1/retrieve)."""
        with self.client.post(
            "/v1/retrieve",
            json={"query": query, "top_k": k, "include_text": True},
            catch_response=True,
            name="retrieve",
            timeout=(10, DEADLINE_S),
        ) as resp:
            if resp.status_code == 503 and openai_error_code(resp.text, "") == "no_backend":
                resp.success()  # not a failure: this cluster has no retriever
                return None
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                raise RetrievalFailed(
                    f"retrieval failed: HTTP {resp.status_code}: {resp.text[:200]}",
                    openai_error_code(resp.text, f"http_{resp.status_code}"),
                )
            resp.success()
            return resp.json()["data"]

    def on_start(self) -> None:
        self.model = os.environ.get("INFEMU_MODEL", "")
        seed = int(os.environ.get("INFEMU_SEED", "0"))
        self.rng = random.Random(seed * 1_000_003 + next(_ids))

    def call(self, body: dict, name: str, start: float | None = None) -> str:
        """``start``: when the request began for its user (before a retrieval, say): TTFT counts from it."""
        body = {**body, "model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter() if start is None else start
        times: list[float] = []
        parts: list[str] = []
        error, usage, code = None, None, None
        try:
            with self.client.post(
                "/v1/chat/completions",
                json=body,
                stream=True,
                catch_response=True,
                name=name,
                # connect, then between two reads: past the router's own deadline the request is lost
                timeout=(10, DEADLINE_S),
            ) as resp:
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    code = openai_error_code(resp.text, f"http_{resp.status_code}")
                else:
                    done = False
                    for line in resp.iter_lines():
                        if line == b"data: [DONE]":
                            done = True
                        if not line.startswith(b"data: ") or line == b"data: [DONE]":
                            continue
                        obj = json.loads(line[6:])
                        if "error" in obj:
                            error = obj["error"].get("message", "error event")
                            code = obj["error"].get("code") or "stream_error"
                            break
                        if obj.get("usage"):
                            usage = obj["usage"]
                        for choice in obj.get("choices") or []:
                            content = (choice.get("delta") or {}).get("content")
                            if content:
                                times.append(time.perf_counter())
                                parts.append(content)
                    if not done and error is None:  # a stream must end with [DONE]
                        error, code = "the stream ended without [DONE]", "truncated"
                if error:
                    resp.failure(error)
                else:
                    resp.success()
        except Exception as exc:  # any failure ends this request with an explicit error
            error = f"{type(exc).__name__}: {exc}"
            code = "lost" if "Timeout" in type(exc).__name__ else "connection"
        self._record(name, start, times, usage, error, code)
        return "".join(parts)

    def _record(
        self, name: str, start: float, times: list[float], usage: dict | None, error: str | None, code: str | None
    ) -> None:
        fire = self.environment.events.request.fire
        end = times[-1] if times else time.perf_counter()
        n = len(times)
        ttft = (times[0] - start) * 1e3 if times else None
        tpot = (end - times[0]) / (n - 1) * 1e3 if n > 1 else None
        exc = RuntimeError(error) if error else None
        if ttft is not None:
            fire(request_type="TTFT", name=name, response_time=ttft, response_length=n, exception=exc, context={})
        if tpot is not None:
            fire(request_type="TPOT", name=name, response_time=tpot, response_length=n, exception=exc, context={})
        fire(
            request_type="E2E",
            name=name,
            response_time=(end - start) * 1e3,
            response_length=n,
            exception=exc,
            context={},
        )
        gaps = [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
        _write(
            {
                "request_id": f"{os.getpid()}-{next(_ids)}",
                "workload": name,
                "arrival_s": start,
                "first_token_s": times[0] if times else None,
                "finish_s": end,
                "ok": error is None and n > 0,
                "error": error,
                "error_code": code if error else (None if n else "empty_stream"),
                "prompt_tokens": (usage or {}).get("prompt_tokens", 0),
                "output_tokens": (usage or {}).get("completion_tokens", n),
                "ttft_ms": ttft,
                "tpot_ms": tpot,
                "e2e_ms": (end - start) * 1e3,
                "itl_max_ms": max(gaps) if gaps else None,
                **({"retrieval": self.retrieval} if self.retrieval else {}),
            }
        )


class ChatUser(StreamingUser):
    @task
    def chat(self) -> None:
        self.call(workloads.chat(self.rng), "chat")


class CodingUser(StreamingUser):
    @task
    def coding(self) -> None:
        self.call(workloads.coding(self.rng), "coding")


class SummarizationUser(StreamingUser):
    @task
    def summarize(self) -> None:
        self.call(workloads.summarization(self.rng), "summarization")


class AgenticUser(StreamingUser):
    """A session of K turns: shared system prompt, growing context, think time between turns."""

    turns = int(os.environ.get("INFEMU_AGENTIC_TURNS", "5"))

    @task
    def session(self) -> None:
        s = workloads.agentic(self.rng, self.turns)
        turn = s.first()
        while turn is not None:
            if turn.think_s:
                gevent.sleep(turn.think_s)
            answer = self.call(turn.body, "agentic")
            turn = s.next_turn(answer)


class MultiHopUser(StreamingUser):
    """A chain of hops: retrieve with the question and the last answer (from the cluster's retriever,
    when it has one), then answer with those passages; each hop's prompt carries the previous answer."""

    hops = int(os.environ.get("INFEMU_MULTIHOP_HOPS", "3"))
    top_k = int(os.environ.get("INFEMU_RAG_TOP_K", "4"))

    @task
    def chain(self) -> None:
        s = workloads.multihop(self.rng, self.hops)
        turn = s.first()
        answer = ""
        while turn is not None:
            start = time.perf_counter()
            try:
                docs = self.retrieve(f"{s.question} {answer}"[-4000:], self.top_k)
            except RetrievalFailed as exc:
                self.retrieval = "rag"
                self._record("multihop", start, [], None, str(exc), exc.code)
                return
            self.retrieval = "local" if docs is None else "rag"
            body = turn.body if docs is None else workloads.with_passages(turn.body, [d["text"] for d in docs])
            answer = self.call(body, "multihop", start)
            turn = s.next_turn(answer)


class RAGUser(StreamingUser):
    """Retrieve passages from the cluster's retriever (``POST /v1/retrieve``, a ``rag`` pool), then ask
    with them in the prompt; popular passages recur, so their KV blocks are shared. A cluster without
    a retriever answers 503 ``no_backend``: the passages then come from a synthetic corpus in this
    process, and every record says so (``retrieval: local``)."""

    corpus = workloads.Corpus()
    top_k = int(os.environ.get("INFEMU_RAG_TOP_K", "4"))

    @task
    def ask(self) -> None:
        start = time.perf_counter()
        question = workloads.text(self.rng, 15)
        try:
            docs = self.retrieve(question, self.top_k)
        except RetrievalFailed as exc:  # the request ends here, as a failed one
            self.retrieval = "rag"
            self._record("rag", start, [], None, str(exc), exc.code)
            return
        if docs is None:
            self.retrieval = "local"
            self.call(workloads.rag(self.rng, self.corpus, self.top_k, question), "rag", start)
        else:
            self.retrieval = "rag"
            self.call(workloads.rag_prompt(self.rng, [d["text"] for d in docs], question), "rag", start)


CLASSES = {
    "chat": ChatUser,
    "coding": CodingUser,
    "summarization": SummarizationUser,
    "agentic": AgenticUser,
    "multihop": MultiHopUser,
    "rag": RAGUser,
}
