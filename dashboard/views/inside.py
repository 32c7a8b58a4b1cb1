"""Inside the model: the loaded model's own tokens, next-token distribution through our sampler's
stages, attention maps, logit lens, expert routing, a step-by-step walk through one prediction,
and the architecture with a KV cache calculator checked against a real cache.

Every forward pass runs on the engine's thread (`Engine.call`): this script only sends it work and
draws what comes back (mlxinfer.inspect does the computing)."""

import html
import time

import altair as alt
import common
import numpy as np
import pandas as pd
import streamlit as st

from mlxinfer import inspect
from mlxinfer.bench.machine import total_memory_bytes
from mlxinfer.cache import kv_cache_bytes
from mlxinfer.sampling import SamplingParams

MAX_TOKENS = 256  # attention maps are heads x T x T per layer: keep the page fast
STAGE_NAMES = {"penalties": "penalties", "top-k": "top-k", "top-p": "top-p", "min-p": "min-p"}

state = st.session_state
with st.sidebar:
    name = common.model_picker()

st.title("Inside the model")
loaded = common.load_model(name)
if loaded is None:
    st.stop()
model, tokenizer = loaded
engine = common.engine(name)
if engine is None:
    st.stop()

templated = bool(tokenizer.chat_template)
left, right = st.columns([4, 1])
prompt = left.text_area("Prompt", "The capital of France is", key="inside_prompt", height=80)
chat = right.checkbox(
    "Chat template",
    value=False,
    disabled=not templated,
    key="inside_chat",
    help="Wrap the prompt as a user message, as the chat does.",
)

if not prompt.strip():
    st.info("Type a prompt to look at what the model does with it.")
    st.stop()
key = (name, prompt, chat)


def stepwise(step, steps: int, what: str) -> None:
    """Run `step` on the engine's thread until it returns True, one engine call each (chats in
    other tabs are served between two), with a progress bar and the time left. A rerun (the
    prompt edited, any click) stops the script between two steps: the rest is never run."""
    bar = st.progress(0.0, text=what)
    start, done = time.perf_counter(), 0
    while not engine.call(step):
        done += 1
        elapsed = time.perf_counter() - start
        left = elapsed / done * (steps - done)
        bar.progress(min(done / steps, 1.0), text=f"{what}: {done} of {steps} · ~{left:.0f} s left")
    bar.empty()


if state.get("inside_key") != key:
    try:
        tracing = inspect.Tracing(model, tokenizer, prompt, chat=chat)
    except Exception as e:
        st.error(f"Could not run the prompt: {e}")
        st.stop()
    if len(tracing.token_ids) > MAX_TOKENS:
        st.error(
            f"The prompt is {len(tracing.token_ids)} tokens; this page shows up to {MAX_TOKENS}."
        )
        st.stop()
    try:
        stepwise(tracing.step, tracing.steps, "Running the prompt through the model")
    except Exception as e:
        st.error(f"Could not run the prompt: {e}")
        st.stop()
    state.inside_key, state.inside_trace = key, tracing.result
t = state.inside_trace
T = len(t.token_ids)
labels = [f"{i}:{p!r}"[:24] for i, p in enumerate(t.pieces)]

tabs = st.tabs(
    [
        "Tokens",
        "Next token",
        "Attention",
        "Logit lens",
        "Experts",
        "Step by step",
        "Architecture & memory",
    ]
)

# -- tokens ------------------------------------------------------------------------------------
with tabs[0]:
    st.markdown(
        f"The tokenizer cuts the prompt into **{T} tokens**; the model only ever sees "
        "their ids. Hover a piece for its id and position."
    )
    colours = ["#fde2e4", "#e2ece9", "#dfe7fd", "#fff1e6", "#e8e8e4", "#f0efeb", "#d8e2dc"]
    spans = "".join(
        f'<span title="id {i} · position {pos}" style="background:{colours[pos % len(colours)]};'
        f'padding:2px 1px;margin:1px;border-radius:3px;font-family:monospace;white-space:pre">'
        f"{html.escape(piece) or '∅'}</span>"
        for pos, (i, piece) in enumerate(zip(t.token_ids, t.pieces, strict=True))
    )
    st.html(f'<div style="line-height:2.2">{spans}</div>')
    st.dataframe(
        pd.DataFrame({"position": range(T), "id": t.token_ids, "piece": t.pieces}),
        hide_index=True,
        height=220,
    )

