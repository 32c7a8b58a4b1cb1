"""The `mlxinfer` command, run as a user runs it."""

from __future__ import annotations

import importlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import mlxinfer

FRANCE = "What is the capital of France?"
GENESIS = Path(__file__).parent / "data" / "kjv_genesis_1.txt"


def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlxinfer", *args],
        capture_output=True,
        text=True,
        timeout=300,
        input=input,
    )


def run_json(*args: str, input: str | None = None) -> dict:
    result = run_cli("generate", "--json", *args, input=input)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def start_cli(*args: str, python: tuple[str, ...] = (), **kwargs) -> subprocess.Popen:
    """The command in the background, with Ctrl-C (SIGINT) handled as in a terminal even when the
    test runner ignores it (a background job inherits SIGINT ignored, and Python keeps that);
    `python`: the interpreter's own options."""
    return subprocess.Popen(
        [sys.executable, *python, "-m", "mlxinfer", *args],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kwargs,
    )


def one_line_error(result: subprocess.CompletedProcess, *flags: str) -> str:
    """The single stderr line of a usage error (exit 2) that names every one of `flags`."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    for flag in flags:
        assert flag in lines[0], (flag, lines[0])
    return lines[0]


def test_generate_chat_with_default_model():
    result = run_cli("generate", "--chat", "--prompt", FRANCE)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_respects_max_tokens():
    result = run_cli("generate", "--raw", "--prompt", "The quick brown fox", "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    # the first three golden greedy ids (tests/data/smollm2_golden.json): 351, 253, 2365
    assert result.stdout == " with a quick\n"


def test_missing_model_is_a_clear_error(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.returncode == 1
    assert "mlxinfer generate: error:" in result.stderr and "nope" in result.stderr
    assert "Traceback" not in result.stderr


def test_hub_id_is_explained():
    result = run_cli("generate", "--model", "HuggingFaceTB/SmolLM2-135M", "--prompt", "hi")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "HuggingFaceTB/SmolLM2-135M" in result.stderr
    assert "hub id" in result.stderr and "does not download" in result.stderr


def test_json_output_has_text_and_metrics():
    out = run_json("--chat", "--prompt", FRANCE)
    assert out["text"] == "The capital of France is Paris."
    assert out["finish_reason"] == "eos"
    assert out["metrics"]["generated_tokens"] == len(out["token_ids"]) == 8
    assert out["metrics"]["ttft_ms"] > 0 and out["metrics"]["decode_tps"] > 0
    assert out["compute_policy"] in ("float32", "native") and out["blas"]


def test_stream_stop_and_sampling_flags():
    result = run_cli(
        "generate",
        "--chat",
        "--prompt",
        FRANCE,
        "--stream",
        "--stop",
        "Paris",
        "--temperature",
        "0.5",
        "--top-k",
        "1",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The capital of France is \n"


def test_ignore_eos_generates_exactly_max_tokens():
    out = run_json("--chat", "--prompt", FRANCE, "--ignore-eos", "--max-tokens", "10")
    assert len(out["token_ids"]) == 10 and out["finish_reason"] == "length"


def test_bounded_quantized_cache_flags():
    # Germany, not France: the French answer's first token is a 0.08-logit tie ("The" vs "L") that
    # an 8-bit cache flips; this one keeps a margin of 0.5 with the quantized cache
    out = run_json(
        "--prompt",
        "What is the capital of Germany?",
        "--max-kv-size",
        "64",
        "--kv-keep",
        "4",
        "--kv-bits",
        "8",
    )
    assert out["text"] == "The capital of Germany is Berlin."
    assert out["kv_cache"] == {"max_kv_size": 64, "keep": 4, "bits": 8, "group_size": 64}
    # 30 layers x (k, v) x the tokens held x 3 kv heads x 64 dims, 8-bit + float32 scale/bias per
    # 64; held: every token fed to the model (the last generated one never is), at most 64
    m = out["metrics"]
    held = min(m["prompt_tokens"] + m["generated_tokens"] - 1, 64)
    expected_mb = 30 * 2 * held * 3 * (64 + 8) / 2**20
    assert abs(out["metrics"]["kv_cache_mb"] - expected_mb) < 1e-3


# -- the prompt -----------------------------------------------------------------------------------


def test_chat_template_is_the_default():
    result = run_cli("generate", "--prompt", FRANCE)  # no --chat; raw, the model says nothing
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The capital of France is Paris.\n"


def test_raw_and_system_set_the_prompt(default_model):
    _, tokenizer = default_model
    user = {"role": "user", "content": FRANCE}
    system = {"role": "system", "content": "You are a pirate."}
    raw = run_json("--raw", "--prompt", FRANCE, "--max-tokens", "1")
    chat = run_json("--prompt", FRANCE, "--max-tokens", "1")
    with_system = run_json("--system", system["content"], "--prompt", FRANCE, "--max-tokens", "1")
    assert raw["metrics"]["prompt_tokens"] == len(tokenizer.encode(FRANCE))
    assert chat["metrics"]["prompt_tokens"] == len(tokenizer.apply_chat_template([user]))
    assert chat["metrics"]["prompt_tokens"] > raw["metrics"]["prompt_tokens"]
    n_system = len(tokenizer.apply_chat_template([system, user]))
    assert with_system["metrics"]["prompt_tokens"] == n_system != chat["metrics"]["prompt_tokens"]


def test_prompt_from_stdin_and_file(tmp_path):
    text = "The quick brown fox"
    (tmp_path / "prompt.txt").write_text(text)
    common = ("--raw", "--max-tokens", "3")
    direct = run_json("--prompt", text, *common)
    stdin = run_json("--prompt", "-", *common, input=text)
    from_file = run_json("--prompt-file", str(tmp_path / "prompt.txt"), *common)
    assert direct["token_ids"] == [351, 253, 2365]  # the golden greedy ids
    for out in (stdin, from_file):
        assert out["token_ids"] == direct["token_ids"]
        assert out["metrics"]["prompt_tokens"] == direct["metrics"]["prompt_tokens"]


@pytest.mark.parametrize("source", ["empty file", "missing file", "empty stdin"])
def test_empty_or_missing_prompt_is_a_usage_error(tmp_path, source):
    (tmp_path / "empty.txt").write_text("")
    args, flag = {
        "empty file": (["--prompt-file", str(tmp_path / "empty.txt")], "--prompt-file"),
        "missing file": (["--prompt-file", str(tmp_path / "missing.txt")], "--prompt-file"),
        "empty stdin": (["--prompt", "-"], "--prompt -"),
    }[source]
    result = run_cli("generate", *args, input="")
    line = one_line_error(result, flag)
    assert ("missing.txt" if source == "missing file" else "empty") in line


# -- arguments are checked before the model loads ------------------------------------------------

BAD_ARGUMENTS = {  # id: (arguments, text the one stderr line must hold: the flags as typed, ...)
    "logprobs over the cap": (["--logprobs", "100000", "--json"], ["--logprobs"]),
    "max-kv-size 0": (["--max-kv-size", "0"], ["--max-kv-size"]),
    "negative kv-keep": (["--max-kv-size", "8", "--kv-keep", "-1"], ["--kv-keep"]),
    "max-kv-size under kv-keep": (
        ["--max-kv-size", "2", "--kv-keep", "4"],
        ["--max-kv-size", "--kv-keep"],
    ),
    "max-kv-size under the default keep": (
        ["--max-kv-size", "3"],
        ["--max-kv-size (3) must be larger than --kv-keep (4)"],
    ),
    "top-p 1.5": (["--top-p", "1.5"], ["--top-p must be in (0, 1], got 1.5"]),
    "max-tokens 0": (["--max-tokens", "0"], ["--max-tokens must be an integer >= 1, got 0"]),
    "max-tokens abc": (["--max-tokens", "abc"], ["--max-tokens", "abc"]),
    "unknown flag": (["--bogus-flag"], ["--bogus-flag"]),
    # combinations refused: both flags named
    "logprobs without json": (["--logprobs", "3"], ["--logprobs", "--json"]),
    "kv-keep without max-kv-size": (["--kv-keep", "2"], ["--kv-keep", "--max-kv-size"]),
    "kv-group-size without kv-bits": (["--kv-group-size", "32"], ["--kv-group-size", "--kv-bits"]),
    "raw with system": (["--raw", "--system", "x"], ["--raw", "--system"]),
}


@pytest.mark.parametrize("case", ["empty prompt", *BAD_ARGUMENTS])
def test_bad_arguments_exit_2_before_loading(tmp_path, case):
    if case == "empty prompt":
        args, expected = ["--prompt", ""], ["--prompt"]
    else:
        args, expected = ["--prompt", "hi", *BAD_ARGUMENTS[case][0]], BAD_ARGUMENTS[case][1]
    start = time.perf_counter()
    result = run_cli("generate", *args)
    elapsed = time.perf_counter() - start
    line = one_line_error(result, *expected)
    # ~0.2 s here against ~2 s with the model loaded: loose on purpose (a busy machine); the
    # missing model below is what proves nothing was loaded
    assert elapsed < 5, elapsed
    # the same arguments with a model that cannot load: the argument is still what is reported
    missing = run_cli("generate", "--model", str(tmp_path / "no-model"), *args)
    assert missing.returncode == 2 and missing.stderr.strip() == line


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["bench", "--repeats", "2"],
            "mlxinfer bench: error: unknown flag --repeats (did you mean "
            "--reps?) (see mlxinfer bench --help)",
        ),
        (["bench", "--repeats=2", "list"], "unknown flag --repeats (did you mean --reps?)"),
        (
            ["bench", "export", "--cvs", "out.csv", "1"],
            "mlxinfer bench export: error: unknown flag --cvs (did you mean --csv?)",
        ),
        (
            ["generate", "--prompt", "hi", "--temprature", "0.5"],
            "unknown flag --temprature (did you mean --temperature?)",
        ),
        (["--verison"], "mlxinfer: error: unknown flag --verison (did you mean --version?)"),
        # a flag's value that looks like a flag is still argparse's to explain
        (["generate", "--prompt", "--hello"], "argument --prompt: expected one argument"),
    ],
)
def test_an_unknown_flag_is_named_with_the_closest_known_one(args, line):
    """`bench --repeats 2` said "argument ACTION: invalid choice: '2'": the unknown flag was
    dropped and its value taken for the subcommand."""
    assert line in one_line_error(run_cli(*args))


def test_ctrl_c_while_the_command_starts_up_exits_130_without_a_traceback():
    """SIGINT at 20 moments of the start-up, each 30 ms after the last, from when `import
    mlxinfer` has begun (the interpreter's own start-up is Python's: its site module reports a
    KeyboardInterrupt as a fatal error): importing the package, MLX and the engine, reading the
    arguments, loading the model. Before: tracebacks, an ImportError from MLX's extension,
    aborts, an interrupt lost in a weakref callback (the command then ran to the end)."""
    failures = []
    for moment in range(20):
        process = start_cli_with_import_times(
            "generate", "--prompt", "hi", "--max-tokens", "200", "--ignore-eos"
        )
        for line in process.stderr:  # "import time: self | cumulative | name", as each ends
            if line.rsplit("|", 1)[-1].strip() == "mlxinfer.backend":  # the package's first
                break
        time.sleep(moment * 0.030)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        stderr = "".join(line for line in stderr.splitlines(True) if "import time:" not in line)
        if process.returncode != 130 or "Traceback" in stderr or "error" in stderr.lower():
            failures.append((moment * 30, process.returncode, stderr[-600:]))
    assert failures == []


def test_ctrl_c_while_mlx_asks_for_a_compiler_is_not_lost(tmp_path):
    """MLX's CPU backend asks once per process whether it can compile, by running
    `system("g++ --version")`; system() ignores SIGINT until the child ends, so a Ctrl-C then
    was dropped and the command ran to the end, exit 0 (seen in CI: a SIGINT 570 ms into the
    start-up, where the first token's compiled functions ran the probe). Here that g++ takes
    1.5 s, and the Ctrl-C comes while it runs."""
    started = tmp_path / "probe-started"
    fake = tmp_path / "bin" / "g++"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then touch {started}; sleep 1.5; fi\n'
        f'PATH="{os.environ["PATH"]}" exec g++ "$@"\n'
    )
    fake.chmod(0o755)
    process = start_cli(
        "generate",
        "--prompt",
        "hi",
        "--max-tokens",
        "200",
        "--ignore-eos",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"},
    )
    deadline = time.monotonic() + 60
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if not started.exists():
        process.kill()
        process.communicate()
        pytest.skip("MLX no longer runs `g++ --version` (nothing to interrupt)")
    time.sleep(0.3)  # inside the probe
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, stderr[-600:])
    assert "Traceback" not in stderr


def start_cli_with_import_times(*args: str) -> subprocess.Popen:
    return start_cli(
        *args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        python=["-X", "importtime"],
    )


# -- output ---------------------------------------------------------------------------------------


def test_stream_json_is_one_object_per_token_then_the_result():
    result = run_cli("generate", "--prompt", FRANCE, "--stream", "--json", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    *tokens, final = [json.loads(line) for line in result.stdout.splitlines()]
    assert tokens and all(set(t) == {"token", "text"} for t in tokens)
    assert {"text", "finish_reason", "metrics"} <= set(final)
    assert "".join(t["text"] for t in tokens) == final["text"] == "The capital of France is Paris."
    assert [t["token"] for t in tokens] == final["token_ids"]
    assert final["finish_reason"] == "eos" and final["metrics"]["generated_tokens"] == len(tokens)


def test_logprobs_give_the_alternatives():
    out = run_json("--prompt", FRANCE, "--logprobs", "2", "--max-tokens", "3")
    assert [lp["token"] for lp in out["logprobs"]] == out["token_ids"]
    for lp in out["logprobs"]:
        assert len(lp["top"]) == 2
        (first, first_lp), (_, second_lp) = lp["top"]
        assert first == lp["token"] and lp["logprob"] == first_lp >= second_lp  # greedy
        assert first_lp <= 0


# -- Ctrl-C and the prefill progress --------------------------------------------------------------


def test_ctrl_c_while_streaming_keeps_the_text():
    proc = start_cli(
        "generate",
        "--prompt",
        "Tell me a long story.",
        "--stream",
        "--ignore-eos",
        "--max-tokens",
        "400",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        seen = b""
        deadline = time.monotonic() + 120
        while len(seen) < 20 and time.monotonic() < deadline:  # a few tokens streamed
            if select.select([proc.stdout], [], [], 1)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, proc.stderr.read().decode()  # ended before streaming any text
                seen += chunk
        assert seen, "no text streamed within 120 s"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert (seen + rest).endswith(b"\n")  # what was streamed stays, its line ended


def long_prompt(path: Path) -> Path:
    """A raw prompt of 1119 tokens, past two 512-token prefill chunks: the prefill takes ~2 s
    here before its last chunk, longer than the 1 s after which progress shows."""
    text = GENESIS.read_text()
    path.write_text(text + text[:600])
    return path


@pytest.fixture(scope="module")
def interrupted_on_a_terminal(tmp_path_factory):
    """`generate --json` of a long prompt with stderr a terminal, interrupted (SIGINT) once the
    first token is out, which is when the progress line is erased: (stderr, exit status, stdout)."""
    prompt = long_prompt(tmp_path_factory.mktemp("prompt") / "long.txt")
    master, slave = pty.openpty()
    proc = start_cli(
        "generate",
        "--raw",
        "--prompt-file",
        str(prompt),
        "--json",
        "--ignore-eos",
        "--max-tokens",
        "400",
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    terminal = b""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the command ended: the terminal closed
                break
            if not chunk:
                break
            terminal += chunk
            # each progress line starts with "\r\x1b[K"; one after the last of them erases it
            if b"prefill:" in terminal and terminal.rfind(b"\x1b[K") > terminal.rfind(b"prefill:"):
                time.sleep(0.5)  # into decoding (the erase comes just before a token is kept)
                proc.send_signal(signal.SIGINT)
                break
        stdout, _ = proc.communicate(timeout=60)
        while select.select([master], [], [], 1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        proc.kill()
        os.close(master)
    return terminal.decode(errors="replace"), proc.returncode, stdout.decode()


def test_prefill_progress_on_a_terminal(interrupted_on_a_terminal):
    terminal, _, _ = interrupted_on_a_terminal
    assert "prefill:" in terminal and "prompt tokens" in terminal, terminal
    assert "Traceback" not in terminal


def test_no_prefill_progress_when_stderr_is_not_a_terminal(tmp_path):
    prompt = long_prompt(tmp_path / "long.txt")
    result = run_cli(
        "generate", "--raw", "--prompt-file", str(prompt), "--max-tokens", "2", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # long enough that a terminal would have shown progress (after 1 s, at a chunk's end)
    assert json.loads(result.stdout)["metrics"]["ttft_ms"] > 1500


def test_ctrl_c_without_stream_prints_the_json_result(interrupted_on_a_terminal):
    terminal, returncode, stdout = interrupted_on_a_terminal
    assert returncode == 130, terminal
    out = json.loads(stdout)
    assert out["finish_reason"] == "interrupted"
    assert 0 < len(out["token_ids"]) < 400 and out["text"]


# -- version and environment ----------------------------------------------------------------------


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"mlxinfer {mlxinfer.__version__} ")  # mlxinfer 0.1.0
    assert f"MLX {mx.__version__}" in result.stdout


ENV_KEYS = [
    "mlxinfer",
    "mlx",
    "mlx-lm",
    "python",
    "device",
    "blas",
    "gemv shim",
    "gemv kernel",
    "c compiler",
    "cpu features",
    "prefill kernels",
    "default model",
]


def test_env():
    result = run_cli("env")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    facts = {key.strip(): value.strip() for key, value in lines.items()}
    assert set(ENV_KEYS) <= set(facts), facts
    assert facts["mlxinfer"] == mlxinfer.__version__ and facts["mlx"] == mx.__version__
    assert facts["default model"] == str(mlxinfer.default_model_path())


def test_env_json():
    result = run_cli("env", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert set(ENV_KEYS) <= set(facts), facts
    assert facts["default model"] == str(mlxinfer.default_model_path())


def test_env_shows_the_distributed_group_it_would_join(tmp_path):
    """Alone: a group of one. Under a launcher's environment: this rank and the group's size,
    read from the hostfile without joining (which would wait for the other ranks)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    alone = subprocess.run(
        [sys.executable, "-m", "mlxinfer", "env", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert json.loads(alone.stdout)["distributed"].startswith("available; not launched")
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]]))
    launched = subprocess.run(
        [sys.executable, "-m", "mlxinfer", "env", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "MLX_RANK": "2", "MLX_HOSTFILE": str(hostfile)},
    )
    assert json.loads(launched.stdout)["distributed"] == f"rank 2 of 3 (hostfile {hostfile})"


