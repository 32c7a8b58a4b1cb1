"""The server's bodies as plain functions: tool calls read out of replies (whole and streamed, in
the forms Qwen/Hermes and Llama 3 templates ask for), and requests refused with the field named."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from mlxinfer.server import protocol, tools
from mlxinfer.server.protocol import ApiError

QWEN = 'I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO = (
    '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
    '<tool_call>{"name": "b", "arguments": "{\\"y\\": [2, 3]}"}</tool_call>'
)
LLAMA = '{"name": "get_time", "parameters": {"zone": "UTC"}}'


@pytest.mark.parametrize(
    "text,content,calls",
    [
        (QWEN, "I will look.", [("get_weather", {"city": "Paris"})]),
        (TWO, None, [("a", {"x": 1}), ("b", {"y": [2, 3]})]),
        (LLAMA, None, [("get_time", {"zone": "UTC"})]),
        ("Paris is in France.", "Paris is in France.", []),
        ("<tool_call>{not json}</tool_call> done", "<tool_call>{not json}</tool_call> done", []),
        ('<tool_call>{"name": "a"', '<tool_call>{"name": "a"', []),  # cut at max tokens
        ('{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    ],
)
def test_tool_calls_are_read_out_of_a_reply(text, content, calls):
    got_content, got = tools.parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.openai()["type"] == "function" and c.id.startswith("call_") for c in got)


@pytest.mark.parametrize("text", [QWEN, TWO, LLAMA, "Paris is in France.", "a < b <tool_c x"])
def test_a_streamed_reply_gives_the_same_text_and_calls_in_any_pieces(text):
    """Fed in random pieces (a tag split anywhere), the stream passes on the same text and the
    same calls as the whole reply parsed; text before a call is not held back."""
    whole_content, whole_calls = tools.parse(text)
    rng = random.Random(0)
    for _ in range(20):
        stream, out, calls, i = tools.ToolCallStream(), "", [], 0
        while i < len(text):
            n = rng.randint(1, 7)
            piece, more = stream.feed(text[i : i + n])
            out, calls, i = out + piece, calls + more, i + n
        piece, more = stream.finish()
        out, calls = out + piece, calls + more
        assert (out.strip() or None) == whole_content
        assert [(c.name, c.arguments) for c in calls] == [
            (c.name, c.arguments) for c in whole_calls
        ]
    stream = tools.ToolCallStream()
    assert stream.feed("I will look.\n<tool")[0] == "I will look.\n"  # only "<tool" waits


TOKENIZER = SimpleNamespace(chat_template="{{ messages }}", vocab_size=100)


def chat(**fields):
    return protocol.parse_chat(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}, "m", TOKENIZER
    )


@pytest.mark.parametrize(
    "fields,param,words",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
         "does not take tools"),
        ({"logit_bias": {"100": 1}}, "logit_bias", "not in the vocabulary"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "-100..100"),
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
        ({"stop": ["a"] * 17}, "stop", "at most 16"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only for stream"),
        ({"seed": -1}, "seed", "seed must be in"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be in"),
        ({"temperature": "hot"}, "temperature", "must be a number"),
        ({"n": True}, "n", "must be an integer"),
        ({"prompt_lookup": "yes"}, "prompt_lookup", "must be true or false"),
        ({"num_draft": 9}, "num_draft", "num_draft must be in"),
        ({"draft": 1}, "draft", "must be true or false"),
        ({"draft": True, "prompt_lookup": True}, "draft", "choose one"),
    ],
)  # fmt: skip
def test_a_bad_field_is_refused_by_name(fields, param, words):
    with pytest.raises(ApiError) as refused:
        chat(**fields)
    assert refused.value.status == 400 and refused.value.param == param
    assert words in refused.value.message


def test_what_a_request_asks_is_what_sampling_gets():
    job = chat(temperature=0.5, top_p=0.9, top_k=40, min_p=0.1, seed=3, stop="x", n=2)
    assert (job.params.temperature, job.params.top_p, job.params.top_k) == (0.5, 0.9, 40)
    assert (job.params.min_p, job.params.stop, job.n) == (0.1, ("x",), 2)
    assert job.params_for(0).seed == 3 and job.params_for(1).seed == 4
    assert chat(max_completion_tokens=7, max_tokens=9).max_tokens == 7  # the newer name wins
    assert chat(logprobs=True).params.logprobs == 1  # the chosen token's, no alternatives
    assert chat().params.temperature == 1.0  # OpenAI's default
    assert chat(tools=[], tool_choice="none").tools is None
    spec = chat(prompt_lookup=True, num_draft=6).params  # speculative decoding (our extension)
    assert (spec.speculation, spec.num_draft) == ("prompt-lookup", 6)
    assert chat().params.speculation is None
    assert chat(draft=True).params.speculation == "draft"
    # no proposer asked: the server's draft model if it has one; `draft: false` declines it
    assert chat().draft_default and not chat(draft=False).draft_default
    assert not chat(prompt_lookup=True).draft_default
    messages = protocol.parse_messages(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
         "prompt_lookup": True},
        "m",
        TOKENIZER,
    )  # fmt: skip
    assert messages.params.speculation == "prompt-lookup"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--policy", "nope"], "--policy must be one of prefill-first, decode-first, chunked"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--max-waiting", "0"], "--max-waiting must be at least 1"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such file"),
        (["--kv-keep", "2"], "--kv-keep needs --max-kv-size"),
    ],
)
def test_mlxinfer_serve_refuses_bad_flags_before_loading(args, message):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mlxinfer", "serve", *args], capture_output=True, text=True
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_logprobs_bytes_are_a_tokens_own_bytes(default_model):
    """A token that holds part of a character: its `bytes` are those bytes (joined, a client
    rebuilds the character), not the UTF-8 of its readable label "<0xF0><0x9F>"."""
    _, tokenizer = default_model
    ids = tokenizer.encode("🎵", add_special_tokens=False)
    entries = [protocol._token_entry(tokenizer, t, -1.0) for t in ids]
    assert any(e["token"].startswith("<0x") for e in entries)
    assert bytes(b for e in entries for b in e["bytes"]).decode("utf-8") == "🎵"


def test_the_stop_string_named_is_the_one_that_ended_the_reply():
    words = SimpleNamespace(decode=lambda ids: " ".join(f"w{i}" for i in ids))
    job = chat(stop=["w9", "w5 w6"])
    assert protocol.matched_stop(words, job, [4, 5, 6, 7, 9], "stop") == "w5 w6"  # first found
    assert protocol.matched_stop(words, job, [4, 5, 6], "eos") is None


def test_a_model_that_does_not_load_stops_the_server_with_its_reason(tmp_path):
    """The model loads after the server starts listening; if it cannot, the server says why
    (naming the file) and exits 1 instead of answering 503 forever."""
    import socket
    import subprocess
    import sys

    (tmp_path / "config.json").write_text("{ not json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "mlxinfer", "serve", "--model", str(tmp_path), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "config.json" in result.stdout + result.stderr


def _responses_job(tools_offered: bool):
    from mlxinfer.sampling import SamplingParams

    job = protocol.Job("responses", "m", [], True, SamplingParams(), 16)
    job.tools = [{"type": "function", "function": {"name": "a"}}] if tools_offered else None
    return job


@pytest.mark.parametrize("text", [QWEN, TWO, "Paris is in France."])
def test_responses_read_the_same_calls_whole_and_streamed_in_any_pieces(text):
    """A /v1/responses reply: the text outside tool calls as one message item, a function_call
    item per call; streamed in random pieces, the same items in the same order, every event
    numbered, the text's deltas adding up to the message's text."""
    from mlxinfer.server import openai_responses as responses

    job = _responses_job(tools_offered=True)
    whole = responses.response_body(job, text, "eos", 10, 5, None)
    kinds = [(i["type"], i.get("name")) for i in whole["output"]]
    content, calls = tools.parse(text)
    expected = [("message", None)] if content else []
    assert kinds == expected + [("function_call", c.name) for c in calls]
    assert whole["status"] == "completed" and whole["usage"]["total_tokens"] == 15
    rng = random.Random(len(text))
    for _ in range(20):
        writer = responses.EventWriter(job)
        events = writer.start()
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        for k, piece in enumerate(pieces):
            events += writer.delta(piece, finished=k == len(pieces) - 1)
        events += writer.finish("eos", 10, 5, None)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        done = events[-1]["response"]
        assert events[-1]["type"] == "response.completed"
        assert [(i["type"], i.get("name")) for i in done["output"]] == kinds
        assert [
            json.loads(i["arguments"]) for i in done["output"] if i["type"] == "function_call"
        ] == [json.loads(c.arguments) for c in calls]
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        messages = [i for i in done["output"] if i["type"] == "message"]
        assert deltas == (messages[0]["content"][0]["text"] if messages else "")


def test_a_responses_reply_cut_at_its_limit_is_incomplete():
    from mlxinfer.server import openai_responses as responses

    job = _responses_job(tools_offered=False)
    whole = responses.response_body(job, "w5 w6", "length", 3, 16, None)
    assert whole["status"] == "incomplete"
    assert whole["incomplete_details"] == {"reason": "max_output_tokens"}
    writer = responses.EventWriter(job)
    events = writer.start() + writer.delta("w5 w6", True) + writer.finish("length", 3, 16, None)
    assert events[-1]["type"] == "response.incomplete"
