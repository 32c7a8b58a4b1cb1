"""The mlxinfer dashboard: `mlxinfer dashboard [--model PATH] [--port N] [--db PATH]`, or
`streamlit run dashboard/app.py`.

Pages: Chat (the engine, streamed, with each reply's metrics), Sweep (a benchmark grid run in a
worker process, its charts filling as measurements land), Results (every run in the database,
compared), Metrics (what each number means). They call the same Python API as everyone else:
mlxinfer.Engine, mlxinfer.bench, the runs database.
"""

import logging
from pathlib import Path

import streamlit as st

import mlxinfer  # noqa: F401  (first: OpenBLAS must be loaded before MLX on Linux)

# a local image: a Material icon as the page icon is fetched from Google's font CDN (offline: no)
ICON = Path(__file__).parent / "icon.png"
st.set_page_config(page_title="mlxinfer", page_icon=str(ICON), layout="wide")

PAGES = {
    "Use": [st.Page("views/chat.py", title="Chat", icon=":material/chat:", default=True)],
    "Measure": [
        st.Page("views/sweep.py", title="Sweep", icon=":material/speed:"),
        st.Page("views/results.py", title="Results", icon=":material/table_chart:"),
    ],
    "Learn": [
        st.Page("views/inside.py", title="Inside the model", icon=":material/neurology:"),
        st.Page("views/metrics.py", title="Metrics", icon=":material/menu_book:"),
    ],
}

page = st.navigation(PAGES)
try:
    page.run()
except Exception as e:  # a bug: a message, not a traceback page; the other pages still work
    logging.getLogger("mlxinfer.dashboard").exception("page %s failed", page.title)
    st.error(
        f"Unexpected error on this page: {type(e).__name__}: {e}\n\nThe other pages still work. "
        "This is a bug in mlxinfer; the server's log has the traceback, and `mlxinfer env` "
        "prints what a report needs."
    )
