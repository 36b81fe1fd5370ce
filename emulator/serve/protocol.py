"""OpenAI request parsing and response shapes (completions and chat completions).

Validation errors become ``APIError`` with OpenAI's error JSON
(``{"error": {"message", "type", "param", "code"}}``) and a 4xx status; a
handler never answers 500 for bad input.
"""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp.web_protocol import RequestPayloadError

from emulator.serve.tokens import chat_prompt, tokenize
from emulator.spec import nesting_depth


async def read_json_object(request) -> dict:
    """The request body as a JSON object, or ``APIError(400)``. JSON is UTF-8 whatever the
    Content-Type's charset claims (RFC 8259), so the charset is not consulted; a body that does
    not decompress (a false ``Content-Encoding``), is not UTF-8, nests too deep for the parser or
    holds a number past Python's 4,300-digit limit is the client's fault, never a 5xx."""
    try:
        raw = await request.read()
    except RequestPayloadError as exc:
        raise APIError(
            400, f"the request body could not be read: {exc.args[0] if exc.args else exc}", None, "invalid_body"
        ) from None
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8", None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply", None, "invalid_json") from None
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        err_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.err_type = err_type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    kind: str  # "chat" | "completion"
    model: str
    prompt_ids: list[int]
    max_tokens: int | None
    min_tokens: int = 0
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage in every chunk (vLLM)
    user: str | None = None
    kv_transfer_params: dict | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def _int(body: dict, key: str, minimum: int | None = None) -> int | None:
    if key not in body or body[key] is None:
        return None
    v = body[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"'{key}' must be an integer, got {v!r}", key, "invalid_type")
    if minimum is not None and v < minimum:
        raise APIError(400, f"'{key}' must be at least {minimum}, got {v}", key, "invalid_value")
    return v


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"'{key}' must be a boolean, got {v!r}", key, "invalid_type")
    return v


# Bounds on what a client may ask the stop check to look for: every output token is checked against
# every stop string (vLLM's own check, emulator/serve/tokens.py stop_hit), so both stay small. OpenAI
# allows 4 stop sequences; vLLM sets no limit.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
# logit_bias entries a request may carry: this emulator's own bound (vLLM sets none; the body-size limit
# already bounds the memory), which keeps the per-request check small
MAX_LOGIT_BIAS = 1024


