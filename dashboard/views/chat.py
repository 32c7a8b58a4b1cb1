"""Chat: the loaded model through the process's Engine, replies streamed, each with its metrics
(TTFT, decode speed, memory) and its inter-token latency by position."""

from dataclasses import replace

import charts
import common
import streamlit as st

from mlxinfer.conversation import REPLY_ROOM, Conversation

state = st.session_state
if "messages" not in state:  # a new session: a reload of this tab finds its conversation again
    state.messages = common.conversation(st.query_params.get("chat"))  # {"role", "content", ...}

with st.sidebar:
    name = common.model_picker()
    loaded = common.load_model(name)
    templated = loaded is not None and bool(loaded[1].chat_template)
    modes = ["chat", "raw completion"] if templated else ["raw completion"]
    mode = st.radio(
        "Mode",
        modes,
        horizontal=True,
        key=f"chat_mode_{templated}",
        help="Chat wraps the conversation in the model's chat template; raw "
        "completion continues the text as it is.",
    )
    if not templated and loaded is not None:
        st.caption("This model has no chat template: raw completion only.")
    system = st.text_area(
        "System prompt", key="system", disabled=mode != "chat", placeholder="the template's default"
    )
    with st.expander("Sampling", expanded=False):
        sampling, max_tokens, wrong = common.sampling_controls("chat_")
    if wrong is not None:  # (the expander may be closed)
        st.error(f"Sampling: {wrong}")
    with st.expander("Speculative decoding", expanded=False):
        lookup = st.toggle(
            "Prompt lookup",
            key="chat_lookup",
            help="Propose what followed the context's last few tokens where they appeared "
            "before, and check the proposals in one pass: the same reply, sooner where it "
            "copies the prompt.",
        )
        draft = st.text_input(
            "Draft model",
            key="chat_draft",
            disabled=lookup,
            placeholder="a path: a smaller model with the same tokenizer",
            help="A second model proposes the next tokens (its greedy guesses) and this one "
            "checks them in one pass: the same reply, sooner where the draft guesses right "
            "and costs little. Off while prompt lookup is on.",
        ).strip()
        draft = "" if lookup else draft
        drafts = st.slider(
            "Proposals a step", 1, 8, 4, key="chat_num_draft", disabled=not (lookup or draft)
        )
    if sampling is not None and (lookup or draft):
        proposer = "prompt-lookup" if lookup else "draft"
        sampling = replace(sampling, speculation=proposer, num_draft=drafts)
    with st.expander("KV cache", expanded=False):
        cache = common.cache_controls("chat_")
    if cache.kv_bits == 4:
        st.warning(
            "A 4-bit KV cache costs small models much of their quality (SmolLM2-135M's answers "
            "turn to noise); 8-bit is close to exact."
        )
    if st.button("New conversation", icon=":material/restart_alt:"):
        state.messages = common.conversation(None)
    if sweeping := common.running_sweeps():
        st.warning(
            f"Run {sweeping[0]} is sweeping: a chat now slows it and skews its measurements "
            "(both share this machine's cores)."
        )

st.title("Chat")
st.caption(
    f"{common.model_label(name)} · replies stream from the engine; under each one its "
    "metrics (the Metrics page defines them)."
)


def show_reply_metrics(metrics: dict) -> None:
    common.metric_row(metrics)
    if len(metrics.get("itl_ms") or []) > 1:
        st.altair_chart(charts.itl_by_position(metrics["itl_ms"]), width="stretch")
    if metrics.get("draft_tokens"):
        st.caption(
            f"Speculative decoding: {metrics['accepted_draft_tokens']} of "
            f"{metrics['draft_tokens']} proposed tokens accepted "
            f"({metrics['acceptance_rate']:.0%}); each accepted one came without a step of its own."
        )
        if metrics.get("acceptance_by_position"):
            chart = charts.acceptance_by_position(metrics["acceptance_by_position"])
            st.altair_chart(chart, width="stretch")


FINISHED = {
    "eos": "ended by the model",
    "stop": "ended at a stop string",
    "length": "cut at max tokens",
    "cancelled": "stopped",
    "error": "failed",
}


def reply_summary(tokens: int, reason: str | None, settings: str) -> str:
    """Under a reply: how many tokens, why it ended, and the settings it was made with."""
    ended = FINISHED.get(reason or "", "stopped before the end")
    return f"{tokens} token{'s' if tokens != 1 else ''} · {ended} · {settings}"


