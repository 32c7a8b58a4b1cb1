"""The GPU check: on a machine with an NVIDIA GPU (MLX's CUDA backend, `mlx[cuda13]`), the
exactness suite under the "mlx" op set (what a Mac runs) and single-request, batched and
long-prompt comparisons with mlx-lm, all results under one folder, in under 8 minutes.

    python benchmarks/gpu_check.py --out DIR            # on the GPU machine
    python benchmarks/gpu_check.py --out DIR --quick    # a smoke test anywhere (tiny sizes)

The default model (98 MB) cannot travel to a lent GPU machine (64 MiB a call), so the speed part
uses a model of SmolLM2-135M's shape (llama: 30 layers, hidden 576, 9 heads / 3 KV heads, MLP
1536, vocab 49152) with random bfloat16 weights, written here as a Hugging Face directory that
both engines load: speed does not depend on what the weights say. Both run MLX's default device
with the weights as stored (mlxinfer's "native" compute policy on a GPU), in one process each,
alternating A B A B after a warm-up; prompts are random ids of exact length, EOS ignored:
  single  a 256-token prompt, 128 tokens: prefill_tps and decode_tps (BENCHMARKS.md's formulas)
  batch   8 prompts of 64 tokens, 64 tokens each: aggregate tok/s of batch_generate
  long    a 4096-token prompt, 16 tokens: prefill_tps and peak memory
  verify  (mlxinfer alone) what a speculative verify pass costs against a decode step: a forward
          pass of T = 1, 2, 4, 8 positions a row over a 256-token context, for 1 and 8 rows
          (median of 5 each): speculative decoding pays where T positions cost about one, which
          the runner's decisions (speculative.PassCost) assume of a GPU but never measured
The speed part runs first, then the exactness suite in what is left of an 8-minute budget (its
log says so if it was cut short). Files written under --out: env.txt (mlxinfer env),
exactness.log (pytest's output), speed.json (every sample, means and ratios), summary.txt (what
to paste into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, installed or not
from mlxinfer.bench.worker import JsonWorker  # noqa: E402

SHAPE = dict(  # SmolLM2-135M's
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
)
QUICK_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=1024,
)


def write_model(path: Path, shape: dict) -> None:
    """A llama directory with random bfloat16 weights and a word-level tokenizer."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        **shape,
    }
    D, F, V = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = D // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    rng = np.random.default_rng(0)

    def weight(*dims):
        return rng.standard_normal(dims, dtype=np.float32) / np.float32(np.sqrt(dims[-1]))

    tensors = {
        "model.embed_tokens.weight": weight(V, D),
        "model.norm.weight": np.ones(D, np.float32),
    }
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": weight(D, D),
            p + "self_attn.k_proj.weight": weight(kv, D),
            p + "self_attn.v_proj.weight": weight(kv, D),
            p + "self_attn.o_proj.weight": weight(D, D),
            p + "mlp.gate_proj.weight": weight(F, D),
            p + "mlp.up_proj.weight": weight(F, D),
            p + "mlp.down_proj.weight": weight(D, F),
            p + "input_layernorm.weight": np.ones(D, np.float32),
            p + "post_attention_layernorm.weight": np.ones(D, np.float32),
        }
    import mlx.core as mx  # bfloat16: numpy has none; MLX writes it

    mx.save_safetensors(
        str(path / "model.safetensors"),
        {k: mx.array(v).astype(mx.bfloat16) for k, v in tensors.items()},
        metadata={"format": "pt"},
    )
    (path / "config.json").write_text(json.dumps(config))
    vocab = {f"w{i}": i for i in range(V)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "w0", "eos_token": "w1", "tokenizer_class": "PreTrainedTokenizerFast"}
        )
    )


