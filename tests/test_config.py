"""ModelConfig.from_dict and the family table against transformers' own config classes and modules:
per-layer sliding windows and MoE layers as transformers' decoder layers build them, the family
options (biases, q/k norm, fused projections) as the parameters transformers' layers hold, RoPE
settings in both spellings as transformers standardises them, head_dim and KV-head defaults, and
the errors for configs that cannot be loaded."""

from __future__ import annotations

import functools
import json

import pytest

from mlxinfer.config import FAMILIES, ModelConfig, ModelLoadError, model_file

from .reference import FAMILY_CLASSES, TINY
from .test_model import LLAMA3_ROPE

N_LAYERS = 6
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)


def hf_config(family: str, **overrides):
    import transformers

    kwargs = {**TINY, "num_hidden_layers": N_LAYERS, **overrides}
    if family == "phi3":
        kwargs.setdefault("pad_token_id", 0)
    return getattr(transformers, FAMILY_CLASSES[family][0])(**kwargs)


def hf_layers(family: str, config):
    """transformers' decoder layers for `config` (tiny, randomly initialised)."""
    import transformers

    model_cls = getattr(transformers, FAMILY_CLASSES[family][1])
    return model_cls(config).model.layers


def raw_dict(family: str, **overrides) -> dict:
    """A config.json as an older hub checkpoint spells it: only what was given, no derived keys
    (no `layer_types`)."""
    return {"model_type": family, **TINY, "num_hidden_layers": N_LAYERS, **overrides}


# -- per-layer sliding windows ------------------------------------------------------------------

# Families whose attention takes `config.sliding_window` on every layer at forward time (Mistral,
# Mixtral, Phi-3); the others keep a per-layer `self_attn.sliding_window`.
GLOBAL_WINDOW_FAMILIES = ("llama", "mistral", "mixtral", "phi3")


def hf_windows(family: str, config) -> list[int | None]:
    """The window each of transformers' decoder layers applies (None: full attention)."""
    windows = []
    for layer in hf_layers(family, config):
        if family in GLOBAL_WINDOW_FAMILIES:
            window = getattr(config, "sliding_window", None)
        else:
            window = getattr(layer.self_attn, "sliding_window", None)
        windows.append(window or None)  # Qwen2-MoE stores 0 for "unused"
    return windows


SLIDING = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    "mistral-none": ("mistral", dict(sliding_window=None)),
    "mixtral-window": ("mixtral", dict(sliding_window=8, num_local_experts=4, **MOE)),
    "phi3-window": ("phi3", dict(sliding_window=8)),
    "qwen2-max-window-4": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=4),
    ),
    "qwen2-max-window-0": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
    ),
    "qwen2-max-window-all": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=N_LAYERS),
    ),
    "qwen2-unused": ("qwen2", dict(use_sliding_window=False, sliding_window=8)),
    "qwen2-layer-types": (
        "qwen2",
        dict(
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=2,  # ignored: the explicit list wins
            layer_types=["sliding_attention", "full_attention"] * 3,
        ),
    ),
    "qwen2-layer-types-unused": (
        "qwen2",
        dict(sliding_window=8, layer_types=["sliding_attention"] * N_LAYERS),
    ),
    "qwen3-max-window-3": (
        "qwen3",
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=3),
    ),
    "qwen3-layer-types": (
        "qwen3",
        dict(
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["full_attention"] * 2 + ["sliding_attention"] * 3 + ["full_attention"],
        ),
    ),
    "qwen2_moe-max-window-4": (
        "qwen2_moe",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=4, num_experts=4, **MOE),
    ),
    "qwen2_moe-max-window-all": (
        "qwen2_moe",
        dict(
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=N_LAYERS,
            num_experts=4,
            **MOE,
        ),
    ),
    "qwen2_moe-unused": ("qwen2_moe", dict(sliding_window=8, num_experts=4, **MOE)),
    "qwen3_moe-window": (
        "qwen3_moe",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=2, num_experts=4, **MOE),
    ),
    "qwen3_moe-unused": ("qwen3_moe", dict(sliding_window=8, num_experts=4, **MOE)),
    # Gemma: always on (no use_sliding_window); 2: even layers; 3: all but every 6th (or
    # sliding_window_pattern-th), or its layer_types.
    "gemma2-window": ("gemma2", dict(sliding_window=8)),
    "gemma2-default-window": ("gemma2", {}),
    "gemma3-pattern-6": ("gemma3_text", dict(sliding_window=8)),
    "gemma3-pattern-4": ("gemma3_text", dict(sliding_window=8, sliding_window_pattern=4)),
    "gemma3-layer-types": (
        "gemma3_text",
        dict(sliding_window=8, layer_types=["full_attention", "sliding_attention"] * 3),
    ),
}