def test_prompt_that_is_not_utf8_is_a_usage_error():
    """Bytes that are not UTF-8 on the command line or stdin: exit 2, one line, no traceback."""
    for args, stdin in ((["--prompt", "\udcff hi"], None), (["--prompt", "-"], b"\xff\xfe hi")):
        result = subprocess.run(
            [sys.executable, "-m", "mlxinfer", "generate", *args, "--max-tokens", "2"],
            input=stdin,
            capture_output=True,
            timeout=60,
        )
        err = result.stderr.decode()
        assert result.returncode == 2, err
        assert "not valid UTF-8 text" in err and "Traceback" not in err
    chat = subprocess.run(
        [sys.executable, "-m", "mlxinfer", "chat", "--max-tokens", "3"],
        input=b"\xff hi\n",
        capture_output=True,
        timeout=120,
    )
    assert chat.returncode == 0 and b"not valid UTF-8 text" in chat.stderr
    assert b"Traceback" not in chat.stderr


def test_a_model_with_a_bad_config_exits_1_naming_the_file(tmp_path):
    """A config.json value of the wrong type is a model that cannot be loaded (exit 1), not a bad
    argument (exit 2), and the line names the file."""
    from .reference import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["rms_norm_eps"] = "x"
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_cli("generate", "--model", str(tmp_path), "--raw", "--prompt", "hi")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(
        f"mlxinfer generate: error: {tmp_path / 'config.json'}: invalid config"
    )


