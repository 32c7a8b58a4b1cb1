"""The HTTP APIs' bodies, in and out, as plain functions (no server here, so they are tested as
functions): OpenAI's chat completions and completions, Anthropic's messages.

    parse_chat(body, model_id) -> Job       a checked request: prompt, SamplingParams, n, stream, ...
    chat_response(job, results) -> dict     the JSON of a finished request
    chat_chunk(job, index, delta, ...)      one streamed event's JSON

Every field a client sends is either used or refused (`ApiError`, status 400, naming the field):
a parameter silently ignored would make a client believe it had an effect. The few fields that
only label a request (`user`, `metadata`) are accepted and have no effect on the reply, as on the
hosted APIs.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..batch_cache import RING_SLACK
from ..engine import GenerationResult
from ..generate import check_utf8
from ..metrics import RequestMetrics
from ..responses import GenerationResponse
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from . import tools

MAX_N = 8  # choices per request: each is a row of the batch
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
LABELS = {"user", "metadata"}  # accepted, no effect on the reply (they label the request)


class ApiError(Exception):
    """A request the server refuses: the HTTP status, OpenAI's error type, the field at fault."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            503: "overloaded_error",
        }.get(status, "api_error")

    def openai(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        }

    def anthropic(self) -> dict:
        return {"type": "error", "error": {"type": self.kind, "message": self.message}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class Job:
    """One checked request: what to generate and how to answer."""

    api: str  # "chat", "completions" or "messages"
    model: str
    prompt: Any  # text, or chat messages (through the model's chat template)
    chat: bool
    params: SamplingParams
    max_tokens: int | None  # None: the model's context decides
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: not asked; else the alternatives per token (0..20)
    echo: bool = False
    tools: list[dict] | None = None  # for the chat template; the reply is read for calls
    draft_default: bool = False  # neither prompt lookup asked nor `draft: false`: the server's
    # draft model, if it has one
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def params_for(self, index: int) -> SamplingParams:
        """Choice `index`'s sampling: the request's, its seed moved on by the index so n choices
        with a seed are n different (and each reproducible) draws."""
        if index == 0 or self.params.seed is None:
            return self.params
        from dataclasses import replace

        return replace(self.params, seed=(self.params.seed + index) % 2**63)


# -- reading ---------------------------------------------------------------------------------------


def _take(body: dict, known: set[str], api: str) -> None:
    unknown = sorted(set(body) - known - LABELS)
    if unknown:
        raise bad(f"{unknown[0]!r} is not a parameter this server takes on {api}", unknown[0])


def _number(body: dict, name: str, default, low=None, high=None, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise bad(f"{name} must be {kind}, got {value!r}", name)
    if isinstance(value, int) and abs(value) >= 2**63:  # float() of it would overflow
        raise bad(f"{name} is out of range", name)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise bad(f"{name} must be in {span}, got {value!r}", name)
    return value


def _stops(body: dict, name: str) -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad(f"{name} must be a non-empty string or a list of them, got {value!r}", name)
    if len(stops) > 16:
        raise bad(f"{name}: at most 16 stop strings, got {len(stops)}", name)
    return tuple(stops)


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"logit_bias must map token ids to biases, got {value!r}", "logit_bias")
    bias = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad(f"logit_bias: {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad(f"logit_bias: token {token} is not in the vocabulary", "logit_bias")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise bad(f"logit_bias: {key}: the bias must be a number", "logit_bias")
        if not -100 <= amount <= 100:
            raise bad(f"logit_bias: {key}: the bias must be in -100..100", "logit_bias")
        bias[token] = float(amount)
    return bias


def _sampling(body: dict, tokenizer: Tokenizer, stop_field: str = "stop") -> dict:
    """SamplingParams' fields from the OpenAI names (and the extensions every local server
    takes: top_k, min_p, repetition_penalty)."""
    return {
        "temperature": float(_number(body, "temperature", 1.0, 0, 2)),
        "top_p": float(_number(body, "top_p", 1.0, 0, 1)) or 1e-9,
        "top_k": _number(body, "top_k", 0, 0, 2**31 - 1, integer=True),
        "min_p": float(_number(body, "min_p", 0.0, 0, 1)),
        "presence_penalty": float(_number(body, "presence_penalty", 0.0, -2, 2)),
        "frequency_penalty": float(_number(body, "frequency_penalty", 0.0, -2, 2)),
        "repetition_penalty": float(_number(body, "repetition_penalty", 1.0, 1e-6, 100)),
        "seed": _number(body, "seed", None, 0, 2**63 - 1, integer=True),
        "stop": _stops(body, stop_field),
        "logit_bias": _logit_bias(body, tokenizer.vocab_size),
        "ignore_eos": _flag(body, "ignore_eos"),
        # speculative decoding (mlxinfer's extension): the same tokens, sooner where the reply
        # copies the prompt (prompt lookup) or a draft model guesses it
        "speculation": _speculation(body),
        "num_draft": _number(body, "num_draft", 4, 1, RING_SLACK, integer=True),
        "lookup_ngram": _number(body, "lookup_ngram", 3, 1, MAX_LOOKUP_NGRAM, integer=True),
        "draft_default": body.get("draft") is None and not _flag(body, "prompt_lookup"),
    }


# the request fields of speculative decoding
SPECULATION = ("prompt_lookup", "draft", "num_draft", "lookup_ngram")
# prompt lookup's longest suffix (past a few tokens a longer one adds nothing)
MAX_LOOKUP_NGRAM = 64


def _speculation(body: dict) -> str | None:
    """SamplingParams.speculation from `prompt_lookup` and `draft` (the server's draft model:
    a server started with --draft-model uses it unless `draft` is false; see Job.draft_default)."""
    lookup, draft = _flag(body, "prompt_lookup"), _flag(body, "draft")
    if lookup and draft:
        raise bad("prompt_lookup and draft: choose one proposer", "draft")
    return "prompt-lookup" if lookup else "draft" if draft else None


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {value!r}", name)
    return value


def _max_tokens(body: dict, *names: str) -> int | None:
    for name in names:
        if body.get(name) is not None:
            return _number(body, name, None, 1, integer=True)
    return None


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad("stream_options is only for stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad(f"stream_options takes include_usage only, got {options!r}", "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad("stream_options.include_usage must be true or false", "stream_options")
    return stream, usage


def check_model(body: dict, model_id: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required: the id GET /v1/models lists", "model")
    if model != model_id:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {model_id!r}")
    return model


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined); UTF-8 text (JSON's
    escapes can make a lone surrogate, which no tokenizer takes)."""
    text = _joined_text(content, where)
    try:
        check_utf8(text, where)
    except ValueError as e:
        raise bad(str(e), "messages") from None
    return text


def _joined_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where}[{j}]: content of type {kind!r} is not supported (text only)")
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}].text must be a string")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where} must be a string or a list of text parts, got {type(content).__name__}")


CHAT_FIELDS = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "seed",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "n",
    "stream",
    "stream_options",
    "response_format",
    "ignore_eos",  # vLLM's extension: generate exactly max_tokens (benchmarks)
    "prompt_lookup",  # mlxinfer's: speculative decoding by prompt lookup
    "draft",  # or by the server's draft model (--draft-model)
    "num_draft",
    "lookup_ngram",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}


def chat_prelude(
    body: Any, fields: set[str], api: str, model_id: str, tokenizer: Tokenizer, param: str
) -> str:
    """What every route through the chat template checks first: a JSON object of the route's
    fields naming the model served, which has a chat template (else `param` is at fault). The
    model's id."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    _take(body, fields, api)
    model = check_model(body, model_id)
    if not tokenizer.chat_template:
        raise bad("this model has no chat template: use /v1/completions", param)
    return model


def parse_chat(body: Any, model_id: str, tokenizer: Tokenizer) -> Job:
    """POST /v1/chat/completions' body, checked."""
    model = chat_prelude(body, CHAT_FIELDS, "/v1/chat/completions", model_id, tokenizer, "messages")
    messages = _chat_messages(body.get("messages"))
    tools = _tools(body, tokenizer)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad("response_format: only {'type': 'text'} is supported", "response_format")
    sampling = _sampling(body, tokenizer)
    logprobs = _flag(body, "logprobs")
    top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not logprobs:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    stream, usage = _stream(body)
    job = _job(
        "chat",
        model,
        messages,
        True,
        sampling,
        _max_tokens(body, "max_completion_tokens", "max_tokens"),
        _number(body, "n", 1, 1, MAX_N, integer=True),
        stream,
        usage,
        (top or 0) if logprobs else None,
    )
    job.tools = tools
    return job


def _chat_messages(raw: Any) -> list[dict]:
    """OpenAI's messages as the chat template takes them (transformers' conventions): text
    content; an assistant's tool calls with their arguments as objects; tool results."""
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty list", "messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"messages[{i}].role {role!r} is not supported", "messages")
        allowed = {"role", "content", "name"} | {
            "assistant": {"tool_calls", "refusal"},
            "tool": {"tool_call_id"},
        }.get(role, set())
        extra = sorted(set(message) - allowed)
        if extra:
            raise bad(f"messages[{i}].{extra[0]} is not supported", "messages")
        calls = message.get("tool_calls")
        content = message.get("content")
        if content is None and role == "assistant" and calls:
            content = ""
        out: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": _text_content(content, f"messages[{i}].content"),
        }
        if calls is not None:
            out["tool_calls"] = _template_calls(calls, f"messages[{i}].tool_calls")
        if "name" in message:  # some templates write the speaker's name
            if not isinstance(message["name"], str):
                raise bad(f"messages[{i}].name must be a string", "messages")
            out["name"] = message["name"]
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise bad(f"messages[{i}].tool_call_id must be a string", "messages")
            out["tool_call_id"] = message["tool_call_id"]
        messages.append(out)
    return messages


def _template_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool calls for the template: {"type", "function": {"name",
    "arguments": an object}} (templates write the arguments with tojson)."""
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list", "messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad(f"{where}[{j}] must be {{'type': 'function', 'function': {{'name', ...}}}}")
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            raise bad(f"{where}[{j}].function.arguments is not JSON", "messages") from None
        out.append(
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return out


def _tools(body: dict, tokenizer: Tokenizer) -> list[dict] | None:
    """The request's tools for the chat template (None: none, or tool_choice "none")."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and parallel is not True:
        raise bad(
            "parallel_tool_calls: only true (the model may write several calls; nothing stops it)",
            "parallel_tool_calls",
        )
    if choice not in (None, "auto", "none"):
        raise bad(
            "tool_choice: only 'auto' and 'none' are supported (forcing a call needs "
            "constrained decoding, which this server does not do)",
            "tool_choice",
        )
    if tools is None:
        if choice is not None:
            raise bad("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict)
        and t.get("type") == "function"
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise bad(
            "tools must be a list of {'type': 'function', 'function': {'name', ...}}", "tools"
        )
    if choice == "none" or not tools:  # nothing offered: any template will do
        return None
    if "tools" not in (tokenizer.chat_template or ""):
        raise bad("this model's chat template does not take tools", "tools")
    return tools


COMPLETION_FIELDS = CHAT_FIELDS - {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS |= {"prompt", "echo"}
COMPLETION_FIELDS -= {"response_format", "tools", "tool_choice", "parallel_tool_calls"}


def parse_completion(body: Any, model_id: str, tokenizer: Tokenizer) -> Job:
    """POST /v1/completions' body, checked: one prompt (text or token ids)."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    _take(body, COMPLETION_FIELDS, "/v1/completions")
    model = check_model(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        if any(isinstance(t, bool) or not 0 <= t < tokenizer.vocab_size for t in prompt):
            raise bad("prompt: token ids must be in the vocabulary", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be a non-empty string or a list of token ids (one prompt)", "prompt")
    logprobs = _number(body, "logprobs", None, 0, 5, integer=True)  # the legacy API's limit
    echo = _flag(body, "echo")
    if echo and not isinstance(prompt, str):
        raise bad("echo takes a text prompt (not token ids)", "echo")
    stream, usage = _stream(body)
    job = _job(
        "completions",
        model,
        prompt,
        False,
        _sampling(body, tokenizer),
        _max_tokens(body, "max_tokens") or 16,  # the API's default
        _number(body, "n", 1, 1, MAX_N, integer=True),
        stream,
        usage,
        logprobs,
    )
    job.echo = echo
    return job


MESSAGES_FIELDS = {
    "model",
    "messages",
    "system",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "stream",
    "prompt_lookup",  # (mlxinfer's extension, as in CHAT_FIELDS)
    "draft",
    "num_draft",
    "lookup_ngram",
}


def anthropic_messages(body: Any, tokenizer: Tokenizer, api: str) -> list[dict]:
    """Anthropic's `system` and `messages` as chat messages for the template."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty list", "messages")
    messages = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _text_content(system, "system")})
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise bad(f"messages.{i}.role must be 'user' or 'assistant'", "messages")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise bad(f"messages.{i}.{extra[0]} is not supported", "messages")
        content = _text_content(message.get("content"), f"messages.{i}.content")
        messages.append({"role": message["role"], "content": content})
    if not tokenizer.chat_template:
        raise bad(f"this model has no chat template, which {api} needs", "messages")
    return messages


def parse_messages(body: Any, model_id: str, tokenizer: Tokenizer) -> Job:
    """POST /v1/messages' body (Anthropic Messages), checked."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    _take(body, MESSAGES_FIELDS, "/v1/messages")
    model = check_model(body, model_id)
    messages = anthropic_messages(body, tokenizer, "/v1/messages")
    _number(body, "temperature", 1.0, 0, 1)  # Anthropic's range
    if body.get("max_tokens") is None:
        raise bad("max_tokens is required", "max_tokens")
    sampling = _sampling(
        {k: body[k] for k in ("temperature", "top_p", "top_k", *SPECULATION) if k in body}
        | {"stop_sequences": body.get("stop_sequences"), "ignore_eos": False},
        tokenizer,
        "stop_sequences",
    )
    stream = _flag(body, "stream")
    return _job(
        "messages", model, messages, True, sampling, _max_tokens(body, "max_tokens"), 1, stream
    )


def _job(api, model, prompt, chat, sampling, max_tokens, n, stream, usage=False, logprobs=None):
    draft_default = sampling.pop("draft_default")
    try:
        params = SamplingParams(
            **sampling,
            logprobs=0 if logprobs is None else max(1, logprobs),  # 0: the chosen token's only
            **({"max_tokens": max_tokens} if max_tokens is not None else {}),
        )
    except ValueError as e:
        raise bad(str(e), str(e).split(" ")[0]) from None
    job = Job(api, model, prompt, chat, params, max_tokens, n, stream, usage, logprobs)
    job.draft_default = draft_default
    return job


# -- writing ---------------------------------------------------------------------------------------

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
STOP_REASON = {"eos": "end_turn", "stop": "stop_sequence", "length": "max_tokens"}


def anthropic_usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict:
    """Anthropic counts the prompt tokens read from a cache apart from the others."""
    return {
        "input_tokens": prompt_tokens - cached,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cached,
    }


def matched_stop(tokenizer: Tokenizer, job: Job, tokens: list[int], reason: str | None):
    """Which of the request's stop strings ended the reply (Anthropic's `stop_sequence`): the
    one found first in the generated tokens' text (the reply returned stops before it)."""
    if reason != "stop" or not job.params.stop:
        return None
    text = tokenizer.decode(tokens)
    found = [(text.find(s), i, s) for i, s in enumerate(job.params.stop) if s in text]
    return min(found)[2] if found else None


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def metrics_extension(metrics: RequestMetrics | None) -> dict | None:
    """Our per-request measurements, beside the API's fields (clients ignore what they do not
    know)."""
    if metrics is None:
        return None
    return {
        "ttft_ms": round(metrics.ttft_ms, 3),
        "prefill_tps": round(metrics.prefill_tps, 3),
        "decode_tps": round(metrics.decode_tps, 3),
        "queue_ms": round(metrics.queue_ms, 3),
        "e2e_ms": round(metrics.e2e_ms, 3),
        "peak_memory_mb": round(metrics.peak_memory_mb, 3),
        "draft_tokens": metrics.draft_tokens,  # speculative decoding: proposed
        "accepted_draft_tokens": metrics.accepted_draft_tokens,
    }