@functools.cache
def sliding_reference(case: str):
    family, overrides = SLIDING[case]
    config = hf_config(family, **overrides)
    return config, hf_windows(family, config)


@pytest.mark.parametrize("spelling", ["raw", "saved"])
@pytest.mark.parametrize("case", sorted(SLIDING))
def test_layer_windows_match_transformers(case, spelling):
    """`raw`: the keys as given (mlxinfer applies the family's rule); `saved`: transformers'
    `to_dict()`, what save_pretrained writes (with its own `layer_types` where it has them)."""
    family, overrides = SLIDING[case]
    config, expected = sliding_reference(case)
    source = raw_dict(family, **overrides) if spelling == "raw" else config.to_dict()
    ours = ModelConfig.from_dict(source)
    assert ours.layer_windows == expected
    assert ours.sliding_window == (getattr(config, "sliding_window", None) or None)


def test_sliding_cases_cover_both_kinds_of_layer():
    """The table above is not vacuous: some cases mix sliding and full layers."""
    mixed = sum(len(set(sliding_reference(case)[1])) > 1 for case in SLIDING)
    assert mixed >= 5


# -- per-layer MoE ------------------------------------------------------------------------------

MOE_CASES = {
    "mixtral": ("mixtral", dict(num_local_experts=4, **MOE)),
    "qwen2_moe-every-layer": ("qwen2_moe", dict(num_experts=4, **MOE)),
    "qwen2_moe-step-2": ("qwen2_moe", dict(num_experts=4, decoder_sparse_step=2, **MOE)),
    "qwen2_moe-step-3-mlp-only": (
        "qwen2_moe",
        dict(num_experts=4, decoder_sparse_step=3, mlp_only_layers=[5], **MOE),
    ),
    "qwen2_moe-no-experts": ("qwen2_moe", dict(num_experts=0, **MOE)),
    "qwen3_moe-mlp-only": ("qwen3_moe", dict(num_experts=4, mlp_only_layers=[0, 3], **MOE)),
    "qwen3_moe-step-2-mlp-only": (
        "qwen3_moe",
        dict(num_experts=4, decoder_sparse_step=2, mlp_only_layers=[1, 3], **MOE),
    ),
    "llama-dense": ("llama", {}),
}


@functools.cache
def moe_reference(case: str):
    family, overrides = MOE_CASES[case]
    config = hf_config(family, **overrides)
    layers = hf_layers(family, config)
    return config, [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in layers]


@pytest.mark.parametrize("spelling", ["raw", "saved"])
@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_layer_moe_matches_transformers(case, spelling):
    family, overrides = MOE_CASES[case]
    config, expected = moe_reference(case)
    source = raw_dict(family, **overrides) if spelling == "raw" else config.to_dict()
    ours = ModelConfig.from_dict(source)
    assert ours.layer_moe == expected
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0)
    assert ours.num_experts == experts
    if experts:
        assert ours.num_experts_per_tok == config.num_experts_per_tok


def test_moe_sizes_and_routing_options():
    config = ModelConfig.from_dict(
        raw_dict(
            "qwen2_moe",
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            norm_topk_prob=True,
        )
    )
    assert (config.num_experts, config.num_experts_per_tok) == (8, 3)
    assert (config.moe_intermediate_size, config.shared_expert_intermediate_size) == (24, 40)
    assert config.norm_topk_prob is True
    # Mixtral: experts are `num_local_experts` of the full intermediate size, always renormalised.
    mixtral = ModelConfig.from_dict(
        raw_dict("mixtral", num_local_experts=4, num_experts_per_tok=2, norm_topk_prob=False)
    )
    assert (mixtral.num_experts, mixtral.moe_intermediate_size) == (4, TINY["intermediate_size"])
    assert mixtral.norm_topk_prob is True
    assert mixtral.shared_expert_intermediate_size == 0
    # A dense family never has experts, whatever the dict says.
    dense = ModelConfig.from_dict(raw_dict("llama", num_experts=8, num_experts_per_tok=2))
    assert dense.num_experts == 0 and dense.layer_moe == [False] * N_LAYERS