def test_seed_beyond_64_bits_is_a_usage_error():
    """MLX's random keys are 64-bit: 2^64 used to end the request in error, printed as an empty
    line with exit 0."""
    result = run_cli("generate", "--prompt", "hi", "--temperature", "0.7", "--seed", str(2**64))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().endswith(
        "--seed must be an integer in [0, 2^64), got 18446744073709551616"
    )


@pytest.mark.parametrize("json_output", [False, True])
def test_request_that_ends_in_error_exits_non_zero_with_the_reason(
    default_model, monkeypatch, capsys, json_output
):
    """Whatever ends a request in error (sampling, NaN logits, detokenizing) is never reported as
    success: exit 1, the reason on stderr, and in --json the reason beside finish_reason."""
    from mlxinfer import cli
    from mlxinfer.cli import generate as generate_command
    from mlxinfer.responses import GenerationResponse

    generate = importlib.import_module("mlxinfer.generate")  # the module, not the function

    def failing(*args, **kwargs):
        yield GenerationResponse("Hi", 17)
        yield GenerationResponse("", -1, finish_reason="error", error="sampling failed: boom")

    monkeypatch.setattr(generate, "stream_generate", failing)
    monkeypatch.setattr(generate_command, "load_model", lambda args: default_model)
    code = cli.main(["generate", "--prompt", "hi"] + (["--json"] if json_output else []))
    out, err = capsys.readouterr()
    assert code == 1
    assert err.strip().splitlines()[-1] == "mlxinfer generate: error: sampling failed: boom"
    if json_output:
        result = json.loads(out)
        assert result["finish_reason"] == "error" and result["error"] == "sampling failed: boom"


