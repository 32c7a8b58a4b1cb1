"""OpenAI's Responses API, `POST /v1/responses` (what Codex and the newer OpenAI SDK examples
speak), on the same engine as /v1/chat/completions.

    {"model", "input": "text" | [items], "instructions", "max_output_tokens", "temperature",
     "top_p", "tools": [{"type": "function", "name", "parameters"}], "stream": true}

`instructions` and `input` become chat messages through the model's chat template: a string is
one user message; items are messages ({"role", "content": text or input_text/output_text
parts}), the model's earlier tool calls ({"type": "function_call", "call_id", "name",
"arguments"}) and their results ({"type": "function_call_output", "call_id", "output"}). The
reply's `output` is a message item (its text, outside any tool calls) and a function_call item
per call read out of the text (tools.py). Streamed, it is Responses' typed events
(response.created ... response.output_text.delta ... response.completed), each with its
sequence_number. Stateless: `previous_response_id` and `store: true` are refused, naming them.
"""

from __future__ import annotations

import json
from typing import Any

from ..tokenizer import Tokenizer
from . import tools as tool_calls
from .protocol import (
    SPECULATION,
    ApiError,
    Job,
    _flag,
    _job,
    _max_tokens,
    _sampling,
    _text_content,
    _tools,
    bad,
    chat_prelude,
    metrics_extension,
)

FIELDS = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "top_k",  # (the extensions every local server takes)
    "min_p",
    "seed",
    "prompt_lookup",  # (mlxinfer's extension: speculative decoding)
    "draft",
    "num_draft",
    "lookup_ngram",
    "stream",
    "store",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "truncation",
}
TEXT_PARTS = {"input_text", "output_text", "text"}


def parse(body: Any, model_id: str, tokenizer: Tokenizer) -> Job:
    """POST /v1/responses' body, checked."""
    model = chat_prelude(body, FIELDS, "/v1/responses", model_id, tokenizer, "input")
    if body.get("store") not in (None, False):
        raise bad("store: this server keeps no responses; send store: false", "store")
    if body.get("text") not in (None, {"format": {"type": "text"}}):
        raise bad("text: only {'format': {'type': 'text'}} is supported", "text")
    if body.get("truncation") not in (None, "disabled"):
        raise bad(
            "truncation: only 'disabled' (a prompt past the context is refused)", "truncation"
        )
    messages = _messages(body)
    offered = _function_tools(body.get("tools"))
    tools = _tools(
        {
            "tools": offered,
            "tool_choice": body.get("tool_choice"),
            "parallel_tool_calls": body.get("parallel_tool_calls"),
        },
        tokenizer,
    )
    sampling = _sampling(
        {
            k: body[k]
            for k in ("temperature", "top_p", "top_k", "min_p", "seed", *SPECULATION)
            if k in body
        },
        tokenizer,
    )
    stream = _flag(body, "stream")
    job = _job(
        "responses",
        model,
        messages,
        True,
        sampling,
        _max_tokens(body, "max_output_tokens"),
        1,
        stream,
    )
    job.tools = tools
    return job


def _messages(body: dict) -> list[dict]:
    """`instructions` and `input` as the chat template's messages."""
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        messages.append({"role": "system", "content": _text_content(instructions, "instructions")})
    raw = body.get("input")
    if isinstance(raw, str):
        return messages + [{"role": "user", "content": _text_content(raw, "input")}]
    if not isinstance(raw, list) or not raw:
        raise bad("input must be a string or a non-empty list of items", "input")
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise bad(f"{where}.role {role!r} is not supported", "input")
            text = _text_content(_as_text_parts(item.get("content"), where), f"{where}.content")
            messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            call = _call_item(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # several calls of one turn: one message
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad(f"{where}.call_id must be a string", "input")
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output)
            content = _text_content(output, f"{where}.output")
            messages.append({"role": "tool", "content": content, "tool_call_id": item["call_id"]})
        else:
            raise bad(f"{where}: items of type {kind!r} are not supported", "input")
    return messages


def _as_text_parts(content: Any, where: str) -> Any:
    """Responses' content parts (input_text, output_text) as chat's text parts."""
    if not isinstance(content, list):
        return content
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise bad(f"{where}.content[{j}]: parts of type {kind!r} are not supported (text only)")
        parts.append({"type": "text", "text": part.get("text")})
    return parts


def _call_item(item: dict, where: str) -> dict:
    name, arguments = item.get("name"), item.get("arguments", "{}")
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise bad(f"{where}: a function_call needs a name and its arguments as a string", "input")
    try:
        parsed = json.loads(arguments)
    except ValueError:
        raise bad(f"{where}.arguments is not JSON", "input") from None
    return {
        "id": item.get("call_id"),
        "type": "function",
        "function": {"name": name, "arguments": parsed},
    }


