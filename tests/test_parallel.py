"""Tensor and pipeline parallelism (parallel.py) over MLX's ring backend: two (or three) real rank
processes on loopback, each loading its part, against one process running the whole model (itself
checked against transformers elsewhere); the faults (a rank alone, a rank killed, different models
per rank); the sharding plan as plain functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxinfer.bench.servers import free_port
from mlxinfer.config import ModelConfig, ModelLoadError
from mlxinfer.parallel import head_shard, shard_config

from .reference import GEMMA3_ROPE, make_tiny_checkpoint, rel_err

WORKER = Path(__file__).parent / "tools" / "parallel_worker.py"
ENGINE_WORKER = Path(__file__).parent / "tools" / "engine_worker.py"
ROOT = Path(__file__).parent.parent


def _config(heads: int, kv_heads: int, intermediate: int = 128) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
    )


# -- the plan ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "heads, kv_heads, size, expected",
    [
        (4, 2, 2, [(0, 2, 0, 1), (2, 4, 1, 2)]),  # GQA, one KV head each
        (9, 3, 2, [(0, 6, 0, 2), (6, 9, 2, 3)]),  # SmolLM2: 2 + 1 KV heads with their groups
        (9, 1, 2, [(0, 5, 0, 1), (5, 9, 0, 1)]),  # MQA: the KV head on both, queries split
        (8, 2, 4, [(0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 1, 2), (6, 8, 1, 2)]),
        (8, 8, 3, [(0, 3, 0, 3), (3, 6, 3, 6), (6, 8, 6, 8)]),  # MHA over 3 ranks
    ],
)
def test_heads_go_to_ranks_with_their_query_groups(heads, kv_heads, size, expected):
    config = _config(heads, kv_heads)
    shards = [head_shard(config, rank, size) for rank in range(size)]
    assert [(s.q0, s.q1, s.kv0, s.kv1) for s in shards] == expected
    for s in shards:  # every rank runs plain GQA: whole query groups per local KV head
        assert (s.q1 - s.q0) % (s.kv1 - s.kv0) == 0
    # every query head exactly once, and with the KV head it has in the full model
    groups = heads // kv_heads
    owned = [(q, q // groups) for s in shards for q in range(s.q0, s.q1)]
    assert sorted(q for q, _ in owned) == list(range(heads))
    for s in shards:
        local_groups = (s.q1 - s.q0) // (s.kv1 - s.kv0)
        for q in range(s.q0, s.q1):
            assert s.kv0 + (q - s.q0) // local_groups == q // groups


def test_impossible_head_splits_are_refused_by_name():
    with pytest.raises(ModelLoadError, match="3 KV heads"):
        head_shard(_config(9, 3), 0, 4)  # 4 ranks: more than 3 and not a multiple
    with pytest.raises(ModelLoadError, match="serves 1 query heads"):
        head_shard(_config(2, 2), 0, 4)  # each KV head would be split over 2 ranks


def test_mlp_widths_add_up_over_the_ranks():
    config = _config(6, 3, intermediate=130)
    widths = [shard_config(config, r, 3).intermediate_size for r in range(3)]
    assert widths == [44, 43, 43]


# -- two ranks on loopback -----------------------------------------------------------------------


def start_ranks(
    models: list[Path],
    out: Path,
    *extra: str,
    mode: str = "tensor",
    worker: Path = WORKER,
    rank_flags: dict[int, list[str]] | None = None,
    timeout_s: int | None = None,
) -> list[subprocess.Popen]:
    """One `worker` process per entry of `models` (rank r loads models[r], with rank_flags[r] if
    any), as one ring group on 127.0.0.1 (a fresh port each); `timeout_s` is the ranks'
    MLXINFER_PARALLEL_TIMEOUT."""
    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in models]))
    procs = []
    for rank, model in enumerate(models):
        env = {
            **os.environ,
            "MLX_HOSTFILE": str(hostfile),
            "MLX_RANK": str(rank),
            "PYTHONPATH": str(ROOT),
        }
        if timeout_s is not None:
            env["MLXINFER_PARALLEL_TIMEOUT"] = str(timeout_s)
        command = [sys.executable, str(worker), str(model), str(out), "--parallel", mode]
        procs.append(
            subprocess.Popen(
                [*command, *extra, *(rank_flags or {}).get(rank, [])],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Each rank's (exit status, output); all are killed if any outlives `timeout` seconds."""
    results = []
    for p in procs:
        try:
            results.append((p.returncode, p.communicate(timeout=timeout)[0]))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return [(p.returncode, text) for p, (_, text) in zip(procs, results, strict=True)]


