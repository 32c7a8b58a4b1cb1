"""Tool calls in a model's reply, as the chat templates that define tools ask the model to write
them, turned into OpenAI's `tool_calls`:

    Qwen2.5 / Qwen3 / Hermes:  <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>  (any number)
    Llama 3.1 / 3.2:           {"name": "f", "parameters": {...}}                            (the whole reply)

`parse(text)` reads a finished reply; `ToolCallStream` reads one as it streams, passing text
through at once and holding back only what may be a tool call (from a "<" that could open
"<tool_call>", or a reply that starts with "{"), so a streamed reply is never buffered whole unless
it is a Llama-style call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's form)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def _call(text: str) -> ToolCall | None:
    """One call from its JSON ({"name", "arguments" or "parameters"}); None if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def parse(text: str) -> tuple[str | None, list[ToolCall]]:
    """(the reply's text outside tool calls, or None if nothing is left; the calls). A block that
    does not hold a valid call stays text."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    rest = text
    while OPEN in rest:
        before, _, after = rest.partition(OPEN)
        body, closed, rest_after = after.partition(CLOSE)
        call = _call(body.strip()) if closed else None
        if call is None:  # unclosed or not a call: text as written
            kept.append(before + OPEN)
            rest = after
            continue
        kept.append(before)
        calls.append(call)
        rest = rest_after
    kept.append(rest)
    content = "".join(kept).strip()
    if not calls and content.startswith("{"):  # Llama 3's form: the reply is the call
        call = _call(content)
        if call is not None:
            return None, [call]
    return (content or None), calls


class ToolCallStream:
    """A streamed reply split as it comes into text deltas and tool calls."""

    def __init__(self) -> None:
        self.held = ""  # text that may be (the start of) a tool call
        self.started = False  # any text seen (a reply starting with "{" is held whole)
        self.whole_json = False
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """New text of the reply: (text to pass on now, calls completed by it)."""
        if not self.started and delta.strip():
            self.started = True
            self.whole_json = delta.lstrip().startswith("{")
        if self.whole_json:
            self.held += delta
            return "", []
        self.held += delta
        out, calls = "", list[ToolCall]()
        while True:
            start = self.held.find(OPEN)
            if start < 0:
                keep = _partial_open(self.held)
                cut = len(self.held) - keep
                out, self.held = out + self.held[:cut], self.held[cut:]
                return out, calls
            end = self.held.find(CLOSE, start)
            if end < 0:  # an open tool call: everything from it waits
                out, self.held = out + self.held[:start], self.held[start:]
                return out, calls
            body = self.held[start + len(OPEN) : end]
            call = _call(body.strip())
            if call is None:
                out += self.held[: end + len(CLOSE)]
            else:
                out += self.held[:start]
                calls.append(call)
                self.calls.append(call)
            self.held = self.held[end + len(CLOSE) :]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The reply ended: what was held, as text or calls."""
        held, self.held = self.held, ""
        if self.whole_json:
            content, calls = parse(held)
            self.calls += calls
            return content or "", calls
        return held, []


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` could begin "<tool_call>"."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
