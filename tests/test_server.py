"""`mlxinfer serve` as its clients meet it: a real server subprocess on a free loopback port, driven
by the official `openai` and `anthropic` Python clients and by raw HTTP for what a client library
would refuse to send. Greedy replies are compared with the single-sequence path (as
test_engine.py does, up to the first near tie); the model is a tiny random llama with a word-level
tokenizer ("w5 w9 ...") and a chat template written here."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import mlxinfer
from mlxinfer.bench.servers import free_port

from .reference import make_tiny_checkpoint
from .test_engine import alone, assert_same_greedy, prompts

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

KEY = "test-key"
MODEL = "tiny"
CONTEXT = 512
TEMPLATE = (  # words of the tiny vocabulary: w6 per tool offered, w8 per tool call made
    "{% if tools %}w3 {% for t in tools %}w6 {% endfor %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}w4 {% elif m['role'] == 'assistant' %}"
    "w5 {% elif m['role'] == 'tool' %}w7 {% else %}w3 {% endif %}{{ m['content'] }} "
    "{% for c in m.tool_calls or [] %}w8 {% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}w5{% endif %}"
)


def start(path: Path, *flags: str, key: str | None = KEY) -> tuple[subprocess.Popen, str]:
    """`mlxinfer serve` on `path`; (process, base URL) once /health answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "mlxinfer", "serve", "--model", str(path), "--port", str(port)]
    command += ["--model-name", MODEL, *flags] + (["--api-key", key] if key else [])
    log = open(path.parent / f"server-{port}.log", "w")  # noqa: SIM115  (open while it runs)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return process, url
        except (OSError, urllib.error.HTTPError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the server did not start:\n" + Path(log.name).read_text())
        time.sleep(0.2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("server") / "tiny"
    make_tiny_checkpoint(path, "llama", max_position_embeddings=CONTEXT)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    process, url = start(checkpoint, "--max-batch", "16", "--max-body-mb", "0.25")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def model(checkpoint):
    return mlxinfer.load(checkpoint)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def post(url: str, body: bytes | dict, key: str | None = KEY, headers: dict | None = None):
    """(status, JSON body) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("content-type", "application/json")
    if key:
        request.add_header("authorization", f"Bearer {key}")
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def ids_of(tokens: list[str]) -> list[int]:
    """Token ids from the tokens' texts (the word-level vocabulary: "w17" is 17)."""
    special = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return [special[t.strip()] if t.strip() in special else int(t.strip()[1:]) for t in tokens]


# -- replies ---------------------------------------------------------------------------------------


def test_sixteen_concurrent_streamed_completions_each_equal_their_prompt_alone(client, model):
    """16 threads stream at once (one batch of 16): each reply's tokens (read back from its
    logprobs) are what the prompt gets alone, greedy."""
    batch = prompts(16, seed=3)
    got: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        stream = client.completions.create(
            model=MODEL,
            prompt=batch[i],
            max_tokens=8,
            temperature=0,
            logprobs=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        tokens = []
        for event in stream:
            if event.choices and event.choices[0].logprobs:
                tokens += event.choices[0].logprobs.tokens
        got[i] = ids_of(tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    compared = sum(assert_same_greedy(got[i], alone(model[0], batch[i], 8)) for i in range(16))
    assert len(got) == 16 and compared >= 16 * 8 // 2


def test_chat_plain_and_streamed_are_the_same_reply_with_usage_and_cached_tokens(client, model):
    messages = [{"role": "user", "content": words(prompts(1, seed=8, low=30, high=31)[0])}]
    prompt_tokens = len(model[1].apply_chat_template(messages))
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0
    )
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.usage.prompt_tokens == prompt_tokens
    assert plain.usage.completion_tokens <= 6
    events = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == plain.choices[0].message.content
    finished = [e.choices[0].finish_reason for e in events if e.choices]
    assert finished[-1] == plain.choices[0].finish_reason and not any(finished[:-1])
    usage = events[-1].usage  # the last event: usage, no choices
    assert events[-1].choices == [] and usage.prompt_tokens == plain.usage.prompt_tokens
    # the same prompt again: a prefix cache hit (matches of 16 tokens or more are kept)
    assert usage.prompt_tokens_details.cached_tokens >= 16
    assert events[-1].model_extra["metrics"]["ttft_ms"] > 0  # our measurements beside


def test_logprobs_are_the_models_own_distribution(client, model):
    """The first token's top logprobs equal log-softmax of the model's logits after the prompt
    (a forward pass here), and the chosen token is the greedy one."""
    import mlx.core as mx

    ids = prompts(1, seed=5)[0]
    reply = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=5
    )
    logits = np.array(model[0](mx.array([ids]))[0, -1].astype(mx.float32), dtype=np.float64)
    expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    top = reply.choices[0].logprobs.top_logprobs[0]
    best = np.argsort(-expected)[:5]
    assert ids_of(list(top)) == list(best)
    np.testing.assert_allclose(list(top.values()), expected[best], atol=1e-4)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "w7 w8"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    for entry in chat.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())


def test_stop_strings_seeds_and_n_choices(client):
    base = dict(model=MODEL, prompt="w11 w12 w13", max_tokens=12, temperature=0)
    whole = client.completions.create(**base, extra_body={"ignore_eos": True}).choices[0].text
    cut = whole.split()[3]  # a word of the reply: the reply stops before it
    stopped = client.completions.create(**base, stop=[cut], extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == whole[: whole.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = dict(model=MODEL, prompt="w11 w12 w13", max_tokens=12, temperature=1.0, seed=7)
    first = client.completions.create(**sampled).choices[0].text
    assert client.completions.create(**sampled).choices[0].text == first  # same seed, same text
    many = client.completions.create(**sampled, n=3)
    texts = [c.text for c in many.choices]
    assert texts[0] == first and len(set(texts)) == 3  # n draws: the first is the seed's own
    assert [c.index for c in many.choices] == [0, 1, 2]


def test_prompt_lookup_gives_the_same_reply_and_reports_its_drafts(server, client):
    """Speculative decoding by request (`prompt_lookup`, our extension): the same greedy and
    seeded replies as without it, the proposed and accepted tokens in the reply's metrics and
    in /metrics' counters; `lookup_ngram` is taken, and checked by name."""
    prompt = "w11 w12 w13 w14 w11 w12 w13 w14 w11 w12 w13 w14 w11 w12"
    drafted_before = metric(server, "draft_tokens_total")
    accepted_before = metric(server, "accepted_draft_tokens_total")
    greedy = None
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        base = dict(model=MODEL, prompt=prompt, max_tokens=16, **sampling)
        plain = client.completions.create(**base, extra_body={"ignore_eos": True})
        fast = client.completions.create(
            **base, extra_body={"ignore_eos": True, "prompt_lookup": True, "num_draft": 6}
        )
        assert fast.choices[0].text == plain.choices[0].text
        greedy = greedy or plain.choices[0].text  # (the first: temperature 0)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "prompt_lookup": True, "num_draft": 6, "lookup_ngram": 2}  # fmt: skip
    status, reply = post(f"{server}/v1/completions", body)
    assert status == 200 and reply["metrics"]["draft_tokens"] > 0, reply
    assert reply["choices"][0]["text"] == greedy  # (bigrams instead of trigrams)
    drafted = metric(server, "draft_tokens_total") - drafted_before
    accepted = metric(server, "accepted_draft_tokens_total") - accepted_before
    assert drafted >= reply["metrics"]["draft_tokens"] > 0  # this test's requests, at least
    assert drafted >= accepted >= reply["metrics"]["accepted_draft_tokens"]
    status, reply = post(f"{server}/v1/completions", {**body, "lookup_ngram": 0})
    assert status == 400 and reply["error"]["param"] == "lookup_ngram", reply


def test_a_draft_model_serves_the_same_replies_unless_a_request_declines_it(server, checkpoint):
    """`serve --draft-model` (here the model itself: always right but at a near tie): every
    request speculates with it unless it says `draft: false`, and gets the same reply; a server
    without one refuses `draft: true` by name."""
    process, url = start(checkpoint, "--draft-model", str(checkpoint))
    try:
        prompt = "w11 w12 w13 w14 w15"
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        status, drafted = post(f"{url}/v1/completions", body)
        assert status == 200 and drafted["metrics"]["draft_tokens"] > 0, drafted
        status, declined = post(f"{url}/v1/completions", {**body, "draft": False})
        assert status == 200 and declined["metrics"]["draft_tokens"] == 0, declined
        assert drafted["choices"][0]["text"] == declined["choices"][0]["text"]
        status, both = post(f"{url}/v1/completions", {**body, "draft": True, "prompt_lookup": True})
        assert status == 400 and both["error"]["param"] == "draft", both
    finally:
        process.terminate()
    # A KV budget with room for the request's caches (a 256-token block for its tokens, one for
    # its prompt's prefill: 0.25 MB here) but not the draft's block beside them: a request that
    # did not ask for the draft runs without it; one that did is refused, saying why.
    process, url = start(checkpoint, "--draft-model", str(checkpoint), "--kv-budget-mb", "0.3")
    try:
        status, plain = post(f"{url}/v1/completions", body)
        assert status == 200 and plain["metrics"]["draft_tokens"] == 0, plain
        assert plain["choices"][0]["text"] == declined["choices"][0]["text"]
        status, refused = post(f"{url}/v1/completions", {**body, "draft": True})
        assert status == 400 and "the draft model's" in refused["error"]["message"], refused
    finally:
        process.terminate()
        process.wait(timeout=30)
    status, refused = post(f"{server}/v1/completions", {**body, "draft": True})
    assert status == 400 and refused["error"]["param"] == "draft", refused
    assert "no draft model (--draft-model)" in refused["error"]["message"]


def test_anthropic_messages_plain_streamed_and_counted(server, checkpoint):
    """Anthropic counts cached prompt tokens apart: the second (streamed) request of the same
    prompt reads most of it from the prefix cache, and input + cache read is the prompt."""
    client = anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": words(prompts(1, seed=21, low=30, high=31)[0])}]
    plain = client.messages.create(
        model=MODEL, max_tokens=5, messages=messages, system="w30", extra_body={"temperature": 0}
    )
    assert plain.type == "message" and plain.role == "assistant"
    assert plain.stop_reason in ("end_turn", "max_tokens")
    with client.messages.stream(
        model=MODEL, max_tokens=5, messages=messages, system="w30", extra_body={"temperature": 0}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == plain.content[0].text and final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens
    counted = client.messages.count_tokens(model=MODEL, messages=messages, system="w30")
    _, tokenizer = mlxinfer.load(checkpoint)
    template = [{"role": "system", "content": "w30"}, *messages]
    assert counted.input_tokens == len(tokenizer.apply_chat_template(template))
    assert plain.usage.input_tokens + plain.usage.cache_read_input_tokens == counted.input_tokens
    assert final.usage.cache_read_input_tokens >= 16
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == counted.input_tokens


def test_tools_and_a_conversation_with_tool_calls_go_through_the_template(client, model):
    """The request's tools reach the chat template (w6 per tool), as do an assistant's tool calls
    (w8 each) and the tool's result: the prompt is what the template makes of them. The tiny
    model writes no call: the reply is text, finish_reason as without tools."""
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("get_weather", "get_time")
    ]
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    messages = [
        {"role": "user", "content": "w9 w10"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "w11"},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_tokens=4, temperature=0
    )
    template = [
        {"role": "user", "content": "w9 w10"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "w11"},
    ]
    expected = model[1].apply_chat_template(template, tools=tools)
    assert expected.count(6) == 2 and expected.count(8) == 1  # both tools, the one call
    assert reply.usage.prompt_tokens == len(expected)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")
    none = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, tool_choice="none", max_tokens=1
    )
    assert none.usage.prompt_tokens == len(model[1].apply_chat_template(template))


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,status,param,words_",
    [
        ({"messages": [{"role": "user", "content": "w5"}]}, 400, "model", "model is required"),
        ({"model": "other", "messages": [{"role": "user", "content": "w5"}]}, 404, None, "other"),
        ({"model": MODEL, "messages": []}, 400, "messages", "non-empty"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "tools": [{}]}, 400,
         "tools", "tools must be a list of"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "functions": []}, 400,
         "functions", "'functions' is not a parameter"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}],
          "tool_choice": "required"}, 400, "tool_choice", "only 'auto' and 'none'"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "temperature": 3}, 400,
         "temperature", "temperature must be in 0..2"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "n": 1000}, 400, "n",
         "n must be in 1..8"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}],
          "response_format": {"type": "json_schema"}}, 400, "response_format", "only"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         400, None, "'image_url' is not supported"),
    ],
)  # fmt: skip
def test_a_bad_request_is_an_error_naming_what_is_wrong(server, body, status, param, words_):
    got, reply = post(f"{server}/v1/chat/completions", body)
    assert got == status
    error = reply["error"]
    assert words_ in error["message"] and error["param"] == param and error["type"]