def _token_entry(tokenizer: Tokenizer, token: int, logprob: float) -> dict:
    text = tokenizer.token_text(token)
    raw = tokenizer.token_bytes(token)
    return {
        "token": text,
        "logprob": logprob,
        "bytes": list(raw if raw is not None else text.encode("utf-8")),
    }


def chat_logprobs(tokenizer: Tokenizer, responses: list[GenerationResponse], top: int) -> dict:
    """OpenAI's chat `logprobs`: each token, its logprob and bytes, and the `top` alternatives."""
    content = []
    for r in responses:
        if r.token < 0 or r.logprobs is None:
            continue
        entry = _token_entry(tokenizer, r.token, r.logprobs.logprob)
        entry["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in r.logprobs.top[:top]]
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    tokenizer: Tokenizer, responses: list[GenerationResponse], top: int, offset: int = 0
) -> dict:
    """The completions API's legacy `logprobs`: tokens, token_logprobs, top_logprobs (a dict per
    token), text_offset (each token's start in the completion's text, from `offset`)."""
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for r in responses:
        if r.token < 0 or r.logprobs is None:
            continue
        text = tokenizer.token_text(r.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(r.logprobs.logprob)
        out["top_logprobs"].append(
            {tokenizer.token_text(t): lp for t, lp in r.logprobs.top[:top]} if top else None
        )
        out["text_offset"].append(offset)
        offset += len(r.text)
    return out


@dataclass
class Choice:
    """One finished choice: its responses (the tokens) and result."""

    responses: list[GenerationResponse]
    result: GenerationResult
    prompt_tokens: int


def response_body(job: Job, choices: list[Choice], tokenizer: Tokenizer) -> dict:
    """The JSON of a finished (non-streamed) request, in the API it came by."""
    first = choices[0]
    cached = first.result.metrics.cached_prompt_tokens if first.result.metrics else 0
    completion = sum(len(c.result.tokens) for c in choices)
    if job.api == "messages":
        result = first.result
        return {
            "id": f"msg_{job.id}",
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": [{"type": "text", "text": result.text}],
            "stop_reason": STOP_REASON.get(result.finish_reason, "end_turn"),
            "stop_sequence": matched_stop(tokenizer, job, result.tokens, result.finish_reason),
            "usage": anthropic_usage(first.prompt_tokens, len(result.tokens), cached),
            "metrics": metrics_extension(result.metrics),
        }
    out: list[dict] = []
    for index, choice in enumerate(choices):
        result = choice.result
        item: dict[str, Any] = {"index": index, "finish_reason": FINISH.get(result.finish_reason)}
        if job.api == "chat":
            item["message"] = {"role": "assistant", "content": result.text}
            if job.tools and result.finish_reason in ("eos", "stop"):  # not a call cut short
                content, calls = tools.parse(result.text)
                if calls:
                    item["message"] = {
                        "role": "assistant",
                        "content": content,
                        "tool_calls": [call.openai() for call in calls],
                    }
                    item["finish_reason"] = "tool_calls"
            item["logprobs"] = (
                chat_logprobs(tokenizer, choice.responses, job.logprobs or 0)
                if job.logprobs is not None
                else None
            )
        else:
            prefix = job.prompt if job.echo and isinstance(job.prompt, str) else ""
            item["text"] = prefix + result.text
            item["logprobs"] = (
                completion_logprobs(tokenizer, choice.responses, job.logprobs, len(prefix))
                if job.logprobs is not None
                else None
            )
        out.append(item)
    return {
        "id": f"{'chatcmpl' if job.api == 'chat' else 'cmpl'}-{job.id}",
        "object": "chat.completion" if job.api == "chat" else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": out,
        "usage": usage(first.prompt_tokens, completion, cached),
        "metrics": metrics_extension(first.result.metrics),
    }


def chunk(job: Job, choices: list[dict], usage_: dict | None = None) -> dict:
    """One streamed event of the OpenAI APIs."""
    body: dict[str, Any] = {
        "id": f"{'chatcmpl' if job.api == 'chat' else 'cmpl'}-{job.id}",
        "object": "chat.completion.chunk" if job.api == "chat" else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def delta(
    job: Job,
    index: int,
    response: GenerationResponse | None,
    tokenizer: Tokenizer,
    role: bool = False,
    offset: int = 0,
    text: str | None = None,
    tool_calls: list[dict] | None = None,
    made_calls: bool = False,
) -> dict:
    """A choice's part of a streamed event: the role first (chat), then text as it comes (`text`
    instead of the response's when tool calls are read out of it), `tool_calls` completed, the
    finish reason on the last ("tool_calls" when the reply `made_calls`)."""
    if text is None:
        text = "" if response is None else response.text
    finish = None if response is None else FINISH.get(response.finish_reason or "")
    if finish == "stop" and made_calls:  # (a reply cut at max tokens stays "length")
        finish = "tool_calls"
    logprobs = None
    if job.logprobs is not None and response is not None and response.token >= 0:
        logprobs = (
            chat_logprobs(tokenizer, [response], job.logprobs)
            if job.api == "chat"
            else completion_logprobs(tokenizer, [response], job.logprobs, offset)
        )
    if job.api == "chat":
        part: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            part["content"] = text
        if tool_calls:
            part["tool_calls"] = tool_calls
        return {"index": index, "delta": part, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