# -- next token --------------------------------------------------------------------------------
with tabs[1]:
    position = st.slider(
        "After position",
        0,
        T - 1,
        T - 1,
        key="inside_position",
        help="The distribution the model gives for the token after this one.",
    )
    a, b, c, d, e = st.columns(5)
    params = SamplingParams(
        temperature=a.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="inside_t"),
        top_k=b.slider("Top-k", 0, 200, 40, 1, key="inside_k", help="0: off"),
        top_p=c.slider("Top-p", 0.05, 1.0, 0.9, 0.01, key="inside_p"),
        min_p=d.slider("Min-p", 0.0, 0.5, 0.05, 0.01, key="inside_min_p"),
        repetition_penalty=e.slider("Repetition", 1.0, 2.0, 1.0, 0.05, key="inside_rep"),
    )
    history = t.token_ids[: position + 1]
    stages = dict(engine.call(inspect.sampling_stages, t.logits[position], params, history))
    before = stages["penalties"]
    top = np.argsort(-before)[:20]
    removed_by = []
    for token in top:
        why = "kept"
        for stage in ("top-k", "top-p", "min-p"):
            if stages[stage][token] == 0:
                why = f"removed by {stage}"
                break
        removed_by.append(why)
    tokens = [f"{tokenizer.token_text(int(i))!r}" for i in top]
    frame = pd.DataFrame(
        {
            # the rank makes each label unique (two tokens may read alike) and fixes the order
            "label": [f"{r}. {tok}" for r, tok in enumerate(tokens, 1)],
            "token": tokens,
            "rank": range(1, len(top) + 1),
            "probability": before[top],
            "final": stages["temperature"][top],
            "fate": removed_by,
            "cumulative": np.cumsum(before[top]),
        }
    )
    bars = (
        alt.Chart(frame, height=320)
        .mark_bar()
        .encode(
            x=alt.X(
                "label:N",
                sort=list(frame["label"]),  # by rank, on every update (not the last one's order)
                title="the 20 most likely next tokens, by rank",
                axis=alt.Axis(labelAngle=-45, labelLimit=0),
            ),
            y=alt.Y("probability:Q", title="probability (after penalties)"),
            color=alt.Color(
                "fate:N",
                title="",
                scale=alt.Scale(
                    domain=["kept", "removed by top-k", "removed by top-p", "removed by min-p"],
                    range=["#1f77b4", "#bbbbbb", "#ff9f80", "#ffd27f"],
                ),
            ),
            tooltip=[
                "rank",
                "token",
                alt.Tooltip("probability:Q", format=".4f"),
                alt.Tooltip("final:Q", format=".4f", title="after the chain"),
                "fate",
            ],
        )
    )
    line = (
        alt.Chart(frame)
        .mark_line(color="black", point=True)
        .encode(
            x=alt.X("label:N", sort=list(frame["label"])),
            y=alt.Y("cumulative:Q", title="cumulative probability"),
        )
    )
    rule = (
        alt.Chart(pd.DataFrame({"p": [params.top_p]})).mark_rule(strokeDash=[4, 4]).encode(y="p:Q")
    )
    st.altair_chart(alt.layer(bars, line + rule).resolve_scale(y="independent"), width="stretch")
    kept = int((stages["temperature"] > 0).sum())
    st.caption(
        f"{kept} token(s) can be drawn after the chain (penalties → top-k → top-p → "
        "min-p → temperature); the dashed line is top-p, the black line the cumulative "
        "probability of the tokens so far."
    )
    # the draws stay on the page until the prompt, position or settings change (a button's click
    # lasts one rerun: the chart vanished at the next slider move, even an unrelated one)
    drawn_for = (key, position, repr(params))
    if st.button("Sample 200 times", key="inside_sample"):
        state.draws = (
            drawn_for,
            engine.call(
                inspect.draw,
                t.logits[position],
                params,
                history,
                200,
                seed=int(np.random.default_rng().integers(1 << 30)),
            ),
        )
    if state.get("draws") is not None and state.draws[0] == drawn_for:
        counts = pd.Series(state.draws[1]).value_counts()
        shown = sorted(
            set(counts.index[:15]) | set(top[:5].tolist()), key=lambda i: -stages["temperature"][i]
        )
        compare = pd.DataFrame(
            [
                {
                    "token": f"{tokenizer.token_text(int(i))!r}",
                    "share": counts.get(i, 0) / 200,
                    "what": "drawn (200)",
                }
                for i in shown
            ]
            + [
                {
                    "token": f"{tokenizer.token_text(int(i))!r}",
                    "share": float(stages["temperature"][i]),
                    "what": "computed",
                }
                for i in shown
            ]
        )
        st.altair_chart(
            alt.Chart(compare, height=260)
            .mark_bar()
            .encode(
                x=alt.X("token:N", sort=None),
                xOffset="what:N",
                y=alt.Y("share:Q", title="probability / frequency"),
                color="what:N",
            ),
            width="stretch",
        )
    elif state.get("draws") is not None:
        st.caption("The last 200 draws were for other settings: sample again to compare.")


