"""`mlxinfer chat`, scripted: with standard input not a terminal each line is one user turn and
each reply ends with a newline (with --json, each reply is one JSON line)."""

from __future__ import annotations

import json
import time

import pytest

from .reference import make_tiny_checkpoint
from .test_cli import one_line_error, run_cli

GERMANY = "And of Germany?"  # says "capital" only through the turn before it


def chat(*lines: str, args: tuple[str, ...] = ("--max-tokens", "40")):
    return run_cli("chat", *args, input="".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def scripted():
    """A conversation that resets, exits, then has one more line."""
    result = chat(
        "What is the capital of France?",
        GERMANY,
        "/reset",
        GERMANY,
        "/exit",
        "What is the capital of Italy?",
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def germany_alone():
    """The reply to GERMANY as the first turn of a conversation."""
    result = chat(GERMANY)
    assert result.returncode == 0, result.stderr
    [reply] = result.stdout.splitlines()
    return reply


def test_chat_keeps_the_history(scripted, germany_alone):
    replies = scripted.stdout.splitlines()
    assert "Paris" in replies[0]
    assert "Berlin" in replies[1]  # "The capital of Germany is Berlin." (margins >= 3 logits)
    assert "Berlin" not in germany_alone  # without the history it is no question of capitals


def test_reset_clears_the_history(scripted, germany_alone):
    replies = scripted.stdout.splitlines()
    assert replies[2] == germany_alone  # the same prompt as a new conversation, token for token
    assert "conversation cleared" in scripted.stderr


def test_exit_ends_and_ignores_later_lines(scripted):
    assert scripted.returncode == 0, scripted.stderr
    assert len(scripted.stdout.splitlines()) == 3  # nothing for the line after /exit


def test_system_message():
    result = chat(
        "Who are you?",
        args=("--system", "You are Captain Blackbeard, a pirate.", "--max-tokens", "12"),
    )
    assert result.returncode == 0, result.stderr
    # without the system message: "I'm here to help with any kind of creative writing project."
    assert "Blackbeard" in result.stdout


def test_bad_flag_exits_2_before_loading(tmp_path):
    start = time.perf_counter()
    result = chat("hi", args=("--top-k", "-1"))
    elapsed = time.perf_counter() - start
    line = one_line_error(result, "--top-k")
    assert elapsed < 5, elapsed  # ~0.2 s, ~2 s with the model loaded: loose on purpose
    missing = chat("hi", args=("--model", str(tmp_path / "no-model"), "--top-k", "-1"))
    assert missing.returncode == 2 and missing.stderr.strip() == line  # checked before loading


def test_model_without_chat_template(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")  # a tokenizer with no chat template
    result = chat("hi", args=("--model", str(tmp_path)))
    assert "chat template" in one_line_error(result)
    assert result.stdout == ""


def test_json_replies_are_one_line_each_even_with_newlines():
    """--json: one JSON object per reply, however many lines the reply holds; the second turn's
    prompt holds the first exchange (its prompt_tokens grow by more than the new message)."""
    import json

    result = chat(
        "Write a short poem about the sea, in four lines.",
        "Thanks!",
        args=("--max-tokens", "30", "--json"),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    # the case plain output cannot delimit: "In the depths of the blue,\n" (8 tokens, greedy top-2
    # margins >= 0.078 logits up to the newline, above the 0.05 near-tie bound)
    assert "\n" in first["text"]
    for reply in (first, second):
        assert reply["text"] and reply["finish_reason"] in ("eos", "length", "stop")
        assert reply["metrics"]["generated_tokens"] >= 1
    grown = second["metrics"]["prompt_tokens"] - first["metrics"]["prompt_tokens"]
    assert grown > first["metrics"]["generated_tokens"]


def test_a_message_longer_than_the_context_still_gets_its_line():
    """--json prints one line per turn, an error line included, so a script stays in step."""
    import json

    result = chat("a " * 9000, "Hi", args=("--max-tokens", "4", "--json"))
    assert result.returncode == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["finish_reason"] == "error" and "no room in the model's context" in first["error"]
    assert second["text"] and second["finish_reason"] in ("eos", "length")
    assert "no room in the model's context" in result.stderr


def test_a_chat_template_failing_on_the_history_is_a_turn_error(tmp_path):
    """The history is rendered to trim it before the reply; a template failing there (on the second
    turn here, or past its time and size bounds) used to end the chat with a traceback."""
    make_tiny_checkpoint(tmp_path, "llama")
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    result = chat("w5", "w6", "w7", args=("--model", str(tmp_path), "--max-tokens", "2", "--json"))
    assert result.returncode == 0, result.stderr
    first, second, third = (json.loads(line) for line in result.stdout.splitlines())
    assert first["finish_reason"] in ("length", "eos")
    for turn in (second, third):  # the failed turn left the history as it was
        assert turn == {
            "text": "",
            "finish_reason": "error",
            "error": "chat template error: one message only",
        }
    assert result.stderr.count("mlxinfer chat: error: chat template error: one message only") == 2