def run_ranks(
    model: Path,
    out: Path,
    *extra: str,
    ranks: int = 2,
    mode: str = "tensor",
    timeout: int = 240,
    worker: Path = WORKER,
) -> None:
    """Run `ranks` workers on `model` as one group and wait for all; any rank failing fails the
    test with its output."""
    procs = start_ranks([model] * ranks, out, *extra, mode=mode, worker=worker)
    results = finish(procs, timeout)
    if any(code != 0 for code, _ in results):  # every rank's story: the first to fail may be any
        pytest.fail(
            "\n".join(
                f"rank {rank} exited {code}:\n{text[-2000:]}"
                for rank, (code, text) in enumerate(results)
            )
        )


def run_alone(model: Path, out: Path, *extra: str, worker: Path = WORKER) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLX_HOSTFILE", None)
    env.pop("MLX_RANK", None)
    result = subprocess.run(
        [sys.executable, str(worker), str(model), str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if worker == ENGINE_WORKER:
        return json.loads((out / "rank0.json").read_text())
    return dict(np.load(out / "rank0.npz"))


def matches_one_process(
    model: Path, tmp_path: Path, *flags: str, mode: str = "tensor", sizes: tuple = (2,)
) -> tuple[dict, dict[int, list[dict]]]:
    """The worker alone, then as a group of each of `sizes` ranks: every rank gives one process's
    figures (_compare). Returns (alone, {size: each rank's figures})."""
    alone_dir = tmp_path / "alone"
    alone_dir.mkdir()
    alone = run_alone(model, alone_dir, *flags)
    groups = {}
    for size in sizes:
        ranks_dir = tmp_path / f"ranks{size}"
        ranks_dir.mkdir()
        run_ranks(model, ranks_dir, *flags, ranks=size, mode=mode)
        groups[size] = [dict(np.load(ranks_dir / f"rank{r}.npz")) for r in range(size)]
        _compare(groups[size], alone)
    return alone, groups


TP_CASES = {  # family, checkpoint overrides, worker flags
    "llama-gqa": ("llama", {}, []),
    "llama-mqa": ("llama", {"num_key_value_heads": 1, "num_attention_heads": 4}, []),
    "qwen2-bias": ("qwen2", {}, []),
    "qwen3-qk-norm": ("qwen3", {}, ["--kernels", "mlx"]),
    "phi3-fused": ("phi3", {}, []),
    "mistral-window": ("mistral", {"sliding_window": 8}, ["--kernels", "mlx"]),
    "mixtral-moe": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, []),
    "qwen2-moe-shared": (  # routed experts, a gated shared expert, and a dense layer
        "qwen2_moe",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 96,
            "mlp_only_layers": [1],
        },
        [],
    ),
    "llama-quantized-kv": ("llama", {"head_dim": 32}, ["--kv-bits", "8"]),  # groups of 32
    "llama-rotating": ("llama", {}, ["--max-kv-size", "10"]),
    # norms after attention and MLP (outside the sums), soft-caps, a local RoPE
    "gemma2-softcap": ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": 2.0}, []),
    "gemma3-local-rope": (
        "gemma3_text",
        {"sliding_window": 8, "sliding_window_pattern": 2, "rope_parameters": GEMMA3_ROPE},
        [],
    ),
}


