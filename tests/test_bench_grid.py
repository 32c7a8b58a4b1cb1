"""The sweep grid: parsing comma lists and TOML-style lists, every bad value named with its axis
before anything runs, and the expansion into configurations."""

from __future__ import annotations

import json

import pytest

from mlxinfer.bench.grid import AXES, DEFAULTS, config_key, expand, parse_axes, parse_kv


def test_comma_lists_expand_to_every_combination():
    axes = parse_axes({"temperature": "0,0.8", "top_p": "1.0, 0.9", "prompt_tokens": "64,512"})
    assert axes["temperature"] == [0.0, 0.8] and axes["prompt_tokens"] == [64, 512]
    configs = list(expand(axes))
    assert len(configs) == 8
    assert {(c["temperature"], c["top_p"], c["prompt_tokens"]) for c in configs} == {
        (t, p, n) for t in (0.0, 0.8) for p in (1.0, 0.9) for n in (64, 512)
    }
    assert all(c["gen_tokens"] == DEFAULTS["gen_tokens"] for c in configs)
    assert len({config_key(c) for c in configs}) == 8  # keys tell configurations apart
    assert set(configs[0]) == set(AXES)


def test_lists_and_single_values_as_a_toml_table_gives_them():
    axes = parse_axes({"top_k": [0, 40], "kv": ["full", "q8", "q4:rotating:256"], "depth": 512})
    assert axes["top_k"] == [0, 40] and axes["depth"] == [512]
    assert parse_kv("q4:rotating:256") == {"max_kv_size": 256, "kv_bits": 4}
    assert parse_kv("rotating:64") == {"max_kv_size": 64, "kv_bits": None}
    assert parse_kv("full") == {"max_kv_size": None, "kv_bits": None}


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"temperature": "0,-1"}, "sweep axis 'temperature': temperature must be in"),
        ({"top_p": "0.9,x"}, "sweep axis 'top_p': 'x' is not a number"),
        ({"top_k": "1.5"}, "sweep axis 'top_k': '1.5' is not an integer"),
        ({"prompt_tokens": "0"}, "sweep axis 'prompt_tokens': 0 must be >= 1"),
        ({"depth": "-5"}, "sweep axis 'depth': -5 must be >= 0"),
        ({"kv": "q3"}, "sweep axis 'kv': 'q3' is not one of"),
        ({"kv": "rotating:abc"}, "sweep axis 'kv': 'rotating:abc'"),
        ({"compute": "fp16"}, "sweep axis 'compute': 'fp16' is not float32 or native"),
        ({"min_p": "nan"}, "sweep axis 'min_p'"),
        ({"temprature": "0"}, "unknown sweep axis 'temprature'"),
        ({"temperature": "0,0"}, "repeats a value"),
        ({"concurrency": []}, "has no values"),
        ({"parallel": "data:2"}, "sweep axis 'parallel': 'data:2' is not none, tensor:N or"),
        ({"parallel": "tensor:1"}, "sweep axis 'parallel': 'tensor:1': at least 2 ranks"),
        ({"parallel": "pipeline:x"}, "'pipeline:x': ranks must be an integer"),
        ({"spec": "lookup"}, "sweep axis 'spec': 'lookup' is not none, prompt-lookup, prompt-"),
        ({"spec": "draft"}, "sweep axis 'spec': 'draft': draft:PATH needs the draft's path"),
        ({"spec": "draft::3"}, "'draft::3': draft:PATH needs the draft's path"),
        ({"spec": "draft:/m:0"}, "'draft:/m:0': N must be a whole number of proposals"),
        ({"spec": "prompt-lookup:9"}, "'prompt-lookup:9': N must be a whole number of proposals"),
        ({"spec": "none:2"}, "sweep axis 'spec': 'none:2' is not none"),
    ],
)
def test_a_bad_value_names_its_axis(raw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_axes(raw)


def test_defaults_are_sampling_params_own():
    from dataclasses import fields

    from mlxinfer.bench.grid import SAMPLING_AXES
    from mlxinfer.sampling import SamplingParams

    own = {f.name: f.default for f in fields(SamplingParams) if f.name in SAMPLING_AXES}
    assert own == {a: DEFAULTS[a] for a in SAMPLING_AXES}


def test_chosen_sampling_combinations_instead_of_their_grid():
    axes = parse_axes(
        {
            "sampling": [{}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.7, "top_k": 40}],
            "prompt_tokens": "64,256",
        }
    )
    configs = list(expand(axes))
    assert len(configs) == 6
    assert [(c["temperature"], c["top_p"], c["top_k"]) for c in configs[::2]] == [
        (0.0, 1.0, 0),
        (0.7, 0.9, 0),
        (0.7, 1.0, 40),
    ]
    with pytest.raises(ValueError, match=r"\[\[sampling\]\] 1: 'temp' is not a sampling setting"):
        parse_axes({"sampling": [{"temp": 0.7}]})
    with pytest.raises(ValueError, match="set both alone and in"):
        parse_axes({"sampling": [{}], "top_p": "0.9"})
    with pytest.raises(ValueError, match="sweep axis 'min_p'"):
        parse_axes({"sampling": [{"min_p": 2.0}]})