# -- the family table ---------------------------------------------------------------------------


def hf_layer_options(family: str, config) -> dict[str, bool]:
    """The architectural options, read from the parameters transformers' first layer holds."""
    names = {name for name, _ in hf_layers(family, config)[0].named_parameters()}
    options = {
        "fused_qkv": "self_attn.qkv_proj.weight" in names,
        "qkv_bias": bool({"self_attn.q_proj.bias", "self_attn.qkv_proj.bias"} & names),
        "o_bias": "self_attn.o_proj.bias" in names,
        "qk_norm": "self_attn.q_norm.weight" in names,
    }
    if "mlp.gate" not in {n.rsplit(".", 1)[0] for n in names}:  # a dense MLP
        options["fused_gate_up"] = "mlp.gate_up_proj.weight" in names
        options["mlp_bias"] = "mlp.down_proj.bias" in names
    return options


def _family_cases():
    """Every family with no flag, with `attention_bias` and with `mlp_bias`: transformers' Mistral,
    Mixtral and Phi-3 modules ignore both, Qwen2/Qwen3 ignore `mlp_bias` (a config.json carrying
    them must not make us expect bias tensors the checkpoint does not have)."""
    for family in sorted(FAMILY_CLASSES):
        for flag in ("none", "attention_bias", "mlp_bias"):
            yield pytest.param(family, flag, id=f"{family}-{flag}")


@pytest.mark.parametrize("family, flag", list(_family_cases()))
def test_family_options_match_transformers_layers(family, flag):
    overrides = dict(num_hidden_layers=1)
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        overrides.update({"num_local_experts" if family == "mixtral" else "num_experts": 4}, **MOE)
    if flag != "none":
        overrides[flag] = True
    config = hf_config(family, **overrides)
    expected = hf_layer_options(family, config)
    ours = ModelConfig.from_dict(config.to_dict())
    assert {name: getattr(ours, name) for name in expected} == expected


def test_family_table_is_what_the_loader_supports():
    assert set(FAMILIES) == set(FAMILY_CLASSES)


# -- head_dim, KV heads, scalars ----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(head_dim=32),  # explicit, not hidden_size // heads (Qwen3, Mistral-Nemo)
        dict(head_dim=None),
        dict(num_attention_heads=8, num_key_value_heads=1),
        dict(num_attention_heads=2, num_key_value_heads=None),  # defaults to MHA
    ],
    ids=["default", "explicit", "none", "mqa", "kv-default"],
)
def test_head_dim_and_kv_heads_match_transformers(overrides):
    config = hf_config("llama", **overrides)
    ours = ModelConfig.from_dict(raw_dict("llama", **overrides))
    assert ours.head_dim == config.head_dim
    assert ours.num_attention_heads == config.num_attention_heads
    assert ours.num_key_value_heads == config.num_key_value_heads


def test_scalar_fields_and_token_ids():
    config = ModelConfig.from_dict(
        raw_dict(
            "llama",
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=[2, 7],
            torch_dtype="bfloat16",
            quantization={"group_size": 64, "bits": 4},
        )
    )
    assert (config.rms_norm_eps, config.max_position_embeddings) == (1e-5, 4096)
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_ids) == (1, [2, 7])
    assert config.torch_dtype == "bfloat16"
    assert config.quantization == {"group_size": 64, "bits": 4}
    assert ModelConfig.from_dict(raw_dict("llama", eos_token_id=2)).eos_token_ids == [2]
    assert ModelConfig.from_dict(raw_dict("llama", dtype="float16")).torch_dtype == "float16"