@pytest.mark.exactness  # CI runs these under each op set
@pytest.mark.parametrize("case", list(TP_CASES), ids=str)
def test_tensor_parallel_matches_one_process(case, tmp_path):
    """Two ranks give the logits of one process (full forward, and prefill + decode through the
    cache) within 1e-5 relative, the same greedy tokens, the same seeded sample, and each holds
    its own slices (less than the whole model's bytes)."""
    family, overrides, flags = TP_CASES[case]
    model = tmp_path / "model"
    make_tiny_checkpoint(model, family, **overrides)
    alone, groups = matches_one_process(model, tmp_path, *flags)
    assert sum(int(r["heads"][0]) for r in groups[2]) == int(alone["heads"][0])


def _compare(results: list[dict], alone: dict) -> None:
    for rank, got in enumerate(results):
        assert rel_err(got["full"], alone["full"]) < 1e-5, rank
        assert rel_err(got["steps"], alone["steps"]) < 1e-5, rank
        assert got["tokens"].tolist() == alone["tokens"].tolist(), rank
        assert str(got["sampled"]) == str(alone["sampled"]), rank
        assert got["nbytes"] < alone["nbytes"], rank


@pytest.mark.exactness  # CI runs these under each op set
@pytest.mark.parametrize("compute", ["native", "float32"])
def test_tensor_parallel_reads_a_4bit_mlx_lm_directory(compute, tmp_path):
    """A directory written by mlx_lm.convert (4-bit, groups of 32): quantized layers sliced
    between groups (o_proj and down_proj by their packed columns), run quantized or dequantized."""
    import mlx_lm

    source, model = tmp_path / "hf", tmp_path / "q4"
    make_tiny_checkpoint(source, "llama")
    mlx_lm.convert(str(source), str(model), quantize=True, q_group_size=32, q_bits=4)
    matches_one_process(model, tmp_path, "--compute", compute)


@pytest.fixture
def default_model_path() -> Path:
    """The default model's file (skipped where conftest's default_model would be)."""
    import mlxinfer

    try:
        return mlxinfer.default_model_path()
    except FileNotFoundError:
        if os.environ.get("MLXINFER_TESTS_WITHOUT_DEFAULT_MODEL") == "1":
            pytest.skip("the default model is not installed here")
        raise


@pytest.mark.exactness  # CI runs these under each op set
def test_tensor_parallel_on_the_default_model(default_model_path, tmp_path):
    """SmolLM2-135M (GGUF): 9 query heads over 3 KV heads on 2 ranks, 6 + 3 heads; each rank holds
    its heads, half of each MLP, and the replicated embedding (tied LM head) and norms."""
    alone, groups = matches_one_process(default_model_path, tmp_path, "--prompt-tokens", "40")
    results = groups[2]
    assert [r["heads"].tolist() for r in results] == [[6, 2], [3, 1]]
    # measured: 135M parameters, of which the 28M-entry embedding is on both ranks
    assert 0.5 < results[0]["nbytes"] / alone["nbytes"] < 0.75