for message in state.messages:
    with st.chat_message(message["role"]):
        st.markdown(common.keep_line_breaks(message["content"]))
        if message.get("summary"):
            st.caption(message["summary"])
        elif message.get("stopped"):  # cut by a click (the loop below did not get to the end)
            st.caption(reply_summary(message["tokens"], "cancelled", message["settings"]))
        if message.get("metrics"):
            show_reply_metrics(message["metrics"])

prompt = st.chat_input("Ask something" if mode == "chat" else "Text to continue")
if prompt is not None and not prompt.strip():
    st.warning("The message is empty: nothing was sent.")
    prompt = None
if prompt and wrong is not None:  # never a reply with other settings than the boxes show
    st.error(f"Not sent: {wrong}. Fix it under Sampling in the sidebar.")
    prompt = None
engine = common.engine(name, cache, draft or None) if prompt and loaded is not None else None
if prompt and engine is not None and sampling is not None:
    state.messages.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(common.keep_line_breaks(prompt))
    if mode == "chat":  # as `mlxinfer chat` does: the oldest exchanges leave once it outgrows
        model, tokenizer = loaded
        turns = Conversation(
            tokenizer, model.config.max_position_embeddings, system if system.strip() else None
        )
        turns.turns = [{"role": m["role"], "content": m["content"]} for m in state.messages[:-1]]
        try:
            conversation, dropped = turns.ask(prompt, min(max_tokens, REPLY_ROOM))
        except ValueError as e:  # the chat template fails on this history
            state.messages.pop()
            st.error(f"Not sent: {e}")
            st.stop()
        if dropped:
            st.info(
                f"The conversation outgrew the model's context of "
                f"{model.config.max_position_embeddings} tokens: the {dropped} oldest "
                "messages are left out of what the model sees."
            )
    else:
        conversation = prompt
    with st.chat_message("assistant"):
        try:
            handle = engine.submit(conversation, sampling, max_tokens, chat=mode == "chat")
        except Exception as e:  # a message longer than the context, a template that refuses it
            state.messages.pop()
            st.error(f"Not sent: {e}")
            st.stop()
        window = cache.max_kv_size
        if window is not None and handle.prompt_tokens + handle.max_tokens > window:
            st.warning(
                f"The KV cache keeps {window} tokens, fewer than this conversation's "
                f"{handle.prompt_tokens} and its reply's: the model loses sight of the start "
                "(all but the first few tokens), and small models then lose the thread."
            )
        # In the history before it streams: a click mid-reply (which stops this script) leaves
        # the part received, marked stopped, and the conversation keeps its turns in order.
        settings = f"{common.sampling_label(sampling)} · KV cache {cache.label}"
        if sampling.speculation == "draft":
            settings += f" · draft model {draft} ({sampling.num_draft} a step)"
        elif sampling.speculation is not None:
            settings += f" · prompt lookup ({sampling.num_draft} a step)"
        reply = {"role": "assistant", "content": "", "metrics": None, "stopped": True}
        reply |= {"tokens": 0, "settings": settings}
        state.messages.append(reply)

        shown, last = st.empty(), None
        # A click reruns the page, which interrupts this loop at its next draw: the rerun then
        # shows the reply as it stands, marked stopped (no need to send another message first).
        stop = st.empty()
        stop.button("Stop", icon=":material/stop:", key=f"stop_{len(state.messages)}")
        try:
            for response in handle:
                reply["tokens"] += response.token >= 0
                if response.text:
                    reply["content"] += response.text
                    shown.markdown(common.keep_line_breaks(reply["content"]) + "▌")
                if response.finish_reason is not None:
                    reply["stopped"] = False
                    last = response
        finally:  # the page reran mid-reply (Stop, or any other click): stop generating it
            if reply["stopped"]:
                handle.cancel()
        stop.empty()
        shown.markdown(common.keep_line_breaks(reply["content"]))
        reason = last.finish_reason if last else None
        reply["summary"] = reply_summary(reply["tokens"], reason, settings)
        st.caption(reply["summary"])
        if last is not None and last.finish_reason == "error":
            st.error(f"The reply failed: {last.error}")
        if last is not None and last.metrics:
            reply["metrics"] = last.metrics.to_dict()
            show_reply_metrics(reply["metrics"])