WORKER = r"""
import json, sys, time
engine, model_dir = sys.argv[1], sys.argv[2]
if engine == "mlxinfer":
    import mlxinfer
import mlx.core as mx
if engine == "mlxinfer":
    model, tokenizer = mlxinfer.load(model_dir)
    params = lambda n: mlxinfer.SamplingParams(ignore_eos=True, max_tokens=n)
    def single(prompt, n):
        times, start = [], time.perf_counter()
        for r in mlxinfer.stream_generate(model, tokenizer, prompt, sampling=params(n)):
            times.append(time.perf_counter())
        return start, times
    def batch(prompts, n):
        out = mlxinfer.batch_generate(model, tokenizer, prompts, max_tokens=n, sampling=params(n))
        assert all(len(r.tokens) == n for r in out), [len(r.tokens) for r in out]
    def verify(job):  # a verify pass's cost: T positions a row, over a context, then trimmed
        from mlxinfer.steps import prefill
        out = {}
        for rows in job["rows"]:
            cache = model.make_cache()
            prefill(model, mx.array([job["context"]] * rows), cache)
            for T in job["positions"]:
                seconds = []
                for _ in range(6):
                    tokens = mx.array([job["context"][:T]] * rows)
                    start = time.perf_counter()
                    mx.eval(model(tokens, cache))
                    seconds.append(time.perf_counter() - start)
                    for c in cache:
                        c.trim(T)
                out[f"rows{rows}_T{T}_ms"] = sorted(seconds[1:])[2] * 1e3  # (median of 5)
        return out
else:
    import mlx_lm
    from mlx_lm.generate import batch_generate, stream_generate
    model, tokenizer = mlx_lm.load(model_dir)
    tokenizer.eos_token_ids = set()
    def single(prompt, n):
        times, start = [], time.perf_counter()
        for r in stream_generate(model, tokenizer, prompt, max_tokens=n):
            times.append(time.perf_counter())
        return start, times
    def batch(prompts, n):
        out = batch_generate(model, tokenizer, prompts, max_tokens=n, return_token_ids=True)
print(json.dumps({"device": str(mx.default_device())}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    mx.reset_peak_memory()
    if job["kind"] == "verify":
        result = verify(job)
    elif job["kind"] == "batch":
        start = time.perf_counter()
        batch(job["prompts"], job["tokens"])
        seconds = time.perf_counter() - start
        result = {"tok_s": len(job["prompts"]) * job["tokens"] / seconds}
    else:
        start, times = single(job["prompts"][0], job["tokens"])
        ttft = times[0] - start
        result = {"prefill_tps": len(job["prompts"][0]) / ttft,
                  "decode_tps": (len(times) - 1) / (times[-1] - times[0])}
    result["peak_memory_mb"] = mx.get_peak_memory() / 2**20
    print(json.dumps(result), flush=True)
"""


class Worker(JsonWorker):
    """One engine in its own process (the package's JSON-lines worker)."""

    def __init__(self, engine: str, model_dir: Path):
        super().__init__([sys.executable, "-c", WORKER, engine, str(model_dir)], cwd=ROOT)
        self.device = self.facts["device"]

    def close(self, timeout: float = 120) -> None:
        super().close(timeout)