def test_unknown_keys_are_ignored():
    base = raw_dict("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=3)
    noisy = {
        **base,
        "architectures": ["Qwen2ForCausalLM"],
        "transformers_version": "9.9.9",
        "some_future_option": {"nested": [1, 2, 3]},
        "attn_logit_softcapping": None,
    }
    assert ModelConfig.from_dict(noisy) == ModelConfig.from_dict(base)


def test_direct_construction_defaults_per_layer_lists():
    config = ModelConfig(
        model_type="llama",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=4,
        num_experts=2,
    )
    assert config.layer_windows == [4, 4, 4] and config.layer_moe == [True] * 3
    with pytest.raises(ModelLoadError, match="layer_windows has 2 entries for 3 layers"):
        ModelConfig(**{**config.__dict__, "layer_windows": [None, 4], "layer_moe": []})


# -- RoPE settings in both spellings ------------------------------------------------------------

ROPE_SETTINGS = {
    "default": {"rope_type": "default", "rope_theta": 500.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    "llama3": LLAMA3_ROPE,
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 16.0,
        "rope_theta": 10000.0,
    },
    "yarn-top-level-original": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
}
META = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def classic_spelling(params: dict) -> dict:
    """Old hub spelling: top-level rope_theta, rope_scaling {type, ...} (None when default)."""
    params = dict(params)
    theta = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    return {"rope_theta": theta, "rope_scaling": {"type": rope_type, **params} if params else None}


@pytest.mark.parametrize("case", sorted(ROPE_SETTINGS))
@pytest.mark.parametrize("spelling", ["rope_parameters", "classic", "saved"])
def test_rope_settings_match_transformers(case, spelling):
    params = ROPE_SETTINGS[case]
    config = hf_config("llama", rope_parameters=dict(params))
    standard = config.rope_parameters  # transformers' own standardisation
    if spelling == "rope_parameters":
        source = raw_dict("llama", rope_parameters=dict(params))
    elif spelling == "classic":
        source = raw_dict("llama", **classic_spelling(params))
    else:
        source = config.to_dict()
    ours = ModelConfig.from_dict(source)
    assert ours.rope_theta == standard["rope_theta"]
    assert ours.partial_rotary_factor == standard.get("partial_rotary_factor", 1.0)
    if standard["rope_type"] == "default":
        assert ours.rope_scaling is None
        return
    assert ours.rope_scaling["rope_type"] == standard["rope_type"]
    expected = {k: v for k, v in standard.items() if k not in META}
    assert {k: v for k, v in ours.rope_scaling.items() if k not in META} == expected


@pytest.mark.parametrize("spelling", ["top-level", "rope_parameters", "saved"])
def test_partial_rotary_factor_both_spellings(spelling):
    config = hf_config("phi3", partial_rotary_factor=0.5)
    if spelling == "top-level":  # Phi-3's config.json
        source = raw_dict("phi3", partial_rotary_factor=0.5)
    elif spelling == "rope_parameters":
        source = raw_dict(
            "phi3",
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
            },
        )
    else:
        source = config.to_dict()
    ours = ModelConfig.from_dict(source)
    assert ours.partial_rotary_factor == config.rope_parameters["partial_rotary_factor"] == 0.5
    assert ours.rope_scaling is None


def test_rope_parameters_win_over_classic_keys():
    """A transformers-5 config.json may carry both; transformers reads rope_parameters."""
    source = raw_dict(
        "llama",
        rope_theta=1.0,
        rope_scaling={"type": "linear", "factor": 9.0},
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    )
    ours = ModelConfig.from_dict(source)
    assert ours.rope_theta == 500.0 and ours.rope_scaling["factor"] == 2.0


# -- errors ---------------------------------------------------------------------------------------

REQUIRED = [
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
]


@pytest.mark.parametrize("key", REQUIRED)
@pytest.mark.parametrize("how", ["absent", "null"])
def test_missing_required_key_names_key_and_source(key, how):
    config = raw_dict("llama")
    if how == "absent":
        del config[key]
    else:
        config[key] = None
    with pytest.raises(ModelLoadError) as info:
        ModelConfig.from_dict(config, source="models/tiny/config.json")
    assert f"'{key}'" in str(info.value)
    assert str(info.value).startswith("models/tiny/config.json: ")
    assert isinstance(info.value, ValueError)