def _stops(body: dict, vocab_size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``stop`` (a string or a list of them) and ``stop_token_ids``, as vLLM takes them."""
    stop = body.get("stop")
    if stop is None:
        strings: tuple[str, ...] = ()
    elif isinstance(stop, str):
        strings = (stop,)
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
        strings = tuple(stop)
    else:
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(strings) > MAX_STOP_STRINGS or any(not x or len(x) > MAX_STOP_CHARS for x in strings):
        raise APIError(
            400,
            f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters",
            "stop",
            "invalid_value",
        )
    ids = body.get("stop_token_ids")
    if ids is None:
        return strings, ()
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise APIError(400, "'stop_token_ids' must be a list of token ids", "stop_token_ids", "invalid_type")
    if len(ids) > MAX_STOP_TOKEN_IDS or any(t < 0 or t >= vocab_size for t in ids):
        raise APIError(
            400,
            f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} ids in [0, {vocab_size})",
            "stop_token_ids",
            "invalid_value",
        )
    return strings, tuple(ids)


# Sampling parameters leave a synthetic answer as it is, but a value vLLM refuses is refused here too
# (vllm/sampling_params.py SamplingParams._verify_args): a gateway's tests of bad input see the same 400.
# (name, lowest, highest, whether the lowest itself is allowed)
SAMPLING_RANGES = (
    ("temperature", 0.0, math.inf, True),
    ("top_p", 0.0, 1.0, False),
    ("min_p", 0.0, 1.0, True),
    ("presence_penalty", -2.0, 2.0, True),
    ("frequency_penalty", -2.0, 2.0, True),
    ("repetition_penalty", 0.0, math.inf, False),
)


def _check_sampling(body: dict) -> None:
    for key, low, high, low_ok in SAMPLING_RANGES:
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise APIError(400, f"'{key}' must be a number, got {v!r}", key, "invalid_type")
        if not ((v >= low if low_ok else v > low) and v <= high):
            bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}]"
            raise APIError(400, f"'{key}' must be in {bounds}, got {v}", key, "invalid_value")
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1):
        raise APIError(
            400, f"'top_k' must be -1 or 0 (no limit) or at least 1, got {top_k!r}", "top_k", "invalid_value"
        )
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}", "seed", "invalid_type")


def _check_logit_bias(body: dict, vocab_size: int) -> None:
    """vLLM takes ``logit_bias`` as token id -> bias (clamped to [-100, 100]) and refuses ids outside
    the vocabulary; a bias does not change the synthetic answer, a bad one is still a 400."""
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise APIError(400, f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids", "logit_bias",
                       "invalid_value")  # fmt: skip
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else None
        if token is None or not 0 <= token < vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})", "logit_bias",
                           "invalid_value")  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise APIError(400, f"logit_bias: the bias of {key} must be a number, got {value!r}", "logit_bias",
                           "invalid_type")  # fmt: skip


# vLLM's structured-output request fields (guided decoding; ``structured_outputs`` from 0.11): each
# constrains the answer's text, which the synthetic answer cannot honour
GUIDED_DECODING = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structural_tag",
                   "structured_outputs")  # fmt: skip


def _refuse_what_is_not_emulated(body: dict) -> None:
    """Parameters whose effect the emulator does not produce are refused, never silently ignored: a
    client asking for log-probabilities, several candidates, its prompt echoed, a forced tool call or
    JSON output must not get plain text."""
    logprobs = body.get("logprobs")
    if (logprobs is not None and logprobs is not False and logprobs != 0) or body.get("top_logprobs"):
        param = "logprobs" if logprobs not in (None, False, 0) else "top_logprobs"
        raise APIError(
            400, "log-probabilities are not emulated; leave logprobs and top_logprobs out", param, "unsupported"
        )
    choice = body.get("tool_choice")
    if body.get("tools") and choice not in (None, "auto", "none"):
        raise APIError(
            400,
            "forced tool calls are not emulated (the synthetic answer is text); use tool_choice 'auto' or 'none'",
            "tool_choice",
            "unsupported",
        )
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise APIError(400, "best_of is not emulated (one answer per request); leave it out or set 1", "best_of",
                       "unsupported")  # fmt: skip
    if body.get("echo") not in (None, False):
        raise APIError(400, "echo is not emulated (the answer does not repeat the prompt); leave it out", "echo",
                       "unsupported")  # fmt: skip
    if body.get("suffix") is not None:  # vLLM: "suffix is not currently supported"
        raise APIError(400, "suffix is not supported (as in vLLM); leave it out", "suffix", "unsupported")
    guided = next((k for k in GUIDED_DECODING if body.get(k) is not None), None)
    if guided is not None:
        raise APIError(
            400, f"{guided} is not emulated (the synthetic answer is unconstrained text); leave it out", guided,
            "unsupported",
        )  # fmt: skip
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise APIError(
            400,
            f"response_format {fmt.get('type')!r} is not emulated (the synthetic answer is text)",
            "response_format",
            "unsupported",
        )


# How deep a tool's JSON schema may nest: real schemas nest a few levels; the bound keeps rendering it
# (json.dumps, recursive) far from the interpreter's recursion limit, which the body's parser may
# have come close to
MAX_TOOL_NESTING = 64


def chat_tools(body: dict) -> list[dict] | None:
    """The request's tool definitions, checked as vLLM's request model checks them (an array of
    ``{"type": "function", "function": {"name": ...}}``): they are prompt tokens (``chat_prompt``)."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise APIError(
            400, "'tools' must be an array of {\"type\": \"function\", \"function\": {\"name\": ...}}", "tools",
            "invalid_value",
        )  # fmt: skip
    if nesting_depth(tools, MAX_TOOL_NESTING) > MAX_TOOL_NESTING:
        raise APIError(400, f"'tools' nests deeper than {MAX_TOOL_NESTING} levels", "tools", "invalid_value")
    return tools


def _check_tool_calls(messages: list) -> None:
    """An assistant turn's ``tool_calls``: OpenAI's shape, the arguments a JSON string (vLLM's
    request model refuses anything else)."""
    for m in messages:
        calls = m.get("tool_calls")
        if calls is None:
            continue
        if not isinstance(calls, list) or not all(
            isinstance(c, dict)
            and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments", ""), str)
            for c in calls
        ):
            raise APIError(
                400, "a message's 'tool_calls' must be [{\"function\": {\"name\": ..., \"arguments\": \"<JSON>\"}}]",
                "messages", "invalid_value",
            )  # fmt: skip