def speed(model_dir: Path, vocab: int, quick: bool, reps: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)

    def ids(n: int) -> list[int]:
        return rng.integers(2, vocab, size=n).tolist()

    scale = 8 if quick else 1
    jobs = {
        "single": {"kind": "single", "prompts": [ids(256 // scale)], "tokens": 128 // scale},
        "batch": {
            "kind": "batch",
            "prompts": [ids(64 // scale) for _ in range(8)],
            "tokens": 64 // scale,
        },
        "long": {"kind": "single", "prompts": [ids(4096 // scale)], "tokens": 16},
    }
    workers = {name: Worker(name, model_dir) for name in ("mlxinfer", "mlx-lm")}
    results = {"device": workers["mlxinfer"].device}
    try:
        for name, job in jobs.items():
            samples = {engine: [] for engine in workers}
            for worker in workers.values():
                worker.ask(job)  # warm-up
            for _ in range(reps):
                for engine, worker in workers.items():
                    samples[engine].append(worker.ask(job))
            keys = samples["mlxinfer"][0].keys()
            means = {
                e: {k: float(np.mean([s[k] for s in v])) for k in keys} for e, v in samples.items()
            }
            ratios = {k: means["mlxinfer"][k] / means["mlx-lm"][k] for k in keys}
            results[name] = {"samples": samples, "means": means, "ratio": ratios}
    finally:
        for worker in workers.values():
            worker.close()
    return results


def verify_costs(model_dir: Path, vocab: int, quick: bool) -> dict:
    """mlxinfer's verify pass at 1, 2, 4 and 8 positions a row, for 1 and 8 rows: milliseconds,
    and each against the same rows' one-position pass."""
    import numpy as np

    context = np.random.default_rng(1).integers(2, vocab, size=32 if quick else 256).tolist()
    job = {"kind": "verify", "context": context, "rows": [1, 8], "positions": [1, 2, 4, 8]}
    worker = Worker("mlxinfer", model_dir)
    try:
        worker.ask(job)  # warm-up
        ms = worker.ask(job)
    finally:
        worker.close()
    ms.pop("peak_memory_mb", None)
    relative = {k: v / ms[k.split("_T")[0] + "_T1_ms"] for k, v in ms.items()}
    return {"ms": ms, "against_one_position": relative}


BUDGET_S = 460  # the whole check's seconds, under 8 minutes: the tests get what speed leaves


def _run_within(command: list[str], timeout: float, **options) -> subprocess.CompletedProcess:
    """subprocess.run, but a run past `timeout` comes back as exit 124 with what it printed so
    far (the results before it are kept either way)."""
    try:
        return subprocess.run(command, timeout=timeout, **options)
    except subprocess.TimeoutExpired as e:
        said = [x.decode() if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)]
        note = f"\n(cut short after {timeout:.0f} s: the check's {BUDGET_S} s budget)"
        return subprocess.CompletedProcess(command, 124, said[0] + note, said[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder for every result")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke test")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-tests", action="store_true", help="speed only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = subprocess.run([sys.executable, "-m", "mlxinfer", "env"], capture_output=True, text=True)
    (out / "env.txt").write_text(env.stdout + env.stderr)
    summary = [f"device check, {time.strftime('%Y-%m-%d %H:%M')}", env.stdout]
    with tempfile.TemporaryDirectory() as tmp:
        shape = QUICK_SHAPE if args.quick else SHAPE
        write_model(Path(tmp), shape)
        results = speed(Path(tmp), shape["vocab_size"], args.quick, args.reps)
        results["verify"] = verify_costs(Path(tmp), shape["vocab_size"], args.quick)
    (out / "speed.json").write_text(json.dumps(results, indent=1))
    summary.append(f"speed on {results['device']} (mlxinfer / mlx-lm, means of {args.reps}):")
    for name in ("single", "batch", "long"):
        means, ratio = results[name]["means"], results[name]["ratio"]
        parts = [
            f"{k} {means['mlxinfer'][k]:.1f} vs {means['mlx-lm'][k]:.1f} ({ratio[k]:.2f}x)"
            for k in means["mlxinfer"]
        ]
        summary.append(f"  {name}: " + "; ".join(parts))
    verify = results["verify"]
    parts = [
        f"{k.removesuffix('_ms')} {v:.1f} ms ({verify['against_one_position'][k]:.2f}x)"
        for k, v in verify["ms"].items()
    ]
    summary.append("  verify pass (mlxinfer; x its one-position pass): " + "; ".join(parts))
    if not args.skip_tests:
        test_env = {
            **os.environ,
            "MLXINFER_KERNELS": "mlx",
            "MLXINFER_TESTS_WITHOUT_DEFAULT_MODEL": "1",
        }
        tests = _run_within(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "exactness and not browser",
                "-p",
                "no:cacheprovider",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=test_env,
            timeout=max(60.0, BUDGET_S - (time.perf_counter() - started)),
        )
        (out / "exactness.log").write_text(tests.stdout + tests.stderr)
        last = (tests.stdout.strip().splitlines() or ["no output"])[-1]
        summary.append(f"exactness under MLXINFER_KERNELS=mlx: exit {tests.returncode}: {last}")
    summary.append(f"took {time.perf_counter() - started:.0f} s")
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
