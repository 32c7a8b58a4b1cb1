"""The grid of a benchmark sweep: every axis a list of values, every configuration one combination.

    axes = parse_axes({"temperature": "0,0.8", "top_p": "1.0,0.9", "prompt_tokens": "64,512"})
    for config in expand(axes): ...      # dicts, one value per axis, in a stable order

Axes (the first value of each is its default):

    sampling   temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
               frequency_penalty                         (SamplingParams' own checks)
    lengths    prompt_tokens, gen_tokens, depth (tokens already in the cache before the prompt)
    engine     concurrency (requests at once, through the Engine), kv ("full", "rotating:N",
               "q8", "q4", "q8:rotating:N", ...), compute ("float32" or "native"), model (a path,
               or "default"), parallel ("none", or "tensor:N" / "pipeline:N": the model split
               over N ranks on this machine, measured through `mlxinfer serve --parallel`),
               spec (speculative decoding: "none", "prompt-lookup", "prompt-lookup:N",
               "draft:PATH" or "draft:PATH:N": prompt lookup, or the model at PATH as draft,
               with N proposals a pass, 1-8; measured on mlxinfer only)

A bad value anywhere is a ValueError naming the axis and the value, raised before anything runs;
so is a grid of more than MAX_CONFIGURATIONS configurations (counted, never expanded, to say so).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Mapping

SAMPLING_AXES = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
LENGTH_AXES = ("prompt_tokens", "gen_tokens", "depth")
ENGINE_AXES = ("concurrency", "kv", "compute", "model", "parallel", "spec")
AXES = SAMPLING_AXES + LENGTH_AXES + ENGINE_AXES

# (no MLX import here: `mlxinfer --help` builds the bench parser from these names)
DEFAULTS: dict[str, object] = {  # SamplingParams' own defaults, then the sweep's
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "prompt_tokens": 256,
    "gen_tokens": 128,
    "depth": 0,
    "concurrency": 1,
    "kv": "full",
    "compute": "float32",
    "model": "default",
    "parallel": "none",
    "spec": "none",
}
# Axes added after runs were recorded: at their default they are left out of a configuration's
# key (so a run recorded before them resumes), and filled in when read back (with_defaults).
_LATER_AXES = ("parallel", "spec")
MAX_CONFIGURATIONS = 10_000  # a grid past this is a typo or a week of measuring, not a sweep
_INT_AXES = {"top_k", "prompt_tokens", "gen_tokens", "depth", "concurrency"}
_POSITIVE = {"prompt_tokens", "gen_tokens", "concurrency"}


def parse_axes(raw: Mapping[str, object]) -> dict[str, list]:
    """Axis name -> list of checked values, from comma lists ("0,0.8"), single values or lists
    (a TOML table). Axes not given take their default, one value.

    `sampling`, a list of tables (TOML `[[sampling]]`), names chosen combinations of sampling
    settings instead of their full grid: each table is one value of a "sampling" axis, its
    settings over the others' defaults (`[[sampling]] temperature = 0.7, top_p = 0.9`)."""
    raw = dict(raw)
    combos = raw.pop("sampling", None)
    axes = _parse(raw) if combos is None else _with_sampling_combos(raw, combos)
    check_size(axes)
    return axes


def _parse(raw: dict) -> dict[str, list]:
    unknown = sorted(set(raw) - set(AXES))
    if unknown:
        raise ValueError(f"unknown sweep axis {unknown[0]!r}; the axes are: {', '.join(AXES)}")
    axes = {}
    for name in AXES:
        given = raw.get(name)
        if given is None:
            axes[name] = [DEFAULTS[name]]
            continue
        items = given.split(",") if isinstance(given, str) else given
        items = items if isinstance(items, (list, tuple)) else [items]
        if not items or (isinstance(given, str) and not given.strip()):
            raise ValueError(f"sweep axis {name!r} has no values")
        if isinstance(given, str) and any(not item.strip() for item in items):
            raise ValueError(
                f"sweep axis {name!r}: {given!r} has an empty value between commas (one comma "
                "too many?)"
            )
        values = [check_value(name, item) for item in items]
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"sweep axis {name!r} repeats a value: {given!r}")
        axes[name] = values
    return axes


