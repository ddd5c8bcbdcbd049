"""foldviz — Streamlit workbench for data-free model folding.

Run:  streamlit run app.py

The entry point is a router: it sets up the page, the session state and the sidebar, then runs the
selected page from ``pages/`` (st.navigation + st.Page).  All computation lives in ``foldviz``.
"""
from __future__ import annotations

import streamlit as st

from pages import _ui

st.set_page_config(page_title="foldviz — fold a network", page_icon="🗂️", layout="wide",
                   initial_sidebar_state="expanded")

_ui.init_state()

PAGES = [
    st.Page("pages/model_data.py", title="Model & data", icon="📦", default=True, url_path="model"),
    st.Page("pages/layer_explorer.py", title="Layer explorer", icon="🔬", url_path="explorer"),
    st.Page("pages/fold_plan.py", title="Fold plan", icon="🗺️", url_path="plan"),
    st.Page("pages/fold_results.py", title="Fold & results", icon="📉", url_path="results"),
    st.Page("pages/learn.py", title="Learn", icon="🎓", url_path="learn"),
]
page = st.navigation(PAGES)

_wb = None
try:
    _wb = _ui.get_workbench()
    _ui.ensure_plan(_wb)
except Exception:  # the page itself reports load failures
    _wb = None
_ui.sidebar(_wb)
_ui.show_flash()
page.run()