def test_responses_plain_and_streamed_are_the_chat_reply(client, model):
    """/v1/responses through the official client: instructions and input are the chat's system
    and user messages (the same prompt tokens), the greedy reply is the chat's, plain and
    streamed (created, in_progress, the text's events, completed), with usage and our metrics."""
    user = words(prompts(1, seed=9, low=30, high=31)[0])
    messages = [{"role": "system", "content": "w12"}, {"role": "user", "content": user}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0
    )
    plain = client.responses.create(
        model=MODEL, instructions="w12", input=user, max_output_tokens=6, temperature=0
    )
    assert plain.object == "response" and plain.output_text == chat.choices[0].message.content
    assert plain.usage.input_tokens == len(model[1].apply_chat_template(messages))
    assert plain.usage.output_tokens == chat.usage.completion_tokens
    cut = chat.choices[0].finish_reason == "length"
    assert plain.status == ("incomplete" if cut else "completed")
    assert plain.model_extra["metrics"]["ttft_ms"] > 0
    events = list(
        client.responses.create(
            model=MODEL, instructions="w12", input=user, max_output_tokens=6, temperature=0,
            stream=True,
        )
    )  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == ("response.incomplete" if cut else "response.completed")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text
    assert events[-1].response.output_text == text
    assert events[-1].response.usage.output_tokens == plain.usage.output_tokens