def _function_tools(tools: Any) -> list[dict] | None:
    """Responses' flat function tools as chat's ({"type", "function": {...}})."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad(
                f"tools[{i}]: tools of type {kind!r} are not supported (function only)", "tools"
            )
        if not isinstance(tool.get("name"), str):
            raise bad(f"tools[{i}].name must be a string", "tools")
        function = {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool
        }
        out.append({"type": "function", "function": function})
    return out


# -- writing ---------------------------------------------------------------------------------------


def usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


def message_item(job: Job, text: str, status: str = "completed") -> dict:
    return {
        "id": f"msg_{job.id}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if text else [],
    }


def call_item(call: tool_calls.ToolCall) -> dict:
    return {
        "id": f"fc_{call.id.removeprefix('call_')}",
        "type": "function_call",
        "status": "completed",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    }


def body(
    job: Job,
    output: list[dict],
    finish_reason: str | None,
    usage_: dict | None,
    metrics=None,
    status: str | None = None,
) -> dict:
    """The response object: finished ("completed", or "incomplete" when cut at the token limit),
    or `status` given ("in_progress" while streaming)."""
    if status is None:
        status = "incomplete" if finish_reason == "length" else "completed"
    return {
        "id": f"resp_{job.id}",
        "object": "response",
        "created_at": job.created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": None,
        "max_output_tokens": job.max_tokens,
        "model": job.model,
        "output": output,
        "parallel_tool_calls": True,
        "temperature": job.params.temperature,
        "top_p": job.params.top_p,
        "tool_choice": "auto",
        "tools": [],
        "store": False,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "usage": usage_,
        "metrics": metrics_extension(metrics),
    }


def response_body(
    job: Job, text: str, finish_reason: str | None, prompt_tokens: int, tokens: int, metrics
) -> dict:
    """A finished, non-streamed reply."""
    calls: list[tool_calls.ToolCall] = []
    if job.tools and finish_reason in ("eos", "stop"):  # (a call cut short stays text)
        content, calls = tool_calls.parse(text)
        text = content or ""
    output = ([message_item(job, text)] if text or not calls else []) + [
        call_item(c) for c in calls
    ]
    cached = metrics.cached_prompt_tokens if metrics is not None else 0
    return body(job, output, finish_reason, usage(prompt_tokens, tokens, cached), metrics)


class EventWriter:
    """Responses' streamed events for one reply, in order, each numbered."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.sequence = 0
        self.reader = tool_calls.ToolCallStream() if job.tools else None
        self.text = ""  # the message's text so far
        self.message_open = False
        self.pending = ""  # whitespace held back (tools offered: it may only separate calls)
        self.output: list[dict] = []  # finished items

    def event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[dict]:
        started = body(self.job, [], None, None, status="in_progress")
        return [
            self.event("response.created", response=started),
            self.event("response.in_progress", response=started),
        ]

    def _open_message(self) -> list[dict]:
        self.message_open = True
        index = len(self.output)
        return [
            self.event(
                "response.output_item.added",
                output_index=index,
                item=message_item(self.job, "", status="in_progress"),
            ),
            self.event(
                "response.content_part.added",
                item_id=f"msg_{self.job.id}",
                output_index=index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            ),
        ]

    def _close_message(self) -> list[dict]:
        self.message_open = False
        index = len(self.output)
        item = message_item(self.job, self.text)
        part = {"type": "output_text", "text": self.text, "annotations": []}
        events = [
            self.event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=self.text,
            ),
            self.event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]
        self.output.append(item)
        return events

    def delta(self, text: str, finished: bool) -> list[dict]:
        """The events for new text of the reply (tool calls read out of it when tools were
        offered); `finished` when it is the reply's last."""
        calls: list[tool_calls.ToolCall] = []
        if self.reader is not None:
            text, calls = self.reader.feed(text)
            if finished:
                more, more_calls = self.reader.finish()
                text, calls = text + more, calls + more_calls
            # whitespace around calls is not a message (as tools.parse reads a whole reply):
            # it waits for text to follow it
            text, self.pending = self.pending + text, ""
            if not text.strip():
                text, self.pending = "", "" if calls or finished else text
        events: list[dict] = []
        if text:
            if not self.message_open:
                events += self._open_message()
            self.text += text
            events.append(
                self.event(
                    "response.output_text.delta",
                    item_id=f"msg_{self.job.id}",
                    output_index=len(self.output),
                    content_index=0,
                    delta=text,
                )
            )
        for call in calls:
            if self.message_open:
                events += self._close_message()
            item = call_item(call)
            index = len(self.output)
            events.append(
                self.event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "arguments": ""},
                )
            )
            events.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=call.arguments,
                )
            )
            events.append(self.event("response.output_item.done", output_index=index, item=item))
            self.output.append(item)
        return events

    def finish(
        self, finish_reason: str | None, prompt_tokens: int, tokens: int, metrics
    ) -> list[dict]:
        events = self._close_message() if self.message_open else []
        if not self.output:  # an empty reply is still a message
            events += self._open_message() + self._close_message()
        cached = metrics.cached_prompt_tokens if metrics is not None else 0
        done = body(
            self.job, self.output, finish_reason, usage(prompt_tokens, tokens, cached), metrics
        )
        kind = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
        return events + [self.event(kind, response=done)]

    def failed(self, error: ApiError) -> dict:
        failed = body(self.job, self.output, None, None, status="failed")
        failed["error"] = {"code": error.kind, "message": error.message}
        return self.event("response.failed", response=failed)