def test_from_file_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    config = raw_dict("llama")
    del config["vocab_size"]
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=rf"^{path}: missing required key 'vocab_size'"):
        ModelConfig.from_file(path)
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match=rf"^{path}: invalid JSON"):
        ModelConfig.from_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="expected a JSON object, got list"):
        ModelConfig.from_file(path)
    with pytest.raises(ModelLoadError, match="config file not found"):
        ModelConfig.from_file(tmp_path / "absent.json")
    path.write_text(json.dumps(raw_dict("qwen3")))
    assert ModelConfig.from_file(path).qk_norm is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(model_type="gpt2"),
            r"unsupported model_type 'gpt2'; supported: gemma2, gemma3_text, llama, mistral",
        ),
        (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
        (dict(num_attention_heads=4, num_key_value_heads=3), r"must be a multiple of"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), r"rope type 'dynamic'"),
        (dict(rope_scaling={"type": "linear"}), r"rope type 'linear' needs key 'factor'"),
        (
            dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}),
            r"needs key 'high_freq_factor'",
        ),
        (
            dict(rope_parameters={"chunked_attention": {"rope_type": "default"}}),
            r"per-layer-type 'rope_parameters' must hold 'full_attention'.*'chunked_attention'",
        ),
        (dict(model_type="mistral", sliding_window=-1), r"sliding_window must be >= 1"),
        (
            dict(
                model_type="qwen2",
                use_sliding_window=True,
                sliding_window=4,
                layer_types=["full_attention"],
            ),
            r"layer_types has 1 entries for 6 layers",
        ),
        (
            dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=5),
            r"num_experts_per_tok must be in \[1, 4\], got 5",
        ),
    ],
    ids=[
        "model-type",
        "hidden-act",
        "kv-heads",
        "rope-type",
        "linear-factor",
        "llama3-keys",
        "per-layer-rope",
        "window",
        "layer-types-length",
        "top-k",
    ],
)
def test_invalid_configs_raise_model_load_error(overrides, message):
    with pytest.raises(ModelLoadError, match=message) as info:
        ModelConfig.from_dict(raw_dict("llama") | overrides, source="cfg.json")
    assert str(info.value).startswith("cfg.json: ")


def test_shared_expert_only_where_the_family_has_one():
    """Only Qwen2-MoE has a shared expert; the key in another family's config.json is ignored."""
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    )
    assert (
        ModelConfig.from_dict({**base, "model_type": "qwen2_moe"}).shared_expert_intermediate_size
        == 32
    )
    assert (
        ModelConfig.from_dict({**base, "model_type": "qwen3_moe"}).shared_expert_intermediate_size
        == 0
    )


@pytest.mark.parametrize(
    "change,message",
    [
        ({"hidden_size": [64]}, "hidden_size must be an integer between 1 and 131072, got [64]"),
        ({"hidden_size": 10**12}, "hidden_size must be an integer between 1"),
        ({"hidden_size": -64}, "hidden_size must be an integer between 1"),
        ({"num_attention_heads": 0}, "num_attention_heads must be an integer between 1"),
        ({"head_dim": 10**9}, "head_dim must be an integer between 1 and 1024"),
        ({"vocab_size": "x"}, "vocab_size must be an integer"),
        ({"rope_scaling": [1]}, "invalid config (rope_scaling must be an object, got [1])"),
        ({"quantization": "x"}, "invalid config (quantization must be an object, got 'x')"),
        ({"rms_norm_eps": "x"}, "invalid config (rms_norm_eps must be a number, got 'x')"),
        ({"eos_token_id": "x"}, "(eos_token_id must be a token id or a list of them, got 'x')"),
    ],
)
def test_untrusted_values_are_model_load_errors(change, message):
    """Values of the wrong type or absurd size in an untrusted config.json are ModelLoadErrors
    naming the source, before anything is built (10**9 for head_dim allocated 3.7 GiB, a
    list for hidden_size was a TypeError traceback)."""
    base = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
    )
    with pytest.raises(ModelLoadError) as err:
        ModelConfig.from_dict({**base, **change}, source="dir/config.json")
    assert str(err.value).startswith("dir/config.json: ") and message in str(err.value)