def test_responses_items_tools_and_calls_go_through_the_template(client, model):
    """Input items: a message with input_text parts, the model's function_call and its output
    become the chat template's messages (w8 per call, w7 for the result); flat function tools
    reach it (w6 each)."""
    tools = [{"type": "function", "name": n, "parameters": {"type": "object"}} for n in "ab"]
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "w9 w10"}]},
        {"type": "function_call", "call_id": "call_1", "name": "a", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "w11"},
    ]
    reply = client.responses.create(
        model=MODEL, input=items, tools=tools, max_output_tokens=3, temperature=0
    )
    call = {"id": "call_1", "type": "function", "function": {"name": "a", "arguments": {"x": 1}}}
    template = [
        {"role": "user", "content": "w9 w10"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "w11"},
    ]
    chat_tools = [
        {"type": "function", "function": {"name": t["name"], "parameters": t["parameters"]}}
        for t in tools
    ]
    expected = model[1].apply_chat_template(template, tools=chat_tools)
    assert expected.count(6) == 2 and expected.count(8) == 1 and expected.count(7) == 1
    assert reply.usage.input_tokens == len(expected)


@pytest.mark.parametrize(
    "body,param,words_",
    [
        ({"input": "w5", "store": True}, "store", "keeps no responses"),
        ({"input": "w5", "previous_response_id": "resp_1"}, "previous_response_id",
         "'previous_response_id' is not a parameter"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, None,
         "'input_image' are not supported"),
        ({"input": []}, "input", "non-empty list"),
        ({"input": "w5", "tools": [{"type": "web_search"}]}, "tools", "'web_search'"),
        ({"input": "w5", "text": {"format": {"type": "json_schema"}}}, "text", "only"),
        ({"input": "w5", "tool_choice": "required", "tools": []}, "tool_choice", "only 'auto'"),
        ({"input": "w5", "max_output_tokens": 0}, "max_output_tokens", "must be in"),
    ],
)  # fmt: skip
def test_a_bad_responses_request_names_what_is_wrong(server, body, param, words_):
    got, reply = post(f"{server}/v1/responses", {"model": MODEL, **body})
    assert got == 400
    assert words_ in reply["error"]["message"] and reply["error"]["param"] == param


