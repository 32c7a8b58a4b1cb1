"""mlx-lm as the baseline of a sweep: the same weights, the same settings, in its own process.

The worker (`python -m mlxinfer.bench.baseline MODEL_DIR`) runs mlx-lm 0.32 in its best
configuration on this device: on Linux float32 weights with OpenBLAS loaded first, without
mlxinfer's gemv shim (MLXINFER_GEMV_SHIM=0), which would speed it up too. Requests are JSON
lines; each is timed inside the worker by mlxinfer's definitions (metrics.py), from the token
arrival times on the host, with `mx.reset_peak_memory()` before it (mlx-lm never resets it).
Sampling goes through mlx-lm's own sampler and logits processors. What mlx-lm cannot do (more than
a quantized rotating cache, a quantized cache in a batch) comes back as an error naming it.

mlx-lm cannot read GGUF: a model it cannot load is exported first (`export_for_mlx_lm`: our
float32 weights under Hugging Face names, a llama config.json and the tokenizer).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from .worker import JsonWorker, WorkerError

ENGINE = "mlx-lm"
# mlx-lm's best configuration on the CPU: OpenBLAS loaded, but not mlxinfer's gemv shim, which would
# speed it up too (what every mlx-lm worker, here and in benchmarks/, runs with)
NO_SHIM = {"MLXINFER_GEMV_SHIM": "0"}


def export_for_mlx_lm(model, tokenizer, path: Path) -> None:
    """Our float32 weights under Hugging Face names, a config.json mlx-lm reads (llama, or
    gemma3_text) and the tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    c = model.config
    weights = {}
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    for name, value in tree_flatten(model.parameters()):
        if name.endswith(".weight_t"):  # the float32 policy's transposed layout
            name, value = name.removesuffix("_t"), value.T
        stem = name.rsplit(".", 2)[0]  # model.layers.N.self_attn / .mlp
        if name.endswith("qkv_proj.weight"):  # our load-time fusion, split back to checkpoint names
            q, k, v = mx.split(value, [q_out, q_out + kv_out], axis=0)
            weights.update(
                {f"{stem}.q_proj.weight": q, f"{stem}.k_proj.weight": k, f"{stem}.v_proj.weight": v}
            )
        elif name.endswith("gate_up_proj.weight"):
            gate, up = mx.split(value, 2, axis=0)
            weights.update({f"{stem}.gate_proj.weight": gate, f"{stem}.up_proj.weight": up})
        else:
            weights[name] = value
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    config: dict = {
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_theta,
        "rope_traditional": c.rope_traditional,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "eos_token_id": sorted(tokenizer.eos_token_ids),
    }
    if c.model_type == "gemma3_text":  # mlx-lm's gemma3_text reads the classic spellings
        config.update(
            model_type="gemma3_text",
            query_pre_attn_scalar=round(c.query_scale**-2) if c.query_scale else c.head_dim,
            sliding_window=c.sliding_window,
            layer_types=[
                "full_attention" if w is None else "sliding_attention" for w in c.layer_windows
            ],
            sliding_window_pattern=c.layer_windows.index(None) + 1
            if None in c.layer_windows
            else len(c.layer_windows) + 1,
            rope_local_base_freq=c.local_rope_theta,
            rope_scaling=c.rope_scaling,
            hidden_activation="gelu_pytorch_tanh",
        )
    elif c.model_type != "llama":
        raise ValueError(f"no mlx-lm export for model_type {c.model_type!r} (llama, gemma3_text)")
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_tokenizer_json(path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": tokenizer.eos_token}))


class MlxLmBaseline:
    """The worker process for one model. `run(request)` -> {metrics, tokens, times} or {error}."""

    def __init__(self, model_path: str | None, model=None, tokenizer=None):
        self._tmp = None
        path = model_path
        if path is None or not (Path(path) / "config.json").is_file():
            self._tmp = tempfile.TemporaryDirectory()
            export_for_mlx_lm(model, tokenizer, Path(self._tmp.name))
            path = self._tmp.name
        try:
            self.worker = JsonWorker(
                [sys.executable, "-m", "mlxinfer.bench.baseline", str(path)], env=NO_SHIM
            )
        except WorkerError:
            self.close()
            raise RuntimeError(f"the mlx-lm worker did not start for {path}") from None
        self.facts = self.worker.facts

    def run(self, request: dict) -> dict:
        try:
            return self.worker.ask(request)
        except WorkerError:
            raise RuntimeError("the mlx-lm worker exited") from None

    def close(self) -> None:
        if getattr(self, "worker", None) is not None:
            self.worker.close()  # busy in a long request: killed after a minute
        if self._tmp is not None:
            self._tmp.cleanup()


def _serve(model_dir: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sweep's to handle; it closes us
    import mlx.core as mx  # after the mlxinfer package (run as -m): OpenBLAS is loaded first
    import mlx_lm
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    from ..backend import blas_status
    from ..metrics import request_metrics

    model, tokenizer = mlx_lm.load(model_dir)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # MLX's CPU matmuls use BLAS in float32 only
    tokenizer.eos_token_ids = []  # EOS ignored: every request generates exactly what it asks
    print(json.dumps({"blas": blas_status()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            runs = _generate(model, tokenizer, request, make_sampler, make_logits_processors)
        except Exception as e:
            runs = f"{type(e).__name__}: {e}"
        if isinstance(runs, str):
            reply = {"error": runs}
        else:  # one entry per concurrent request, timed by mlxinfer's definitions
            peak, active = mx.get_peak_memory(), mx.get_active_memory()
            reply = {
                "requests": [
                    {
                        "metrics": _measured(
                            request_metrics(
                                start,
                                times,
                                request.get("depth", 0) + len(prompt),
                                cached_prompt_tokens=request.get(
                                    "depth", 0
                                ),  # computed before the clock
                                peak_memory_bytes=peak,
                                active_memory_bytes=active,
                            ).to_dict()
                        ),
                        "tokens": tokens,
                        "times": [(t - start) * 1e3 for t in times],
                    }
                    for prompt, start, times, tokens in runs
                ]
            }
        print(json.dumps(reply), flush=True)


def _measured(metrics: dict) -> dict:
    """What the worker measures: not the KV cache's size or the bandwidth (mlx-lm does not say
    which bytes it reads or holds), which would otherwise read as 0."""
    return {k: v for k, v in metrics.items() if k not in ("kv_cache_mb", "bandwidth_gbs")}


def _generate(model, tokenizer, request, make_sampler, make_logits_processors):
    """[(prompt, start, token times, tokens)] for each of the request's prompts, or an error
    saying what mlx-lm cannot do. One prompt goes through mlx-lm's stream_generate, several at
    once through its BatchGenerator (continuous batching), as mlx-lm's own servers do."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    s = request["sampling"]
    prompts, depth, kv = request["prompts"], request.get("depth", 0), request.get("kv", {})
    batched = len(prompts) > 1
    if kv.get("kv_bits") and kv.get("max_kv_size"):
        return "mlx-lm cannot quantize a rotating cache"
    if kv.get("kv_bits") and batched:
        return "mlx-lm's BatchGenerator has no quantized KV cache"
    mx.random.seed(request["seed"])

    def sampler():
        return make_sampler(
            temp=s["temperature"], top_p=s["top_p"], min_p=s["min_p"], top_k=s["top_k"]
        )

    def processors():
        return make_logits_processors(
            repetition_penalty=s["repetition_penalty"] if s["repetition_penalty"] != 1.0 else None,
            presence_penalty=s["presence_penalty"] or None,
            frequency_penalty=s["frequency_penalty"] or None,
        )

    caches = []
    for prompt in prompts:  # each row's context, computed first and not timed
        cache = make_prompt_cache(model, max_kv_size=kv.get("max_kv_size"))
        if depth:
            model(mx.array([prompt[:depth]]), cache=cache)
            mx.eval([c.state for c in cache])
        caches.append(cache)
    prompts = [p[depth:] for p in prompts]
    mx.reset_peak_memory()
    if not batched:
        return [
            _one(
                model, tokenizer, prompts[0], caches[0], request["gen"], sampler(), processors(), kv
            )
        ]
    return _batch(model, prompts, caches, request["gen"], sampler, processors, kv)


def _one(model, tokenizer, prompt, cache, gen, sampler, processors, kv):

    from mlx_lm.generate import stream_generate

    options = {}
    if kv.get("kv_bits"):
        options.update(kv_bits=kv["kv_bits"], kv_group_size=64, quantized_kv_start=0)
    start, times, tokens = time.perf_counter(), [], []
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=gen,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=cache,
        **options,
    ):
        times.append(time.perf_counter())
        tokens.append(response.token)
    return prompt, start, times, tokens


def _batch(model, prompts, caches, gen, sampler, processors, kv):
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(
        model,
        max_tokens=gen,
        completion_batch_size=len(prompts),
        prefill_batch_size=len(prompts),
        max_kv_size=kv.get("max_kv_size"),
    )
    start = time.perf_counter()
    uids = generator.insert(
        prompts,
        [gen] * len(prompts),
        caches=caches,
        samplers=[sampler() for _ in prompts],
        logits_processors=[processors() for _ in prompts],
    )
    times = {uid: [] for uid in uids}
    tokens = {uid: [] for uid in uids}
    try:
        while responses := generator.next_generated():
            now = time.perf_counter()
            for r in responses:
                times[r.uid].append(now)
                tokens[r.uid].append(r.token)
    finally:
        generator.close()
    return [(p, start, times[u], tokens[u]) for p, u in zip(prompts, uids, strict=True)]


if __name__ == "__main__":
    _serve(sys.argv[1])