def test_ranks_that_load_different_models_say_so(tmp_path):
    """Two ranks given different checkpoints: both stop with an error naming the mismatch,
    never a hang or different answers."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_tiny_checkpoint(a, "llama")
    make_tiny_checkpoint(b, "llama", intermediate_size=192)
    out = tmp_path / "out"
    out.mkdir()
    results = finish(start_ranks([a, b], out), timeout=120)
    for rank, (code, text) in enumerate(results):
        assert code != 0, rank
        assert "the ranks loaded different models" in text, text[-2000:]


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_mlx_launch_runs_generate_in_parallel(mode, tmp_path):
    """`mlx.launch --backend ring -n 2 python -m mlxinfer generate --parallel MODE ...`: the
    text once (rank 0), equal to one process's; mlx.launch can exit 0 although ranks failed, so
    the output itself is checked."""
    model = tmp_path / "model"
    make_tiny_checkpoint(model, "llama")
    args = ["generate", "--model", str(model), "--raw", "--prompt", "a b c", "--max-tokens", "8"]
    args += ["--json", "--kernels", "mlx"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    alone = subprocess.run(
        [sys.executable, "-m", "mlxinfer", *args], env=env, capture_output=True, text=True
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    launch = Path(sys.executable).with_name("mlx.launch")
    ranks = subprocess.run(
        [str(launch), "--backend", "ring", "-n", "2", "--starting-port", str(free_port())]
        + [sys.executable, "-m", "mlxinfer", *args, "--parallel", mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in ranks.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, ranks.stdout[-2000:] + ranks.stderr[-2000:]  # rank 0 only
    expected = json.loads(alone.stdout)
    got = json.loads(lines[0])
    assert got["token_ids"] == expected["token_ids"]
    assert got["text"] == expected["text"]


def test_mlx_launch_runs_chat_in_parallel(default_model_path):
    """`mlx.launch ... mlxinfer chat --parallel tensor --json` with two turns piped in: rank 0
    answers each once (the default model's known answers, the second using the first's
    history); the other rank follows rank 0's engine and ends with it."""
    launch = Path(sys.executable).with_name("mlx.launch")
    command = [sys.executable, "-m", "mlxinfer", "chat", "--model", str(default_model_path)]
    command += ["--parallel", "tensor", "--max-tokens", "12", "--json"]
    ranks = subprocess.run(
        [str(launch), "--backend", "ring", "-n", "2", "--starting-port", str(free_port())]
        + command,
        # (/exit: mlx.launch does not pass the end of its input on to rank 0)
        input="What is the capital of France?\nAnd of Germany?\n/exit\n",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [json.loads(line) for line in ranks.stdout.splitlines() if line.startswith("{")]
    assert ranks.returncode == 0 and len(lines) == 2, ranks.stdout[-2000:] + ranks.stderr[-2000:]
    assert "Paris" in lines[0]["text"] and "Berlin" in lines[1]["text"], lines


def test_a_rank_whose_peers_never_start_stops_with_an_error(tmp_path):
    """Rank 0 of 2 started alone: it says what it waits for and how long, and exits with an
    error after that (MLX's ring backend would wait forever)."""
    model = tmp_path / "model"
    make_tiny_checkpoint(model, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "hosts.json").write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    env = {
        **os.environ,
        "MLX_HOSTFILE": str(out / "hosts.json"),
        "MLX_RANK": "0",
        "PYTHONPATH": str(ROOT),
        "MLXINFER_PARALLEL_TIMEOUT": "5",
    }
    result = subprocess.run(
        [sys.executable, str(WORKER), str(model), str(out), "--parallel", "tensor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "connecting to the other ranks" in result.stderr
    assert "exits if they have not connected within 5 s" in result.stderr
    assert "Timeout (0:00:05)!" in result.stderr and "init_group" in result.stderr


def test_a_rank_that_dies_mid_generation_stops_its_peer(tmp_path):
    """Rank 1 killed while both decode: rank 0 ends with MLX's error about the lost peer within
    60 s, never a hang."""
    model = tmp_path / "model"
    make_tiny_checkpoint(model, "llama")
    out = tmp_path / "out"
    out.mkdir()
    procs = start_ranks([model, model], out, "--forever")
    try:
        for line in procs[1].stdout:  # both ranks are past loading and into the decode loop
            if "decoding" in line:
                break
        procs[1].kill()
        text = procs[0].communicate(timeout=60)[0]
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0
    assert "[ring]" in text and ("lost" in text or "closed" in text), text[-2000:]


PIPELINE_CASES = [
    "llama-gqa",
    "qwen3-qk-norm",
    "phi3-fused",
    "mistral-window",
    "qwen2-moe-shared",
    "llama-quantized-kv",
    "llama-rotating",
    "gemma3-local-rope",
]


@pytest.mark.exactness  # CI runs these under each op set
@pytest.mark.parametrize("case", PIPELINE_CASES, ids=str)
def test_pipeline_parallel_matches_one_process(case, tmp_path):
    """Two stages (one block each on these 2-layer models): the logits of one process, full
    forward and through the caches, the same greedy and seeded tokens on both ranks."""
    family, overrides, flags = TP_CASES[case]
    model = tmp_path / "model"
    make_tiny_checkpoint(model, family, **overrides)
    matches_one_process(model, tmp_path, *flags, mode="pipeline")


@pytest.mark.exactness  # CI runs these under each op set
def test_pipeline_parallel_on_the_default_model(default_model_path, tmp_path):
    """SmolLM2-135M (GGUF, 30 layers): 15 blocks a rank, on three ranks 10 each."""
    flags = ("--prompt-tokens", "40")
    matches_one_process(default_model_path, tmp_path, *flags, mode="pipeline", sizes=(2, 3))


def test_an_explicit_pipeline_split_gives_each_rank_its_blocks(default_model_path, tmp_path):
    """pipeline_split=(22, 8) on the default model's 30 layers: rank 0 holds 22 blocks and rank 1
    8, with one process's logits (the comparison of matches_one_process)."""
    flags = ("--prompt-tokens", "24", "--pipeline-split", "22,8")
    _, groups = matches_one_process(default_model_path, tmp_path, *flags, mode="pipeline")
    assert [int(r["layers"]) for r in groups[2]] == [22, 8]


@pytest.mark.parametrize(
    "split, message",
    [
        ((1, 1, 1), "has 3 parts for 2 ranks"),
        ((2, 0), "each rank needs at least one block"),
        ((1, 2), "add up to the model's 2 layers"),
    ],
)
def test_a_pipeline_split_that_does_not_fit_is_refused_by_name(split, message):
    from mlxinfer.parallel import layer_range

    with pytest.raises(ModelLoadError, match=f"pipeline_split .*{message}"):
        layer_range(2, 0, 2, split)


def test_parallel_arguments_are_checked_by_name(tiny):
    """A mode that does not exist, or a group without a mode: ValueError naming `parallel`.
    Without a launcher the group has one rank: the model loads whole and runs alone."""
    import mlx.core as mx

    import mlxinfer

    with pytest.raises(ValueError, match="parallel must be one of tensor, pipeline or None"):
        mlxinfer.load(tiny, parallel="data")
    with pytest.raises(ValueError, match="a group was given without parallel="):
        mlxinfer.load(tiny, group=mx.distributed.init())
    with pytest.raises(ValueError, match="pipeline_split is for parallel='pipeline'"):
        mlxinfer.load(tiny, parallel="tensor", pipeline_split=[1, 1])
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    code = (
        f"import mlxinfer; m, _ = mlxinfer.load({tiny!r}, parallel='tensor'); "
        "print(m.ranks, m.config.num_attention_heads)"
    )
    alone = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert alone.stdout.split() == ["None", "4"]


# -- the Engine over ranks -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf"])
def test_a_bad_parallel_timeout_is_refused_by_name(value, monkeypatch):
    from mlxinfer.engine_ranks import stall_timeout

    monkeypatch.setenv("MLXINFER_PARALLEL_TIMEOUT", value)
    with pytest.raises(ValueError, match="MLXINFER_PARALLEL_TIMEOUT must be a number of seconds"):
        stall_timeout()


def said_rank_lost(output: str) -> bool:
    """The engine stopped on a lost rank: MLX's error from a failed transfer, or the engine's own
    when no reply came in the ranks' timeout (10 s in these tests)."""
    return "engine stopped: " in output and (
        "[ring] connection to a peer was lost" in output
        or "had no reply from the other ranks for 10 s" in output
        or "arrived damaged; the connection to a peer was lost" in output
    )


MARGIN = 1e-3  # as test_engine.py: past a near tie, other rounding may rightly pick the other token


ENGINE_CASES = {  # mode, family, checkpoint overrides
    "tensor": ("tensor", "llama", {}),
    "pipeline": ("pipeline", "llama", {}),
    # stage 0 holds a full-attention layer, stage 1 a windowed one: what the stages' own caches
    # would say about the prefix cache differs, what the whole model says does not
    "pipeline-mixed-windows": (
        "pipeline",
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1},
    ),
}


@pytest.mark.exactness  # CI runs these under each op set
@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_the_engine_over_ranks_gives_one_process_tokens(case, tmp_path):
    """An Engine of 4 rows over two ranks, rank 0 taking 8 ragged requests (greedy, seeded and
    unseeded sampling), one cancelled after its second token, then a prefix-cache hit: every
    greedy request gets the tokens of its prompt run alone in one process (up to a near tie), the
    seeded ones the tokens of one process's Engine, the cancelled one a prefix of its own; both
    ranks take the same number of steps (each checks its tokens against rank 0's every step)."""
    mode, family, overrides = ENGINE_CASES[case]
    model = tmp_path / "model"
    make_tiny_checkpoint(model, family, **overrides)
    (tmp_path / "alone").mkdir()
    (tmp_path / "ranks").mkdir()
    alone = run_alone(model, tmp_path / "alone", worker=ENGINE_WORKER)
    run_ranks(model, tmp_path / "ranks", mode=mode, worker=ENGINE_WORKER)
    got = json.loads((tmp_path / "ranks" / "rank0.json").read_text())
    other = json.loads((tmp_path / "ranks" / "rank1.json").read_text())

    assert got["reasons"] == alone["reasons"] == [*["length"] * 4, "cancelled", *["length"] * 4]
    assert got["errors"] == [None] * 9
    compared = 0
    for i in (0, 3, 6, 8):  # greedy; 8 shares 24 prompt tokens with an earlier prompt
        tokens, margins = alone["reference"][i]
        near_tie = next((j for j, m in enumerate(margins) if m < MARGIN), len(tokens) - 1)
        assert got["tokens"][i][: near_tie + 1] == tokens[: near_tie + 1], i
        compared += near_tie + 1
    assert compared >= 20  # near ties cut a comparison short only now and then
    for i in (1, 7):  # seeded sampling
        assert got["tokens"][i] == alone["tokens"][i], i
    cancelled, (reference, _) = got["tokens"][4], alone["reference"][4]
    assert 2 <= len(cancelled) < len(reference) and cancelled == reference[: len(cancelled)]
    assert got["prefix_cache_hits"] == alone["prefix_cache_hits"] >= 1
    assert got["steps"] == other["steps"] > 0
    assert got["next_seed"] == other["next_seed"]  # unseeded draws after the engine stay shared


def test_ranks_whose_tokens_differ_stop_with_an_error(tmp_path):
    """Rank 1's logits perturbed: it sees that its tokens differ from rank 0's after the first
    step and stops saying so; rank 0, left waiting, gives up within the ranks' timeout and ends
    its requests with an error. Neither hangs."""
    model = tmp_path / "model"
    make_tiny_checkpoint(model, "llama")
    procs = start_ranks(
        [model, model],
        tmp_path,
        worker=ENGINE_WORKER,
        rank_flags={1: ["--perturb"]},
        timeout_s=10,
    )
    (code0, text0), (code1, text1) = finish(procs, timeout=120)
    assert code1 != 0 and "this rank sampled other tokens than rank 0" in text1, text1[-2000:]
    assert code0 != 0 and said_rank_lost(text0), text0[-2000:]


@pytest.mark.parametrize("killed", [1, 0])
def test_an_engine_whose_rank_dies_ends_with_an_error(killed, tmp_path):
    """One rank killed while the Engine decodes: the survivor ends every request with an error
    (rank 0) or stops waiting (rank 1) within the ranks' timeout, and exits with an error."""
    model = tmp_path / "model"
    make_tiny_checkpoint(model, "llama")
    procs = start_ranks([model, model], tmp_path, "--forever", worker=ENGINE_WORKER, timeout_s=10)
    survivor = procs[1 - killed]
    try:
        for p in procs:  # both are past loading and in the engine's loop
            for line in p.stdout:
                if "decoding" in line:
                    break
        procs[killed].kill()
        text = survivor.communicate(timeout=60)[0]
    finally:
        for p in procs:
            p.kill()
    assert survivor.returncode not in (0, None)
    assert said_rank_lost(text), text[-2000:]


# -- mlxinfer serve over ranks -------------------------------------------------------------------


def start_serving(model: Path, out: Path, mode: str = "tensor") -> tuple[list, str]:
    """`mlxinfer serve --parallel MODE` as two ranks on loopback, as mlx.launch starts it (each
    with MLX_HOSTFILE and MLX_RANK); (processes, rank 0's URL) once /health answers 200."""
    import time
    import urllib.error
    import urllib.request

    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MLX_HOSTFILE": str(hostfile),
            "MLX_RANK": str(rank),
            "MLXINFER_PARALLEL_TIMEOUT": "10",
        }
        command = [sys.executable, "-m", "mlxinfer", "serve", "--model", str(model)]
        command += [
            "--parallel",
            mode,
            "--port",
            str(port),
            "--model-name",
            "SmolLM2-135M-Instruct",
        ]
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115  (open while it runs)
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return procs, url
        except (OSError, urllib.error.HTTPError):
            pass
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            logs = [(out / f"rank{r}.log").read_text()[-2000:] for r in range(2)]
            pytest.fail("the ranks did not start serving:\n" + "\n".join(logs))
        time.sleep(0.5)


def ask(url: str, content: str, max_tokens: int = 8) -> tuple[int, dict]:
    """(status, JSON) of a greedy chat completion."""
    import urllib.error
    import urllib.request

    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_serve_over_ranks_answers_and_both_ranks_stop_at_sigterm(default_model_path, tmp_path):
    """`mlxinfer serve --parallel tensor` as two ranks: rank 0 answers the default model's known
    answer; SIGTERM to every rank (what mlx.launch forwards) stops both with status 0: rank 1
    keeps running rank 0's steps until rank 0 has drained and closed the engine."""
    import signal

    procs, url = start_serving(default_model_path, tmp_path)
    try:
        status, reply = ask(url, "What is the capital of France?")
        assert status == 200, reply
        assert "Paris" in reply["choices"][0]["message"]["content"]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [0, 0], logs
    assert "split over 2 ranks (tensor parallel)" in logs[0]
    assert "on http://" not in logs[1]  # only rank 0 serves


def test_serve_answers_503_once_a_rank_is_lost(default_model_path, tmp_path):
    """Rank 1 killed: rank 0's engine stops within the ranks' timeout (10 s here) and the server
    says so: /health and new requests answer 503 naming the lost rank, never a hang."""
    import time

    procs, url = start_serving(default_model_path, tmp_path, mode="pipeline")
    try:
        assert ask(url, "What is the capital of France?")[0] == 200
        procs[1].kill()
        deadline = time.monotonic() + 30
        while health(url) != 503:
            assert time.monotonic() < deadline, "rank 0 still says it is healthy"
            time.sleep(0.5)
        status, reply = ask(url, "And of Germany?")
        assert status == 503, reply
        message = reply["error"]["message"]  # MLX's error, or ours after the timeout
        assert said_rank_lost(message), message
    finally:
        for p in procs:
            p.kill()


class _FakeGroup:
    def __init__(self, rank: int):
        self._rank = rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return 2


def test_a_damaged_turn_is_an_error_naming_a_lost_connection():
    """Rank 0 killed while its messages were being summed left rank 1 holding part of them (MLX's
    ring fails its pending transfers without raising): read as JSON, that was a
    UnicodeDecodeError. The header's CRC of the payload tells a damaged turn from a whole one."""
    from mlxinfer.engine_ranks import RankLink

    sent: list[np.ndarray] = []
    leader = RankLink(_FakeGroup(0))
    leader._all_sum = lambda values: sent.append(values.copy()) or values  # type: ignore[method-assign]
    leader.send([("close", True)], idle=False)
    header, payload = sent

    def follower(received: list[np.ndarray]) -> RankLink:
        link = RankLink(_FakeGroup(1))
        link._all_sum = lambda values: received.pop(0)  # type: ignore[method-assign]
        return link

    messages, _ = follower([header, payload]).receive()
    assert messages == [("close", True)]
    damaged = payload.copy()
    damaged[len(damaged) // 2 :] = 0  # what a transfer failed halfway leaves
    with pytest.raises(RuntimeError, match="arrived damaged; the connection to a peer was lost"):
        follower([header, damaged]).receive()
