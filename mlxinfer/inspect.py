"""Looking inside the model: one forward pass with everything kept, the logit lens, the sampler's
chain stage by stage, and the architecture in numbers.

    t = trace(model, tokenizer, "The capital of France is")
    t.tokens            # [(id, piece, (start, end) in the prompt text)]
    t.attentions[l]     # [heads, T, T]: rows sum to 1, causal, the layer's window applied
    t.hidden_states     # L + 1 of [T, D]: the embeddings, each block's output, the last normed
    t.logits            # [T, vocab]
    t.routing[l]        # MoE layers: (experts [T, k], weights [T, k]) chosen for each token
    logit_lens(t, top=5)
    sampling_stages(t.logits[-1], SamplingParams(temperature=0.7, top_p=0.9))
    architecture(model)

Conventions are transformers' (`output_attentions`, `output_hidden_states` with eager
attention), so the tests compare with it directly. Everything comes back as numpy arrays.
Generation never calls any of this: the model's forward pass is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import CacheSpec, kv_cache_bytes
from .moe import SparseMoE
from .sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)
from .steps import DEFAULT_PREFILL_CHUNK
from .streams import own_streams


@dataclass
class Trace:
    """What one forward pass over a prompt computed (see the module docstring)."""

    token_ids: list[int]
    pieces: list[str]  # each token's text as the tokenizer maps it back
    offsets: list[tuple[int, int]]  # each token's (start, end) in `text`
    text: str  # the prompt as the model read it (after the chat template, if any)
    layers: list[int]  # the layers whose attention (and routing) were kept
    attentions: dict[int, np.ndarray]  # layer -> [heads, T, T]
    hidden_states: list[np.ndarray]  # L + 1 of [T, D]
    logits: np.ndarray  # [T, vocab]
    routing: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    model: object = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)

    @property
    def tokens(self) -> list[tuple[int, str, tuple[int, int]]]:
        return list(zip(self.token_ids, self.pieces, self.offsets, strict=True))


def trace(
    model,
    tokenizer,
    prompt: str | Sequence[dict],
    chat: bool = False,
    layers: Sequence[int] | None = None,
) -> Trace:
    """One forward pass over `prompt` (text, or chat messages with `chat=True`), keeping the
    attention probabilities of `layers` (default: all; fewer bound the memory on long prompts,
    which is heads x T x T floats per layer), every hidden state, the logits and MoE routing."""
    tracing = Tracing(model, tokenizer, prompt, chat, layers)
    while not tracing.step():
        pass
    return tracing.result


class Tracing:
    """A trace made a piece at a time: the embeddings, each block, then the head, one per
    `step()` (True once done; then `result`). A page sharing an engine runs each step as its
    own engine call, so the requests it serves wait for one block, not for the whole prompt's
    pass, and the page can show progress and drop the rest when the user moves on. Tokenizing
    and checking happen here (any thread); the steps do MLX work (one thread, the same each
    time)."""

    def __init__(
        self,
        model,
        tokenizer,
        prompt: str | Sequence[dict],
        chat: bool = False,
        layers: Sequence[int] | None = None,
    ):
        if chat or not isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = tokenizer.apply_chat_template(list(messages), tokenize=False)
            # the template writes its own BOS
            ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
        else:
            text = prompt
            ids, offsets = tokenizer.encode_with_offsets(text)  # as generation encodes it
        if not ids:
            raise ValueError("the prompt has no tokens")
        n_layers = model.config.num_hidden_layers
        keep = list(range(n_layers)) if layers is None else sorted(set(layers))
        bad = [i for i in keep if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"layers: {bad[0]} is not a layer of this model (0..{n_layers - 1})")
        self.model, self.tokenizer, self.text = model, tokenizer, text
        self.token_ids, self.offsets, self.keep = ids, offsets, keep
        self.steps = n_layers + 2  # the embeddings, each block, the final norm and head
        self.done = 0
        self.result: Trace | None = None
        self._walk: Iterator | None = None
        self._hidden: list[mx.array] = []
        self._attentions: dict[int, mx.array] = {}
        self._routing: dict[int, tuple] = {}

    def step(self) -> bool:
        """Run the next piece; True when the trace is complete (`result` is set)."""
        own_streams()  # MLX work on the calling thread (streams.py)
        if self.result is not None:
            return True
        if self._walk is None:
            self._walk = self.model.walk(mx.array([self.token_ids]))
        if self.done < self.steps - 1:
            index, block, (output, attention_in, mlp_in) = next(self._walk)
            kept = [output]  # this piece's arrays (the earlier ones are evaluated already)
            if index in self.keep:
                self._attentions[index] = block.self_attn.probabilities(attention_in)[0]
                kept.append(self._attentions[index])
                if isinstance(block.mlp, SparseMoE):
                    self._routing[index] = block.mlp.route(mlp_in.reshape(-1, mlp_in.shape[-1]))
                    kept.extend(self._routing[index])
            self._hidden.append(output)
            mx.eval(*kept)
            self.done += 1
            return False
        final = self.model.model.norm(self._hidden[-1])
        hidden = self._hidden[:-1] + [final]  # transformers: the last one after the final norm
        logits = self.model.logits(final)
        mx.eval(logits, final)
        self.result = Trace(
            token_ids=self.token_ids,
            pieces=[self.tokenizer.token_text(t) for t in self.token_ids],
            offsets=self.offsets,
            text=self.text,
            layers=self.keep,
            attentions={i: np.array(a.astype(mx.float32)) for i, a in self._attentions.items()},
            hidden_states=[np.array(s[0].astype(mx.float32)) for s in hidden],
            logits=np.array(logits[0].astype(mx.float32)),
            routing={i: (np.array(e), np.array(w)) for i, (e, w) in self._routing.items()},
            model=self.model,
            tokenizer=self.tokenizer,
        )
        self.done += 1
        self._walk = None
        self._hidden, self._attentions, self._routing = [], {}, {}
        return True


def logit_lens(
    t: Trace, top: int = 5, positions: Sequence[int] | None = None
) -> list[list[list[tuple[int, str, float]]]]:
    """For each hidden state (embeddings, each layer's output) and position, the `top` most likely
    tokens as (id, piece, probability) when that state goes through the final norm and the LM
    head, as if the model stopped there. `[L + 1][positions][top]` (default: every position);
    the last row is the model's own. One state at a time: `logit_lens_layer`."""
    return [logit_lens_layer(t, i, top, positions) for i in range(len(t.hidden_states))]


def logit_lens_layer(
    t: Trace, index: int, top: int = 5, positions: Sequence[int] | None = None
) -> list[list[tuple[int, str, float]]]:
    """logit_lens of hidden state `index` (0: the embeddings) alone: `[positions][top]`. The LM
    head is the costly part (vocabulary x hidden size per position): asking only for the
    positions shown keeps it to milliseconds, and a caller on a shared engine can run one state
    per call, so other requests are served in between."""
    own_streams()  # MLX work on the calling thread (streams.py)
    model, states = t.model, t.hidden_states[index]
    if positions is not None:
        states = states[list(positions)]
    h = mx.array(states)[None].astype(model.compute_dtype)
    if index < len(t.hidden_states) - 1:  # the last state is already normed
        h = model.model.norm(h)
    probs = mx.softmax(model.logits(h)[0].astype(mx.float32), axis=-1, precise=True)
    order = mx.argpartition(-probs, kth=top - 1, axis=-1)[:, :top]  # the top, unordered
    chosen = mx.take_along_axis(probs, order, axis=-1)
    order, chosen = np.array(order), np.array(chosen)
    rank = np.argsort(-chosen, axis=-1, kind="stable")
    order, chosen = np.take_along_axis(order, rank, -1), np.take_along_axis(chosen, rank, -1)
    return [
        [
            (int(i), t.tokenizer.token_text(int(i)), float(p))
            for i, p in zip(order[pos], chosen[pos], strict=True)
        ]
        for pos in range(order.shape[0])
    ]


def sampling_stages(
    logits: np.ndarray | mx.array,
    params: SamplingParams,
    history: Sequence[int] = (),
) -> list[tuple[str, np.ndarray]]:
    """The next-token distribution after each stage of the sampler's chain, in its order: raw,
    penalties (repetition over the last `repetition_context_size` of `history`, presence and
    frequency over `history`'s counts) and logit bias, top-k, top-p, min-p, temperature.
    [(stage, probabilities [vocab])]; a filtered-out token has probability 0. The penalty stage
    is the sampler's own (`Sampler.process`, `history` counted as generated tokens); the filters
    are its functions one at a time (its fused top-k shortcut gives the same distribution)."""
    own_streams()  # MLX work on the calling thread (streams.py)
    x = mx.array(np.asarray(logits, dtype=np.float32))[None]  # [1, V]
    V = x.shape[-1]
    stages = [("raw", x)]
    x = Sampler(params, V, generated_ids=[int(t) for t in history]).process(x)
    stages.append(("penalties", x))
    x = apply_top_k(x, params.top_k)
    stages.append(("top-k", x))
    x = apply_top_p(x, params.top_p)
    stages.append(("top-p", x))
    x = apply_min_p(x, params.min_p)
    stages.append(("min-p", x))
    if params.greedy:  # temperature 0: all the mass on the most likely survivor
        top = mx.argmax(x, axis=-1)
        stages.append(("temperature", np.eye(V, dtype=np.float32)[np.array(top)[0]]))
    else:
        stages.append(("temperature", apply_temperature(x, params.temperature)))
    out = []
    for name, value in stages:
        if isinstance(value, np.ndarray):
            out.append((name, value))
        else:
            out.append((name, np.array(mx.softmax(value, axis=-1, precise=True)[0])))
    return out


def draw(
    logits: np.ndarray | mx.array,
    params: SamplingParams,
    history: Sequence[int] = (),
    n: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """`n` independent draws from the distribution the real sampler would draw from at this step
    (its penalty stage, then its filter chain), as token ids; the empirical side of
    sampling_stages. Greedy settings give the argmax n times."""
    own_streams()  # MLX work on the calling thread (streams.py)
    from .sampling import Sampler, filter_logits

    x = mx.array(np.asarray(logits, dtype=np.float32))[None]
    sampler = Sampler(params, x.shape[-1], [int(t) for t in history])
    x = sampler.process(x)
    if params.greedy:
        return np.full(n, int(mx.argmax(x, axis=-1).item()))
    filtered = filter_logits(x, params)
    tokens = mx.random.categorical(filtered, num_samples=n, key=mx.random.key(seed))
    return np.array(tokens[0])


def architecture(model) -> dict:
    """The model in numbers: layers, heads, KV heads and so the attention kind (MHA, GQA, MQA),
    head dim, hidden and FFN sizes, experts, sliding windows, parameters by component, and weight
    bytes by dtype (or quantization)."""
    c = model.config
    kind = (
        "MHA"
        if c.num_key_value_heads == c.num_attention_heads
        else "MQA"
        if c.num_key_value_heads == 1
        else "GQA"
    )
    parameters: dict[str, int] = {}
    bytes_by_kind: dict[str, int] = {}
    quantized = {
        name: (module.bits, module.group_size)
        for name, module in model.named_modules()
        if hasattr(module, "bits") and hasattr(module, "group_size") and "scales" in module
    }
    for name, value in tree_flatten(model.parameters()):
        component = _component(name)
        owner = name.rsplit(".", 1)[0]
        if owner in quantized:
            bits, group = quantized[owner]
            kind_name = f"{bits}-bit (groups of {group})"
            if name.endswith(".weight"):  # packed: 32 // bits values per uint32
                parameters[component] = parameters.get(component, 0) + value.size * 32 // bits
        else:
            kind_name = str(value.dtype).removeprefix("mlx.core.")
            parameters[component] = parameters.get(component, 0) + value.size
        bytes_by_kind[kind_name] = bytes_by_kind.get(kind_name, 0) + value.nbytes
    windows = sorted({w for w in c.layer_windows if w is not None})
    return {
        "layers": c.num_hidden_layers,
        "attention": kind,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "experts": c.num_experts if any(c.layer_moe) else 0,
        "experts_per_token": c.num_experts_per_tok if any(c.layer_moe) else 0,
        "sliding_windows": windows,
        "vocab_size": c.vocab_size,
        "context": c.max_position_embeddings,
        "parameters": parameters,
        "total_parameters": sum(parameters.values()),
        "weight_bytes": bytes_by_kind,
        "total_weight_bytes": model.nbytes,
        "kv_bytes_per_token": kv_cache_bytes(c, 256, itemsize=model.compute_dtype.size) // 256,
    }


def measured_kv_bytes(model, tokens: int, cache: CacheSpec | None = None) -> int:
    """Bytes real caches of the kind `cache` hold once `tokens` tokens are in, filled as
    generation fills them (all but one in prefill's chunks, then one decoded token), for checking
    the prediction (`CacheSpec.nbytes`) on the loaded model. What a cache allocates depends on
    how many keys and values arrive, in what pieces, never on their values: they are zeros of
    the model's shapes, with no forward pass (which made a 4,096-token check take 90 s of the
    engine's thread, every chat waiting; random values took 1.4 s of it, zeros 0.2 s)."""
    own_streams()  # MLX work on the calling thread (streams.py)
    caches = model.make_cache(cache)
    c = model.config

    def arrive(n: int) -> None:
        shape = (1, c.num_key_value_heads, n, c.head_dim)
        for layer in caches:
            zeros = mx.zeros(shape, dtype=model.compute_dtype)
            layer.update_and_fetch(zeros, zeros)
        mx.eval([layer.state for layer in caches])

    prompt = tokens - 1
    for start in range(0, prompt, DEFAULT_PREFILL_CHUNK):  # prefill's chunks, then a decode step
        arrive(min(DEFAULT_PREFILL_CHUNK, prompt - start))
    arrive(1)
    return sum(layer.nbytes for layer in caches)


def _component(name: str) -> str:
    """A parameter's part of the model: embeddings, attention, MLP / experts / router, norms, LM
    head."""
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "LM head"
    if "self_attn" in name:
        return "norms" if "norm" in name.rsplit(".", 2)[-2] else "attention"
    if ".mlp.gate." in name or "shared_expert_gate" in name:
        return "router"
    if "switch_mlp" in name:
        return "experts"
    if ".mlp." in name:
        return "MLP"
    return "norms"