# Each value of the wrong kind, with what it did before it was checked: a traceback, an error that
# named no key, or silently something else.
WRONG_KINDS = {
    "model_type list": (  # invalid config (TypeError: unhashable type: 'list')
        {"model_type": ["llama"]},
        "model_type must be a string, got ['llama']",
    ),
    "tie_word_embeddings 'false'": (  # bool('false'): tied, the model's own head dropped
        {"tie_word_embeddings": "false"},
        "tie_word_embeddings must be a boolean, got 'false'",
    ),
    "attention_bias 'no'": ({"attention_bias": "no"}, "attention_bias must be a boolean, got 'no'"),
    "bos_token_id 'x'": ({"bos_token_id": "x"}, "bos_token_id must be an integer, got 'x'"),
    "eos_token_id true": (  # [True]: token 1 ended every reply
        {"eos_token_id": True},
        "eos_token_id must be a token id or a list of them, got True",
    ),
    "eos_token_id [[2]]": (
        {"eos_token_id": [[2]]},
        "eos_token_id must be a token id or a list of them, got [[2]]",
    ),
    "sliding_window 'x'": (
        {"model_type": "mistral", "sliding_window": "x"},
        "sliding_window must be an integer, got 'x'",
    ),
    "layer_types 5": (  # TypeError: object of type 'int' has no len()
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "layer_types": 5},
        "layer_types must be a list of strings, got 5",
    ),
    "mlp_only_layers 5": (
        {
            "model_type": "qwen2_moe",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "mlp_only_layers": 5,
        },
        "mlp_only_layers must be a list of integers, got 5",
    ),
    "rope_scaling factor 'x'": (  # accepted; a TypeError traceback from rope.py at load
        {"rope_scaling": {"rope_type": "linear", "factor": "x"}},
        "rope_scaling.factor must be a number, got 'x'",
    ),
    "rope_parameters low_freq_factor": (
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": [1],
                "high_freq_factor": 4.0,
            }
        },
        "rope_parameters.low_freq_factor must be a number, got [1]",
    ),
    "rope_theta list": ({"rope_theta": [1e4]}, "rope_theta must be a number, got [10000.0]"),
    "rope_freqs 'abc'": ({"rope_freqs": "abc"}, "rope_freqs must be a list of numbers, got 'abc'"),
    "quantization mode 5": ({"quantization": {"mode": 5}}, "quantization.mode must be a string"),
}


@pytest.mark.parametrize("change, message", WRONG_KINDS.values(), ids=list(WRONG_KINDS))
def test_values_of_the_wrong_kind_name_the_key(change, message):
    """A config.json value of the wrong kind is a ModelLoadError naming the file and the key (see
    WRONG_KINDS for what each did before)."""
    with pytest.raises(ModelLoadError) as err:
        ModelConfig.from_dict(raw_dict("llama") | change, source="dir/config.json")
    assert str(err.value).startswith(f"dir/config.json: invalid config ({message}")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_freqs": [1.0, 2.0]}, "rope_freqs must hold 8 positive numbers"),
        ({"rope_freqs": [1.0] * 7 + [0.0]}, "rope_freqs must hold 8 positive numbers"),
        ({"partial_rotary_factor": 5}, "partial_rotary_factor must be in [0, 1], got 5.0"),
        ({"partial_rotary_factor": -0.5}, "partial_rotary_factor must be in [0, 1], got -0.5"),
    ],
)
def test_rope_values_out_of_range(change, message):
    """rope_freqs of the wrong length was a broadcasting ValueError traceback when the model was
    built; a partial_rotary_factor of 5 was accepted."""
    with pytest.raises(ModelLoadError) as err:
        ModelConfig.from_dict(raw_dict("llama") | change, source="dir/config.json")
    assert str(err.value).startswith(f"dir/config.json: {message}")


def test_null_values_are_unset():
    """A key set to null means its default, as an absent key does (a null rms_norm_eps was an
    'invalid config (TypeError ...)')."""
    keys = [
        "rms_norm_eps",
        "rope_theta",
        "tie_word_embeddings",
        "head_dim",
        "num_key_value_heads",
        "rope_scaling",
        "eos_token_id",
        "torch_dtype",
    ]
    absent = {k: v for k, v in raw_dict("llama").items() if k not in keys}
    assert ModelConfig.from_dict(absent | dict.fromkeys(keys)) == ModelConfig.from_dict(absent)