def test_generate_with_prompt_lookup_copies_and_reports_its_drafts():
    """`--prompt-lookup` on the default model: a reply that copies its prompt, with the proposed
    and accepted tokens in the JSON metrics (greedy tokens equal plain decoding's:
    tests/test_speculative.py)."""
    prompt = "Repeat exactly: the quick brown fox jumps over the lazy dog. " * 2
    out = run_json("--prompt-lookup", "--num-draft", "6", "--max-tokens", "12", "--prompt", prompt)
    assert out["text"].startswith("The quick brown fox jumps over the lazy dog.")
    metrics = out["metrics"]
    assert metrics["accepted_draft_tokens"] > 0
    assert metrics["acceptance_rate"] == metrics["accepted_draft_tokens"] / metrics["draft_tokens"]
    one_line_error(run_cli("generate", "--num-draft", "9", "--prompt", "x"), "--num-draft")
    one_line_error(run_cli("generate", "--lookup-ngram", "0", "--prompt", "x"), "--lookup-ngram")


def test_generate_with_a_draft_model_gives_the_same_reply_and_reports_its_drafts(tmp_path):
    """`--draft-model` on the default model, with itself as the draft (always right but at a
    near tie): the reply of plain decoding, nearly every proposal accepted. A draft that cannot
    propose for the model (another vocabulary) is one line and exit 1; asking for two proposers,
    or a draft that is not there, a usage error."""
    from mlxinfer.loading import default_model_path

    from .reference import make_tiny_checkpoint

    path = str(default_model_path())
    ask = ["--chat", "--max-tokens", "16", "--prompt", FRANCE]
    plain = run_json(*ask)
    fast = run_json("--draft-model", path, "--num-draft", "4", *ask)
    assert fast["text"] == plain["text"]
    metrics = fast["metrics"]
    assert metrics["accepted_draft_tokens"] >= 0.8 * metrics["draft_tokens"] > 0
    other = tmp_path / "other"
    make_tiny_checkpoint(other, "llama")
    result = run_cli("generate", "--draft-model", str(other), "--prompt", "x")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"mlxinfer generate: error: --draft-model {other}: the draft model's vocabulary"
        )
    )
    both = run_cli("generate", "--prompt-lookup", "--draft-model", path, "--prompt", "x")
    one_line_error(both, "--prompt-lookup", "--draft-model")
    missing = run_cli("generate", "--draft-model", str(tmp_path / "nope"), "--prompt", "x")
    one_line_error(missing, "--draft-model")