def test_keys_routes_bodies_and_sizes(server):
    chat = f"{server}/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 1}
    assert post(chat, body, key=None)[0] == 401
    assert post(chat, body, key="wrong")[0] == 401
    assert post(chat, body, key=None, headers={"x-api-key": KEY})[0] == 200
    status, reply = post(f"{server}/v1/nothing", body)
    assert status == 404 and "no route" in reply["error"]["message"]
    assert post(chat, b"\xff\xfe garbage")[0] == 400
    assert post(chat, b"[" * 100_000 + b"]" * 100_000)[0] == 400  # deeper than Python parses
    status, reply = post(chat, {**body, "messages": [{"role": "user", "content": "w5 " * 100_000}]})
    assert status == 413 and "bytes" in reply["error"]["message"]  # over --max-body-mb 0.25
    status, reply = post(chat, {**body, "max_tokens": 10**9})  # clipped to the context, as always
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
    long = {"model": MODEL, "prompt": "w5 " * (CONTEXT + 10), "max_tokens": 1}  # past the context
    status, reply = post(f"{server}/v1/completions", long)
    assert status == 400 and "context" in reply["error"]["message"]
    status, reply = post(f"{server}/v1/messages", {"model": MODEL, "messages": []})
    assert status == 400 and reply["type"] == "error"  # Anthropic's shape on its route
    assert reply["error"]["type"] == "invalid_request_error"


