"""The op sets (mlxinfer/ops.py): chosen once at load, reported, and equivalent. "mlx" is the code a
Mac runs (MLX's fast ops); "cpu" is the CPU-tuned kernels. Both run on this machine, so both are
tested here against each other; each is also tested against transformers by the exactness suite,
which CI runs under each op set (MLXINFER_KERNELS=mlx for the second run)."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlxinfer
from mlxinfer.generate import prefill
from mlxinfer.ops import KERNELS_ENV, resolve_kernels

from .reference import make_tiny_checkpoint, rel_err
from .test_model import CASES as DENSE_CASES
from .test_moe import CASES as MOE_CASES

AGREE = 1e-5  # relative, logits of the two op sets

CASES = {
    **DENSE_CASES,
    **MOE_CASES,
    "mistral-sliding-window": ("mistral", dict(sliding_window=8)),
    "qwen2-window-layers": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny_model(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_checkpoint(path, family, **overrides)
    return mlxinfer.load(path, kernels="cpu")[0]


def run_all_paths(model, ids: np.ndarray) -> list[np.ndarray]:
    """Logits of a full forward pass; of prefill in chunks of 7 then decoding with a growing cache;
    and of the same with a rotating cache of 12 tokens keeping 2 sinks (wrapping several times)."""
    outputs = [np.array(model(mx.array(ids)))]
    for cache_options in ({}, {"max_kv_size": 12, "kv_keep": 2}):
        cache = model.make_cache(**cache_options)
        steps = [np.array(model(mx.array(ids[:, :7]), cache))]
        steps += [
            np.array(model(mx.array(ids[:, t : t + 1]), cache)) for t in range(7, ids.shape[1])
        ]
        outputs.append(np.concatenate(steps, axis=1))
    return outputs


def test_op_sets_agree(tiny_model):
    """Every family, MoE and sliding windows: the two op sets within 1e-5 relative on every path.
    (Quantized caches: both op sets are tested against the definition of a quantized cache step
    by step, tests/test_cache.py; through a whole model quantization amplifies a 1e-7 difference
    into a flipped rounding, so logits are not compared there.)"""
    ids = np.random.default_rng(1).integers(0, 128, size=(2, 33))
    model = tiny_model
    model.set_kernels("cpu")
    cpu = run_all_paths(model, ids)
    model.set_kernels("mlx")
    try:
        metal = run_all_paths(model, ids)
    finally:
        model.set_kernels("cpu")
    for path, a, b in zip(["full", "growing", "rotating"], cpu, metal, strict=True):
        assert rel_err(b, a) <= AGREE, path


def test_op_sets_agree_on_the_default_model(default_model, monkeypatch):
    """SmolLM2-135M: a 300-token prefill of KJV Genesis in chunks, then 20 decode steps. With the
    gemv shim, the cpu op set's prefill chunks run the C attention and SwiGLU (every layer of
    every chunk), its decode steps the C attention only (decode_attention.h)."""
    from pathlib import Path

    from mlxinfer import backend, cpu_kernels

    ran = []  # the C kernels' calls that returned a result
    for name in ("native_attention", "native_swiglu"):
        monkeypatch.setattr(cpu_kernels, name, _counting(getattr(cpu_kernels, name), ran))
    model, tokenizer = default_model
    text = (Path(__file__).parent / "data" / "kjv_genesis_1.txt").read_text()
    ids = tokenizer.encode(text)[:320]
    results = {}
    for kernels in ("cpu", "mlx"):
        model.set_kernels(kernels)
        cache = model.make_cache()
        logits = [np.array(prefill(model, mx.array([ids[:300]]), cache, chunk_size=128))]
        logits += [np.array(model(mx.array([[t]]), cache)[:, -1]) for t in ids[300:]]
        results[kernels] = np.concatenate(logits)
    model.set_kernels("auto")
    assert rel_err(results["mlx"], results["cpu"]) <= AGREE
    if backend.native_prefill_kernel("mlxinfer_attention") is not None:
        layers = model.config.num_hidden_layers
        chunks = 3 * layers  # 128 + 128 + 44 tokens (44 x 1536 >= 64k)
        steps = 20 * layers
        assert sorted(ran) == ["native_attention"] * (chunks + steps) + ["native_swiglu"] * chunks


def _counting(function, calls: list):
    def counted(*args, **kwargs):
        out = function(*args, **kwargs)
        if out is not None:
            calls.append(function.__name__)
        return out

    return counted


def test_the_op_set_is_chosen_at_load_and_reported(tmp_path, monkeypatch):
    make_tiny_checkpoint(tmp_path, "llama")
    for kernels in ("cpu", "mlx"):
        model, _ = mlxinfer.load(tmp_path, kernels=kernels)
        assert model.kernels == kernels
        used = {m.ops.name for _, m in model.named_modules() if hasattr(m, "ops")}
        assert used == {kernels}  # attention, its RoPE, every MLP
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    expected = "cpu" if mx.default_device() == mx.cpu else "mlx"
    assert resolve_kernels("auto") == expected == mlxinfer.load(tmp_path)[0].kernels
    monkeypatch.setenv(KERNELS_ENV, "mlx")
    assert resolve_kernels("auto") == "mlx" == mlxinfer.load(tmp_path)[0].kernels
    assert resolve_kernels("cpu") == "cpu"  # an explicit choice wins over the environment
    monkeypatch.setenv(KERNELS_ENV, "metal")
    with pytest.raises(ValueError, match="MLXINFER_KERNELS must be cpu or mlx, got 'metal'"):
        mlxinfer.load(tmp_path)
    with pytest.raises(ValueError, match="kernels must be one of auto, cpu, mlx, got 'gpu'"):
        mlxinfer.load(tmp_path, kernels="gpu")


def test_cli_reports_and_takes_the_op_set():
    env = {k: v for k, v in os.environ.items() if k != KERNELS_ENV}
    for flag, expected in ((["--kernels", "mlx"], "mlx"), ([], "cpu")):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlxinfer",
                "generate",
                "--prompt",
                "Hi",
                "--max-tokens",
                "2",
                "--json",
                *flag,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        if mx.default_device() == mx.cpu or flag:
            assert f'"kernels": "{expected}"' in result.stdout


def test_an_explicit_op_set_ignores_a_bad_environment(tmp_path):
    """MLXINFER_KERNELS only fills in "auto": an explicit choice loads even when it is invalid,
    and "auto" under it is refused before loading (exit 2, one line)."""
    make_tiny_checkpoint(tmp_path, "llama")
    env = {**os.environ, KERNELS_ENV: "bogus"}
    code = f"import mlxinfer; print(mlxinfer.load({str(tmp_path)!r}, kernels='mlx')[0].kernels)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "mlx", result.stderr
    cli = [
        sys.executable,
        "-m",
        "mlxinfer",
        "generate",
        "--model",
        str(tmp_path),
        "--raw",
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ]
    refused = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("MLXINFER_KERNELS must be cpu or mlx, got 'bogus'")
    chosen = subprocess.run(
        [*cli, "--kernels", "cpu"], capture_output=True, text=True, env=env, timeout=120
    )
    assert chosen.returncode == 0, chosen.stderr