def parse_request(kind: str, body: Any, vocab_size: int) -> GenerationRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", "model", "missing_required_parameter")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise APIError(400, "only n=1 is supported", "n", "invalid_value")
    _refuse_what_is_not_emulated(body)
    _check_sampling(body)
    _check_logit_bias(body, vocab_size)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(
                400, "'messages' is required and must be a non-empty array", "messages", "missing_required_parameter"
            )
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise APIError(400, "each message needs a 'role' and 'content'", "messages", "invalid_value")
        for m in messages:  # an image or audio part would be read by a multimodal model, not dropped
            parts = m.get("content")
            if parts is not None and not isinstance(parts, (str, list)):
                raise APIError(400, "a message's 'content' must be a string or an array of content parts", "messages",
                               "invalid_value")  # fmt: skip
            for part in parts if isinstance(parts, list) else ():
                kind_of = part.get("type") if isinstance(part, dict) else None
                if kind_of != "text":
                    raise APIError(
                        400,
                        f"content part {kind_of!r} is not emulated (the emulated models read text parts only)",
                        "messages",
                        "unsupported",
                    )
                if not isinstance(part.get("text"), str):
                    raise APIError(400, "a text content part's 'text' must be a string", "messages", "invalid_value")
        _check_tool_calls(messages)
        ids = tokenize(chat_prompt(messages, chat_tools(body)), vocab_size)
        max_tokens = _int(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", 1)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = tokenize(prompt, vocab_size)
        elif (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            if any(t < 0 or t >= vocab_size for t in prompt):
                raise APIError(400, f"token ids must be in [0, {vocab_size})", "prompt", "invalid_value")
            ids = list(prompt)
        elif prompt is None:
            raise APIError(400, "'prompt' is required", "prompt", "missing_required_parameter")
        else:
            raise APIError(
                400,
                "'prompt' must be a string or a list of token ids (batches of several are not supported)",
                "prompt",
                "invalid_value",
            )
        max_tokens = _int(body, "max_tokens", 1)
    if not ids:
        raise APIError(400, "the prompt is empty", "prompt" if kind != "chat" else "messages", "invalid_value")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    kv = body.get("kv_transfer_params")
    if kv is not None and not isinstance(kv, dict):
        raise APIError(400, "'kv_transfer_params' must be an object", "kv_transfer_params", "invalid_type")
    min_tokens = _int(body, "min_tokens", 0) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise APIError(
            400, f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens", "invalid_value"
        )
    user = body.get("user")
    stop, stop_token_ids = _stops(body, vocab_size)
    return GenerationRequest(
        kind=kind,
        model=model,
        prompt_ids=ids,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=_bool(body, "ignore_eos"),
        stream=_bool(body, "stream"),
        include_usage=bool(opts.get("include_usage", False)),
        # vLLM puts the running usage in every chunk when both are set (include_continuous_usage)
        continuous_usage=bool(opts.get("include_usage", False)) and bool(opts.get("continuous_usage_stats", False)),
        user=user if isinstance(user, str) else None,
        kv_transfer_params=kv,
        stop=stop,
        stop_token_ids=stop_token_ids,
    )


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stream_chunk(
    req: GenerationRequest,
    rid: str,
    text: str | None,
    finish: str | None,
    first: bool = False,
    stop_reason: str | int | None = None,
    counts: tuple[int, int] | None = None,
) -> dict:
    """One streamed chunk; ``counts`` (prompt, completion tokens so far) adds the running usage that
    a request with ``continuous_usage_stats`` gets in every chunk."""
    chunk = _chunk(req, rid, text, finish, first, stop_reason)
    if counts is not None:
        chunk["usage"] = usage(*counts)
    return chunk


def _chunk(
    req: GenerationRequest, rid: str, text: str | None, finish: str | None, first: bool, stop_reason: str | int | None
) -> dict:
    if req.kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:  # vLLM's last chunk names what stopped it; its token chunks leave it out
            choice["stop_reason"] = stop_reason
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": req.created,
            "model": req.model,
            "choices": [choice],
        }
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}
    return {"id": rid, "object": "text_completion", "created": req.created, "model": req.model, "choices": [choice]}


_TEXT_SLOT = "\x00infemu-text\x00"  # JSON-escaped, it cannot occur in a serialised chunk by accident


def token_chunk_frame(req: GenerationRequest, rid: str) -> tuple[bytes, bytes]:
    """One streamed token's SSE event, split around its JSON-encoded text: ``head + text + tail``
    is byte for byte what serialising ``stream_chunk(req, rid, text, None)`` gives, without
    building and encoding a dict per token (the stream's hot path)."""
    event = b"data: " + json.dumps(stream_chunk(req, rid, _TEXT_SLOT, None), separators=(",", ":")).encode() + b"\n\n"
    head, tail = event.split(json.dumps(_TEXT_SLOT).encode())
    return head, tail


def with_usage(tail: bytes, prompt: int, completion: int) -> bytes:
    """A token event's tail (``token_chunk_frame``) with the running usage added to the chunk, as a
    request with ``continuous_usage_stats`` gets it."""
    running = json.dumps(usage(prompt, completion), separators=(",", ":")).encode()
    return tail[: -len(b"}\n\n")] + b',"usage":' + running + b"}\n\n"


@functools.lru_cache(maxsize=4096)
def json_text(text: str) -> bytes:
    """A token's text as a JSON string (synthetic texts come from a small vocabulary: cached)."""
    return json.dumps(text).encode()


def usage_chunk(req: GenerationRequest, rid: str, prompt: int, completion: int) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": req.created,
        "model": req.model,
        "choices": [],
        "usage": usage(prompt, completion),
    }


def full_response(
    req: GenerationRequest,
    rid: str,
    text: str,
    finish: str,
    prompt: int,
    completion: int,
    kv_params: dict | None = None,
    stop_reason: str | int | None = None,
) -> dict:
    if req.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": stop_reason,
        }
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": req.created,
            "model": req.model,
            "choices": [choice],
            "usage": usage(prompt, completion),
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}
        body = {
            "id": rid,
            "object": "text_completion",
            "created": req.created,
            "model": req.model,
            "choices": [choice],
            "usage": usage(prompt, completion),
        }
    if kv_params is not None:
        body["kv_transfer_params"] = kv_params
    return body