def _with_sampling_combos(raw: dict, combos: object) -> dict[str, list]:
    clash = sorted(set(raw) & set(SAMPLING_AXES))
    if clash:
        raise ValueError(f"sweep axis {clash[0]!r} is set both alone and in [[sampling]]")
    if not isinstance(combos, list) or not combos or not all(isinstance(c, dict) for c in combos):
        raise ValueError("sampling must be a list of tables ([[sampling]] in TOML)")
    axes = _parse(raw)
    checked = []
    for i, combo in enumerate(combos):
        unknown = sorted(set(combo) - set(SAMPLING_AXES))
        if unknown:
            raise ValueError(f"[[sampling]] {i + 1}: {unknown[0]!r} is not a sampling setting")
        settings = {
            **{a: DEFAULTS[a] for a in SAMPLING_AXES},
            **{k: check_value(k, v) for k, v in combo.items()},
        }
        if settings in checked:  # would be measured twice, and stored under one key
            first = checked.index(settings) + 1
            raise ValueError(
                f"[[sampling]] {first} and {i + 1} are the same settings "
                f"({sampling_label(settings)}); each table must differ"
            )
        checked.append(settings)
    axes["sampling"] = checked
    return axes


def check_value(axis: str, raw: object) -> object:
    """One value of `axis`, converted and checked."""
    text = raw.strip() if isinstance(raw, str) else raw
    if axis == "parallel":
        return parse_parallel(str(text))
    if axis == "spec":
        parse_spec(str(text))
        return str(text)
    if axis in ("model", "kv", "compute"):
        value = str(text)
        if axis == "kv":
            parse_kv(value)
        if axis == "compute" and value not in ("float32", "native"):
            raise ValueError(f"sweep axis 'compute': {value!r} is not float32 or native")
        if not value:
            raise ValueError(f"sweep axis {axis!r} has an empty value")
        return value
    try:
        if axis in _INT_AXES:
            if isinstance(text, float) or isinstance(text, bool):
                raise ValueError
            value = int(text)
        else:
            if isinstance(text, bool):
                raise ValueError
            value = float(text)
    except (TypeError, ValueError):
        kind = "an integer" if axis in _INT_AXES else "a number"
        raise ValueError(f"sweep axis {axis!r}: {raw!r} is not {kind}") from None
    if axis in _POSITIVE and value < 1:
        raise ValueError(f"sweep axis {axis!r}: {value} must be >= 1")
    if axis == "depth" and value < 0:
        raise ValueError(f"sweep axis 'depth': {value} must be >= 0")
    if axis in SAMPLING_AXES:
        from ..sampling import SamplingParams

        try:
            SamplingParams(**{axis: value})
        except ValueError as e:
            raise ValueError(f"sweep axis {axis!r}: {e}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"sweep axis {axis!r}: {raw!r} is not finite")
    return value


SHORT = {
    "temperature": "T",
    "top_k": "top-k",
    "top_p": "top-p",
    "min_p": "min-p",
    "repetition_penalty": "repetition",
    "presence_penalty": "presence",
    "frequency_penalty": "frequency",
}


def sampling_label(config: Mapping) -> str:
    """The sampling settings that differ from the defaults, short ("T 0.7, top-p 0.9"), or
    "greedy"."""
    changed = [f"{SHORT[a]} {config[a]}" for a in SAMPLING_AXES if config[a] != DEFAULTS[a]]
    return ", ".join(changed) or "greedy"


def parse_kv(text: str) -> dict:
    """ "full", "rotating:N", "q8", "q4", and a quantization with a size ("q8:rotating:256") ->
    the cache options of stream_generate (max_kv_size, kv_bits)."""
    parts = text.split(":")
    options: dict = {"max_kv_size": None, "kv_bits": None}
    rest = parts
    if parts[0] in ("q4", "q8"):
        options["kv_bits"] = int(parts[0][1])
        rest = parts[1:]
    elif parts[0] == "full" and len(parts) == 1:
        return options
    if not rest:
        return options
    if rest[0] == "rotating" and len(rest) == 2 and rest[1].isdigit() and int(rest[1]) > 4:
        options["max_kv_size"] = int(rest[1])
        return options
    raise ValueError(
        f"sweep axis 'kv': {text!r} is not one of full, rotating:N (N > 4), q8, q4, "
        "q8:rotating:N, q4:rotating:N"
    )


def count(axes: Mapping[str, list]) -> int:
    """How many configurations `expand(axes)` gives: the product of the axes' lengths."""
    return len(axes.get("sampling", [{}])) * math.prod(len(axes[name]) for name in AXES)


def check_size(axes: Mapping[str, list]) -> None:
    """A ValueError with the count and how to shrink it when the grid has more than
    MAX_CONFIGURATIONS configurations (four axes of 100 values are 100 million)."""
    total = count(axes)
    if total <= MAX_CONFIGURATIONS:
        return
    sizes = [("sampling", len(axes["sampling"]))] if "sampling" in axes else []
    sizes += [(name, len(axes[name])) for name in AXES if len(axes[name]) > 1]
    factors = " x ".join(f"{name} {n}" for name, n in sizes)
    raise ValueError(
        f"the grid has {total:,} configurations ({factors}), more than the {MAX_CONFIGURATIONS:,} "
        "a sweep may have: give the axes fewer values, or name chosen combinations of sampling "
        "settings as [[sampling]] tables in a sweep file"
    )


def expand(axes: Mapping[str, list]) -> Iterator[dict]:
    """Every combination, the last axis varying fastest (AXES order); chosen sampling
    combinations (`axes["sampling"]`) vary slowest. A grid past MAX_CONFIGURATIONS is refused
    (check_size) before the first one."""
    check_size(axes)
    names = list(AXES)
    for combo in axes.get("sampling", [{}]):
        for values in itertools.product(*(axes[name] for name in names)):
            yield {**dict(zip(names, values, strict=True)), **combo}


def config_key(config: Mapping[str, object]) -> str:
    """A stable text key for a configuration (what a resumed sweep matches on)."""
    config = with_defaults(config)
    return json.dumps(
        {
            name: config[name]
            for name in AXES
            if not (name in _LATER_AXES and config[name] == DEFAULTS[name])
        },
        sort_keys=True,
    )


def with_defaults(settings: Mapping[str, object]) -> dict:
    """A configuration's settings with the axes it predates at their defaults."""
    return {**{a: DEFAULTS[a] for a in _LATER_AXES if a not in settings}, **settings}


def parse_parallel(value: str) -> str:
    """The `parallel` axis: "none", or a mode and a rank count ("tensor:2"; "tensor" is
    "tensor:2"), normalized."""
    if value == "none":
        return value
    mode, _, count = value.partition(":")
    if mode not in ("tensor", "pipeline"):
        raise ValueError(f"sweep axis 'parallel': {value!r} is not none, tensor:N or pipeline:N")
    try:
        ranks = int(count or 2)
    except ValueError:
        raise ValueError(f"sweep axis 'parallel': {value!r}: ranks must be an integer") from None
    if ranks < 2:
        raise ValueError(f"sweep axis 'parallel': {value!r}: at least 2 ranks")
    return f"{mode}:{ranks}"


def parse_spec(text: str) -> tuple[str | None, int]:
    """ "none", "prompt-lookup", "prompt-lookup:N", "draft:PATH" or "draft:PATH:N" ->
    (SamplingParams.speculation, num_draft); the draft's path: `spec_draft`."""
    name, _, count = text.partition(":")
    if name == "none" and not count:
        return None, DEFAULT_NUM_DRAFT
    if name == "draft":
        path, count = _draft_parts(count)
        if not path:
            raise ValueError(f"sweep axis 'spec': {text!r}: draft:PATH needs the draft's path")
    elif name != "prompt-lookup":
        raise ValueError(
            f"sweep axis 'spec': {text!r} is not none, prompt-lookup, prompt-lookup:N, "
            "draft:PATH or draft:PATH:N"
        )
    if not count:
        return name, DEFAULT_NUM_DRAFT
    if not (count.isascii() and count.isdigit()) or not 1 <= int(count) <= MAX_NUM_DRAFT:
        raise ValueError(
            f"sweep axis 'spec': {text!r}: N must be a whole number of proposals, "
            f"1 to {MAX_NUM_DRAFT}"
        )
    return name, int(count)


def spec_draft(text: str) -> str | None:
    """The draft model's path of a spec value ("draft:PATH[:N]"), else None."""
    if parse_spec(text)[0] != "draft":
        return None
    return _draft_parts(text.partition(":")[2])[0]


def _draft_parts(rest: str) -> tuple[str, str]:
    """ "PATH" or "PATH:N" -> (PATH, N or "")."""
    head, colon, tail = rest.rpartition(":")
    return (head, tail) if colon and tail.isascii() and tail.isdigit() else (rest, "")


DEFAULT_NUM_DRAFT, MAX_NUM_DRAFT = 4, 8  # SamplingParams' num_draft default and RING_SLACK


def sampling_params(config: Mapping[str, object], seed: int):
    """The configuration's SamplingParams, EOS ignored, exactly gen_tokens tokens."""
    from ..sampling import SamplingParams

    speculation, num_draft = parse_spec(str(config.get("spec", "none")))
    return SamplingParams(
        **{name: config[name] for name in SAMPLING_AXES},
        seed=seed,
        max_tokens=int(config["gen_tokens"]),
        ignore_eos=True,
        speculation=speculation,
        num_draft=num_draft,
    )


def is_greedy(config: Mapping[str, object]) -> bool:
    return sampling_params(config, 0).plain_greedy