def labelled_tiles(image: np.ndarray, layers: int, heads: int, step: int):
    """The grid of attention thumbnails with its layer numbers down the left ("L0", ...) and its
    head numbers across the top ("H0", ...)."""
    from PIL import Image, ImageDraw

    left, top = 34, 18
    canvas = Image.new("L", (image.shape[1] + left, image.shape[0] + top), 255)
    canvas.paste(Image.fromarray(image), (left, top))
    draw = ImageDraw.Draw(canvas)
    for li in range(layers):
        draw.text((2, top + li * step + step // 2 - 6), f"L{li}", fill=0)
    for hi in range(heads):
        draw.text((left + hi * step + step // 2 - 8, 3), f"H{hi}", fill=0)
    return canvas


# -- attention ---------------------------------------------------------------------------------
with tabs[2]:
    layers, heads = len(t.attentions), model.config.num_attention_heads
    a, b = st.columns(2)
    layer = a.number_input("Layer", 0, layers - 1, 0, key="inside_layer")
    head = b.number_input("Head", 0, heads - 1, 0, key="inside_head")
    weights = t.attentions[int(layer)][int(head)]
    grid = pd.DataFrame(
        [
            (labels[q], labels[k], float(weights[q, k]), q, k)
            for q in range(T)
            for k in range(q + 1)
        ],  # a query never sees later keys: left blank
        columns=["query", "key", "weight", "q", "k"],
    )
    side = min(760, 200 + 22 * T)  # (Streamlit fits labels and legend inside this too)
    heatmap = (
        alt.Chart(grid)
        .mark_rect()
        .encode(
            x=alt.X("key:N", sort=labels, title="attends to (key)"),
            y=alt.Y("query:N", sort=labels, title="token (query)"),
            color=alt.Color("weight:Q", scale=alt.Scale(scheme="blues"), title="weight"),
            tooltip=["query", "key", alt.Tooltip("weight:Q", format=".3f")],
        )
        .properties(width=side, height=side)
    )
    st.altair_chart(heatmap, width="content")
    st.caption(
        "Each row is one token's attention, softmaxed over the tokens it may see (causal; "
        "a sliding-window layer sees only its window), so every row sums to 1."
    )
    st.markdown(
        "**Every layer and head** (rows: layers; columns: heads; long prompts averaged "
        "down to 32 positions)"
    )
    size = min(T, 32)
    edges = np.linspace(0, T, size + 1).astype(int)

    def shrink(m):
        return np.array(
            [
                [m[edges[i] : edges[i + 1], edges[j] : edges[j + 1]].mean() for j in range(size)]
                for i in range(size)
            ]
        )

    tiles = np.ones((layers * (size + 2), heads * (size + 2)))
    for li in range(layers):
        for hi in range(heads):
            m = shrink(t.attentions[li][hi]) if size < T else t.attentions[li][hi]
            m = m / max(m.max(), 1e-9)
            y, x = li * (size + 2), hi * (size + 2)
            tiles[y : y + size, x : x + size] = 1 - m
    scale = max(1, 600 // tiles.shape[1])
    image = np.kron(tiles, np.ones((scale, scale)))
    st.image(labelled_tiles((image * 255).astype(np.uint8), layers, heads, (size + 2) * scale))

# -- logit lens --------------------------------------------------------------------------------
with tabs[3]:
    st.markdown(
        "Each layer's hidden state sent straight through the final norm and the LM head, "
        "as if the model stopped there: what it would predict next, layer by layer. "
        "The top row (the last layer) is the model's own prediction."
    )
    shown = list(range(max(0, T - 16), T))  # the last 16 positions
    if state.get("lens_key") != key:
        states, lens = len(t.hidden_states), []

        def lens_step() -> bool:  # one hidden state through the head per engine call
            lens.append(inspect.logit_lens_layer(t, len(lens), top=1, positions=shown))
            return len(lens) == states

        stepwise(lens_step, states, "Sending each layer's states through the LM head")
        state.lens, state.lens_key = lens, key
    lens = state.lens
    rows = [
        {
            "layer": "embeddings" if i == 0 else f"layer {i - 1}",
            "position": labels[pos],
            "token": repr(lens[i][j][0][1])[:12],
            "probability": lens[i][j][0][2],
        }
        for i in range(len(lens))
        for j, pos in enumerate(shown)
    ]
    frame = pd.DataFrame(rows)
    order = list(dict.fromkeys(frame["layer"]))[::-1]
    base = alt.Chart(frame, height=max(240, 24 * len(lens))).encode(
        x=alt.X("position:N", sort=[labels[p] for p in shown], title="position (token)"),
        y=alt.Y("layer:N", sort=order, title="", axis=alt.Axis(labelOverlap=False)),  # every layer
    )
    st.altair_chart(
        base.mark_rect().encode(
            color=alt.Color("probability:Q", scale=alt.Scale(scheme="greens", domain=[0, 1])),
            tooltip=["layer", "position", "token", alt.Tooltip("probability:Q", format=".3f")],
        )
        + base.mark_text(fontSize=9).encode(
            text="token:N",
            # white on the dark greens, black on the light ones
            color=alt.condition("datum.probability > 0.5", alt.value("white"), alt.value("black")),
        ),
        width="stretch",
    )

# -- experts -----------------------------------------------------------------------------------
with tabs[4]:
    if not t.routing:
        st.info(
            "This model has no mixture-of-experts layers: every token goes through the same "
            "MLP in every layer."
        )
    else:
        n_experts = model.config.num_experts
        use = pd.DataFrame(
            [
                {"layer": li, "expert": int(e), "tokens": int((experts == e).any(axis=1).sum())}
                for li, (experts, _) in t.routing.items()
                for e in range(n_experts)
            ]
        )
        st.markdown(
            "How many of the prompt's tokens each expert took, layer by layer (even use "
            "is what the router's load balancing aims at)."
        )
        st.altair_chart(
            alt.Chart(use)
            .mark_rect()
            .encode(
                x="expert:O",
                y="layer:O",
                color=alt.Color("tokens:Q", scale=alt.Scale(scheme="oranges")),
                tooltip=["layer", "expert", "tokens"],
            ),
            width="stretch",
        )
        chosen_layer = st.selectbox("Layer", list(t.routing), key="inside_moe_layer")
        experts, weights = t.routing[chosen_layer]
        st.dataframe(
            pd.DataFrame(
                {
                    "token": labels,
                    "experts": [", ".join(str(int(e)) for e in row) for row in experts],
                    "weights": [", ".join(f"{w:.2f}" for w in row) for row in weights],
                }
            ),
            hide_index=True,
        )

# -- step by step ------------------------------------------------------------------------------
with tabs[5]:
    c = model.config
    last = t.logits[-1]
    probs = np.exp(last - last.max())
    probs /= probs.sum()
    best = np.argsort(-probs)[:5]
    chosen = tokenizer.token_text(int(best[0]))
    steps = [
        (
            "Tokens",
            f"the prompt → {T} token ids `{t.token_ids[:12]}{' …' if T > 12 else ''}`",
            f"[1, {T}]",
        ),
        (
            "Embeddings",
            "each id picks one row of the embedding table"
            + (f", scaled by √{c.hidden_size}" if c.scale_embeddings else ""),
            f"[1, {T}, {c.hidden_size}]",
        ),
        (
            f"{c.num_hidden_layers} blocks",
            (
                "each: RMSNorm → attention (every token looks at the earlier ones) → RMSNorm → "
                "add; RMSNorm → MLP (GeGLU) → RMSNorm → add"
                if c.gemma_norms
                else "each: RMSNorm → attention (every token looks at the "
                "earlier ones) → add; RMSNorm → MLP → add"
            ),
            f"[1, {T}, {c.hidden_size}]",
        ),
        ("Final norm", "RMSNorm of the last block's output", f"[1, {T}, {c.hidden_size}]"),
        (
            "LM head",
            "one score (logit) per vocabulary entry, for every position"
            + (
                f", soft-capped to ±{c.final_logit_softcap:g}"
                if c.final_logit_softcap is not None
                else ""
            ),
            f"[1, {T}, {c.vocab_size}]",
        ),
        (
            "Last position",
            "only the last position's scores predict the next token",
            f"[{c.vocab_size}]",
        ),
        (
            "Softmax → pick",
            f"probabilities; greedy takes the largest: {chosen!r} ({probs[best[0]]:.1%})",
            "1 token",
        ),
    ]
    st.table(pd.DataFrame(steps, columns=["step", "what happens", "shape"]))
    st.markdown("**The last position's top candidates**")
    st.table(
        pd.DataFrame(
            {
                "token": [repr(tokenizer.token_text(int(i))) for i in best],
                "id": [int(i) for i in best],
                "logit": [float(last[i]) for i in best],
                "probability": [f"{probs[i]:.2%}" for i in best],
            }
        )
    )
    kv_now = kv_cache_bytes(c, T, itemsize=model.compute_dtype.size)
    st.markdown(
        f"**The next step** feeds only the new token, `[1, 1]`: the KV cache already holds the "
        f"keys and values of all {T} tokens in every layer ({kv_now / 2**20:.2f} MB as "
        "allocated), so each new token costs one pass over the weights instead of re-reading the "
        "whole prompt."
    )

# -- architecture and memory -------------------------------------------------------------------
with tabs[6]:
    card = inspect.architecture(model)
    a, b, c_, d = st.columns(4)
    a.metric("Layers", card["layers"])
    b.metric(
        "Attention",
        card["attention"],
        help=f"{card['heads']} query heads sharing {card['kv_heads']} key/value heads",
    )
    c_.metric("Parameters", f"{card['total_parameters'] / 1e6:.1f} M")
    d.metric("Weights", f"{card['total_weight_bytes'] / 2**20:.0f} MB")
    st.dataframe(
        pd.DataFrame(
            [
                {"": k, "value": str(v)}
                for k, v in card.items()
                if k not in ("parameters", "weight_bytes")
            ]
            + [{"": f"parameters: {k}", "value": f"{v:,}"} for k, v in card["parameters"].items()]
            + [
                {"": f"weight bytes: {k}", "value": f"{v:,}"}
                for k, v in card["weight_bytes"].items()
            ]
        ),
        hide_index=True,
    )
    st.subheader("KV cache calculator")
    a, b, c_ = st.columns(3)
    context = int(
        a.number_input(
            "Context (tokens)",
            1,
            model.config.max_position_embeddings,
            min(1024, model.config.max_position_embeddings),
            key="kv_context",
        )
    )
    batch = int(b.number_input("Batch (sequences)", 1, 256, 1, key="kv_batch"))
    spec = common.cache_controls("kv_", where=c_, label="Cache")
    try:
        predicted = spec.nbytes(model.config, context, batch, model.compute_dtype.size)
    except ValueError as e:
        st.error(str(e))
        st.stop()
    st.metric(
        "Predicted KV cache",
        common.size(predicted),
        help="keys and values of every layer, in slots that grow 256 at a time",
    )
    machine = total_memory_bytes()
    if machine and predicted + model.nbytes > machine:
        st.warning(
            f"With the weights ({common.size(model.nbytes)}) that is more than this machine's "
            f"{common.size(machine)} of memory: it would not run here."
        )
    if st.button(
        "Check against a real cache",
        key="kv_check",
        help="Fills a real cache with one sequence of that many tokens (then "
        "multiplies by the batch) and measures its bytes.",
    ):
        try:
            held = engine.call(inspect.measured_kv_bytes, model, context, spec)
        except Exception as e:
            st.error(f"Could not measure: {e}")
        else:
            off = held * batch - predicted
            st.metric(
                "Measured",
                common.size(held * batch),
                delta=None if off == 0 else f"{off / 2**20:+,.2f} MB against the prediction",
                delta_color="off",
            )
            if off == 0:
                st.caption("Exactly the prediction.")