@pytest.mark.parametrize(
    "tables, message",
    [
        ([{}, {}], r"\[\[sampling\]\] 1 and 2 are the same settings \(greedy\)"),
        ([{}, {"temperature": 0.0}], r"1 and 2 are the same settings \(greedy\)"),
        (
            [{"temperature": 0.7}, {"top_k": 5}, {"temperature": "0.7"}],
            r"1 and 3 are the same settings \(T 0.7\)",
        ),
    ],
)
def test_repeated_sampling_tables_are_refused_before_running(tables, message):
    """Two equal [[sampling]] tables (the defaults spelled out count) crashed a sweep after
    measuring (sqlite3.IntegrityError, the run left "running"): refused as a repeated value on
    an axis is."""
    with pytest.raises(ValueError, match=message):
        parse_axes({"sampling": tables})


def test_sampling_label_names_what_differs_from_greedy():
    from mlxinfer.bench.grid import DEFAULTS, sampling_label

    assert sampling_label(DEFAULTS) == "greedy"
    assert sampling_label({**DEFAULTS, "temperature": 0.7, "top_p": 0.9}) == "T 0.7, top-p 0.9"


def hundred(axis_values):
    return ",".join(str(v) for v in axis_values)


HUGE = {  # four axes of 100 values: 100 million configurations
    "temperature": hundred(i / 50 for i in range(100)),
    "top_k": hundred(range(100)),
    "top_p": hundred(1 - i / 200 for i in range(100)),
    "min_p": hundred(i / 200 for i in range(100)),
}


def test_a_grid_past_the_limit_is_refused_by_its_count_before_it_is_expanded():
    """Four axes of 100 values: `mlxinfer bench` grew to 3 GB in 18 s expanding them, saying
    nothing. The count is the product of the axes' lengths, and past MAX_CONFIGURATIONS the
    grid is refused with it and how to shrink it; expand() refuses it before the first one."""
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError) as refused:
        parse_axes(HUGE)
    assert time.perf_counter() - start < 5  # counted, not expanded
    message = str(refused.value)
    assert message.startswith("the grid has 100,000,000 configurations (temperature 100 x top_k ")
    from mlxinfer.bench.grid import MAX_CONFIGURATIONS, count

    assert f"more than the {MAX_CONFIGURATIONS:,}" in message and "fewer values" in message
    by_hand = {name: [DEFAULTS[name]] for name in AXES} | {"top_k": list(range(10_001))}
    with pytest.raises(ValueError, match="10,001 configurations"):
        next(expand(by_hand))
    sampling = parse_axes({"sampling": [{}, {"temperature": 0.7}], "prompt_tokens": "8,16,32"})
    assert count(sampling) == len(list(expand(sampling))) == 6
    edge = ",".join(str(n) for n in range(1, 101))  # 100 x 100 = the limit exactly: allowed
    assert count(parse_axes({"prompt_tokens": edge, "gen_tokens": edge})) == MAX_CONFIGURATIONS


@pytest.mark.parametrize("text", ["0,0.8,", ",0.8", "0,,0.8", " , "])
def test_a_comma_too_many_is_named_not_called_a_bad_number(text):
    """A trailing comma in a box said "'' is not a number"."""
    with pytest.raises(ValueError) as err:
        parse_axes({"temperature": text})
    message = str(err.value)
    assert message.startswith("sweep axis 'temperature'") and "''" not in message
    assert "empty value between commas" in message or "has no values" in message


def test_parallel_values_are_normalized_and_older_runs_keep_their_keys():
    """ "tensor" is two ranks; a configuration at parallel=none has the key it had before the
    axis existed (a run recorded then resumes), and settings read back get the axis filled in."""
    from mlxinfer.bench.grid import config_key, with_defaults

    axes = parse_axes({"parallel": "none,tensor,pipeline:3"})
    assert axes["parallel"] == ["none", "tensor:2", "pipeline:3"]
    config = dict(DEFAULTS)
    older = {k: v for k, v in config.items() if k != "parallel"}
    assert config_key(config) == config_key(older)
    assert "parallel" not in json.loads(config_key(config))
    assert json.loads(config_key({**config, "parallel": "tensor:2"}))["parallel"] == "tensor:2"
    assert with_defaults(older)["parallel"] == "none"


def test_the_spec_axis_sets_speculation_and_older_runs_keep_their_keys():
    """spec (speculative decoding) reaches each request's SamplingParams; at "none" a
    configuration has the key it had before the axis existed."""
    from mlxinfer.bench.grid import sampling_params, spec_draft, with_defaults

    axes = parse_axes(
        {"spec": "none,prompt-lookup,prompt-lookup:6,draft:/m/x2,draft:/m:x/y:3,draft:9"}
    )
    params = [sampling_params({**DEFAULTS, "spec": s}, 0) for s in axes["spec"]]
    assert [(p.speculation, p.num_draft) for p in params] == [
        (None, 4),
        ("prompt-lookup", 4),
        ("prompt-lookup", 6),
        ("draft", 4),
        ("draft", 3),
        ("draft", 4),
    ]
    # the draft's path: everything after "draft:" but a last ":N" (a path may hold colons)
    assert [spec_draft(s) for s in axes["spec"]] == [None, None, None, "/m/x2", "/m:x/y", "9"]
    config = dict(DEFAULTS)
    older = {k: v for k, v in config.items() if k != "spec"}
    assert config_key(config) == config_key(older)
    assert with_defaults(older)["spec"] == "none"
    assert sampling_params(older, 0).speculation is None
    from mlxinfer.batch_cache import RING_SLACK
    from mlxinfer.bench.grid import MAX_NUM_DRAFT

    assert MAX_NUM_DRAFT == RING_SLACK  # (the grid imports no MLX: it restates the bound)