def test_deeply_nested_json_names_the_file(tmp_path):
    """'[' * 100000 used to escape as a RecursionError traceback from Python's JSON parser."""
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000)
    with pytest.raises(ModelLoadError, match=r"config\.json: invalid JSON \(nested too deeply\)$"):
        ModelConfig.from_file(path)


def test_model_file_refuses_symlinks_leading_outside(tmp_path):
    """Files inside the directory (links among them included) are returned, missing ones too (the
    caller reports them); a link leading outside is refused, unless the directory is a snapshot
    of the Hugging Face cache linking into its own repository's blobs."""
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "sub" / "real.json").write_text("{}")
    (model / "inside.json").symlink_to("sub/real.json")
    (tmp_path / "secret").write_text("{}")
    (model / "outside.json").symlink_to("../secret")
    (model / "absolute.json").symlink_to(tmp_path / "secret")
    (model / "outside_dir").symlink_to(tmp_path)
    for name in ("sub/real.json", "inside.json", "missing.json"):
        assert model_file(model, name) == model / name
    for name in ("outside.json", "absolute.json", "outside_dir/secret", "sub/../../secret"):
        with pytest.raises(ModelLoadError, match="a symlink leading outside the model directory"):
            model_file(model, name)
    snapshot = tmp_path / "models--org--name" / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "blobs").mkdir()
    (snapshot.parent.parent / "blobs" / "abc").write_text("{}")
    (snapshot / "config.json").symlink_to("../../blobs/abc")
    (snapshot / "stray.json").symlink_to("../../refs")
    assert model_file(snapshot, "config.json") == snapshot / "config.json"
    with pytest.raises(ModelLoadError, match="stray.json: a symlink leading outside"):
        model_file(snapshot, "stray.json")


# -- Gemma --------------------------------------------------------------------------------------


def test_gemma2_soft_caps_default_as_transformers_and_a_null_turns_them_off():
    """Gemma 2 config.json files written before the keys existed mean transformers' defaults
    (50 and 30); a null given means no soft-capping, as in transformers."""
    left_out = ModelConfig.from_dict(raw_dict("gemma2"))
    assert (left_out.attn_logit_softcap, left_out.final_logit_softcap) == (50.0, 30.0)
    expected = hf_config("gemma2")
    assert (expected.attn_logit_softcapping, expected.final_logit_softcapping) == (50.0, 30.0)
    nulls = raw_dict("gemma2", attn_logit_softcapping=None, final_logit_softcapping=None)
    turned_off = ModelConfig.from_dict(nulls)
    assert (turned_off.attn_logit_softcap, turned_off.final_logit_softcap) == (None, None)


def test_gemma_query_scale_and_activation():
    config = ModelConfig.from_dict(raw_dict("gemma3_text", head_dim=32, query_pre_attn_scalar=24))
    assert config.query_scale == pytest.approx(24**-0.5)
    assert config.hidden_act == "gelu_tanh" and config.qk_norm and config.gemma_norms
    assert config.tie_word_embeddings  # Gemma's default when config.json leaves it out
    with pytest.raises(ModelLoadError, match=r"query_pre_attn_scalar must be > 0, got 0"):
        ModelConfig.from_dict(raw_dict("gemma2", query_pre_attn_scalar=0))
    with pytest.raises(ModelLoadError, match=r"hidden_activation 'gelu' is not supported"):
        ModelConfig.from_dict(raw_dict("gemma2", hidden_activation="gelu"))
    with pytest.raises(ModelLoadError, match=r"rope_parameters.sliding_attention.rope_theta must"):
        ModelConfig.from_dict(
            raw_dict(
                "gemma3_text",
                rope_parameters={
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": "10000"},
                },
            )
        )
    with pytest.raises(ModelLoadError, match=r"mixture-of-experts layers need hidden_act 'silu'"):
        ModelConfig.from_dict(
            raw_dict("mixtral", hidden_act="gelu_pytorch_tanh", num_local_experts=4, **MOE)
        )
