"""A program that used MLX on other threads exits with its own exit code (streams.py): real
subprocesses, many runs each, since the failure was intermittent (before: 18 of 24 such runs
aborted with 134 or crashed with 139, on a tiny model as on the default one)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .reference import make_tiny_checkpoint

RUNS = 8

PROGRAM = r"""
import sys, threading, concurrent.futures
import mlxinfer
mode, path = sys.argv[1], sys.argv[2]
model, tokenizer = mlxinfer.load(path)
prompt = [5, 6, 7, 8]
if mode == "thread":  # generate on a threading.Thread, then a normal exit
    worker = threading.Thread(target=lambda: mlxinfer.generate(model, tokenizer, prompt, max_tokens=4))
    worker.start()
    worker.join()
elif mode == "pool":  # a thread pool
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: mlxinfer.generate(model, tokenizer, prompt, max_tokens=n), [3, 4]))
elif mode == "loaded-on-a-thread":  # the weights evaluated on a worker thread
    loaded = {}
    worker = threading.Thread(target=lambda: loaded.update(m=mlxinfer.load(path)))
    worker.start()
    worker.join()
    mlxinfer.batch_generate(*loaded["m"], [prompt, prompt[:2]], max_tokens=3)
elif mode in ("engine", "raise"):  # an engine left mid-request: no close()
    engine = mlxinfer.Engine(model, tokenizer)
    handle = engine.submit(prompt, max_tokens=200, sampling=mlxinfer.SamplingParams(ignore_eos=True))
    next(iter(handle))
    if mode == "raise":
        raise RuntimeError("an uncaught exception while the engine runs")
print("done", flush=True)
sys.exit(3)
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(path, "llama")
    return path


@pytest.mark.parametrize(
    "mode, code",
    [("thread", 3), ("pool", 3), ("loaded-on-a-thread", 3), ("engine", 3), ("raise", 1)],
)
def test_program_exits_with_its_own_code(tiny_model, mode, code):
    codes = []
    for _ in range(RUNS):
        result = subprocess.run(
            [sys.executable, "-c", PROGRAM, mode, str(tiny_model)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        codes.append(result.returncode)
        if result.returncode != code:
            pytest.fail(
                f"run {len(codes)} of {mode}: exit {result.returncode}: {result.stderr[-600:]}"
            )
    assert codes == [code] * RUNS
    if mode != "raise":
        assert result.stdout.strip() == "done"
    else:
        assert "an uncaught exception while the engine runs" in result.stderr