def metric(server: str, name: str) -> float:
    with urllib.request.urlopen(f"{server}/metrics", timeout=10) as response:
        text = response.read().decode()
    line = next(x for x in text.splitlines() if x.startswith(f"mlxinfer_{name} "))
    return float(line.split()[1])


def test_without_max_tokens_a_reply_may_run_to_the_context(client, model):
    """No max_tokens: the reply ends at the model's context (512 here), as OpenAI's does, not at
    an arbitrary default (it stopped at 256)."""
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == CONTEXT - reply.usage.prompt_tokens
    assert reply.choices[0].finish_reason == "length"


def test_hostile_values_are_400s_never_500s(server):
    chat = f"{server}/v1/chat/completions"
    base = {"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 1}
    huge = b'{"model": "tiny", "messages": [{"role": "user", "content": "w5"}], '
    for field in (b"repetition_penalty", b"top_k", b"seed", b"max_tokens"):
        status, reply = post(chat, huge + b'"' + field + b'": 1' + b"0" * 400 + b"}")
        assert status == 400 and reply["error"]["param"] == field.decode(), reply
    lone = rb'{"role": "user", "content": "\ud800"}'
    status, reply = post(chat, b'{"model": "tiny", "messages": [' + lone + b"]}")
    assert status == 400 and "UTF-8" in reply["error"]["message"], reply
    status, reply = post(
        f"{server}/v1/messages/count_tokens",
        b'{"model": "tiny", "messages": [' + lone + b"]}",
    )
    assert status == 400 and "UTF-8" in reply["error"]["message"], reply
    status, reply = post(chat, {**base, "temperature": float("nan")})  # json writes NaN
    assert status == 400 and reply["error"]["param"] == "temperature"
    status, reply = post(f"{server}/v1/completions", {"model": MODEL, "prompt": [5], "echo": True})
    assert status == 400 and reply["error"]["param"] == "echo"


def test_echo_streams_the_prompt_first(client):
    base = dict(model=MODEL, prompt="w11 w12", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(**base).choices[0].text
    streamed = "".join(e.choices[0].text for e in client.completions.create(**base, stream=True))
    assert plain.startswith("w11 w12") and streamed == plain


def default_model_server(*flags: str) -> tuple[subprocess.Popen, str, list[int]]:
    """`mlxinfer serve` on the default model (a real load: seconds; a real decode: ~50 ms a
    token here, so a long reply is still running when a test acts on it): (process, URL, the
    /health statuses seen while it loaded)."""
    port = free_port()
    command = [sys.executable, "-m", "mlxinfer", "serve", "--port", str(port), *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url, statuses = f"http://127.0.0.1:{port}", []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                statuses.append(response.status)
                return process, url, statuses
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    pytest.fail("the server did not start:\n" + process.stdout.read().decode())


def test_a_client_that_goes_away_cancels_its_request_at_once():
    """A streamed request of 300 tokens (15 s of decoding), read for a few events and dropped:
    within a second the engine runs nothing (its batch row is free) and /metrics counts one
    cancelled request; a non-streamed one dropped mid-generation is cancelled too."""
    import http.client

    process, url, _ = default_model_server()
    try:
        host, port = url.removeprefix("http://").split(":")

        def send(stream: bool) -> http.client.HTTPConnection:
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time"}
            body |= {"max_tokens": 300, "ignore_eos": True, "stream": stream}
            connection.request(
                "POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"}
            )
            return connection

        def dropped(connection: http.client.HTTPConnection, cancelled: float) -> None:
            connection.sock.close()  # the client goes away
            connection.close()
            deadline = time.monotonic() + 1.0
            while metric(url, "requests_cancelled_total") < cancelled + 1:
                assert time.monotonic() < deadline, "not cancelled within a second"
                time.sleep(0.05)
            while metric(url, "requests_running") > 0:
                assert time.monotonic() < deadline, "still running after a second"
                time.sleep(0.05)

        streamed = send(stream=True)
        response = streamed.getresponse()
        assert response.status == 200
        for _ in range(3):
            response.readline()
        assert metric(url, "requests_running") == 1
        dropped(streamed, 0)
        plain = send(stream=False)
        deadline = time.monotonic() + 30
        while metric(url, "requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # decoding, not answered yet
        dropped(plain, 1)
        assert metric(url, "generation_tokens_total") == 0  # neither finished
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_health_says_loading_then_ready_and_sigterm_drains_then_exits_0():
    """While the model loads /health is 503 ("loading"); once ready 200. SIGTERM with a long
    stream in flight: the server stops taking requests, gives it the drain period (5 s), then
    cancels it: the stream ends early, and the process exits 0."""
    from mlxinfer.server.run import DRAIN_S

    process, url, statuses = default_model_server()
    assert 503 in statuses and statuses[-1] == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    stream = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt="Once upon a time",
        max_tokens=1000,  # ~50 s of decoding here: longer than the drain period
        stream=True,
        extra_body={"ignore_eos": True},
    )
    events = iter(stream)
    next(events)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    received = 0
    with pytest.raises(openai.APIError, match="shut down before the reply finished"):
        for _ in events:  # until the drain period is over: then an error event ends it
            received += 1
    ended = time.monotonic() - started
    assert process.wait(timeout=30) == 0, process.stdout.read().decode()
    assert received < 999 and DRAIN_S - 2 < ended < DRAIN_S + 10


def test_a_full_queue_is_a_429_and_the_waiting_request_is_served_after(checkpoint):
    """--max-batch 1 --max-waiting 1: one request runs, one waits, the next is refused with 429
    (OpenAI's clients retry those after Retry-After); once the first ends the waiting one runs."""
    process, url = start(checkpoint, "--max-batch", "1", "--max-waiting", "1", key=None)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        long = client.completions.create(
            model=MODEL, prompt="w5", max_tokens=250, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(long))  # running
        waiting: list = []
        thread = threading.Thread(
            target=lambda: waiting.append(
                post(f"{url}/v1/completions", {"model": MODEL, "prompt": "w6", "max_tokens": 1})
            ),
        )
        thread.start()
        deadline = time.monotonic() + 10
        while metric(url, "requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        request = urllib.request.Request(
            f"{url}/v1/completions",
            json.dumps({"model": MODEL, "prompt": "w7", "max_tokens": 1}).encode(),
            {"content-type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 429 and refused.value.headers["retry-after"] == "1"
        assert json.loads(refused.value.read())["error"]["type"] == "rate_limit_error"
        long.close()  # the running request goes (cancelled): the waiting one runs
        thread.join(timeout=60)
        assert waiting and waiting[0][0] == 200
        # the server runs with OpenMP's threads sleeping, not spinning, when idle (it set that
        # and started again: the same process)
        environ = Path(f"/proc/{process.pid}/environ")
        if environ.exists():
            assert b"OMP_WAIT_POLICY=PASSIVE" in environ.read_bytes().split(b"\0")
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_readme_server_example_answers_paris(tmp_path):
    """The README's example, as written (its port moved to a free one), against `mlxinfer serve`
    on the default model: the streamed greedy answer names Paris (the model's known answer)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## The HTTP server") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    port = free_port()
    command = [sys.executable, "-m", "mlxinfer", "serve", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.2)
        result = subprocess.run(
            [sys.executable, "-c", block.replace("8080", str(port))],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout, result.stdout
