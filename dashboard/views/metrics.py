"""Metrics: what every number on these pages means, its formula, and what other tools call it,
so no chart is ambiguous (the definitions live in mlxinfer.metrics.DEFINITIONS)."""

import pandas as pd
import streamlit as st

from mlxinfer.metrics import DEFINITIONS

st.title("Metrics")
st.markdown(
    "Every request's metrics come from one place, the arrival time of each generated token on "
    "the host, whether it ran from the Python API, the command line, a sweep or this dashboard. "
    "A request starts when its prompt tokens are in hand (under the engine: when it is "
    "submitted)."
)
st.markdown(
    "**Prefill** reads the whole prompt in one pass and fills the KV cache: it is compute-bound, "
    "so it is measured in prompt tokens per second and shows up as the time to the first token. "
    "**Decode** then produces one token per step, each step reading all the weights (and the "
    "cache) to compute a single token per sequence: it is memory-bound, so it is measured in "
    "tokens per second, and batching several conversations shares each read of the weights."
)
table = pd.DataFrame(
    [
        {
            "metric": d.name,
            "shown as": d.label,
            "formula": d.formula,
            "what it tells": d.meaning,
            "other tools": d.elsewhere,
        }
        for d in DEFINITIONS
    ]
)
# a static table: every definition whole, its text wrapped (a scrolling grid showed 10 of 13 and
# cut the long cells)
st.table(table.set_index("metric"))
st.subheader("How a sweep measures")
st.markdown(
    "- One warm-up per configuration and engine, not counted; then the repetitions (default 5 "
    "for `mlxinfer bench`, 3 on the Sweep page), ours and mlx-lm's alternating, so both see "
    "the same machine.\n"
    "- EOS is ignored, so every configuration generates exactly the asked number of tokens "
    "whatever its sampling settings; seeds are fixed; prompts are exact token counts of "
    "public-domain text (KJV Genesis).\n"
    "- Peak memory is reset before each measured request, in both engines (mlx-lm itself never "
    "resets it).\n"
    "- Mean ± sample standard deviation over the repetitions; the ratio to mlx-lm pairs "
    "repetition r of both engines and has a 95% t-interval.\n"
    "- Figures from different runs or machines are not comparable on a shared machine; ratios "
    "measured in one run are."
)
