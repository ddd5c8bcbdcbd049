"""foldviz — Streamlit workbench for data-free model folding.

Run:  streamlit run app.py

The entry point is a router: it sets up the page, the session state and the sidebar, then runs the
selected page from ``pages/`` (st.navigation + st.Page).  All computation lives in ``foldviz``.
"""
from __future__ import annotations

import streamlit as st

from pages import _ui

st.set_page_config(page_title="foldviz — fold a network", page_icon=":material/compress:", layout="wide",
                   initial_sidebar_state="expanded")

_ui.init_state()
_ui.restore_from_url()

_wb = None
try:
    _wb = _ui.get_workbench()
    _ui.ensure_plan(_wb)
except Exception:  # the Model & data page reports load failures
    _wb = None

MODEL = st.Page("pages/model_data.py", title="Model & data", icon=":material/inventory_2:", default=True,
                url_path="model")
EXPLORER = st.Page("pages/layer_explorer.py", title="Layer explorer", icon=":material/biotech:", url_path="explorer")
PLAN = st.Page("pages/fold_plan.py", title="Fold plan", icon=":material/tune:", url_path="plan")
RESULTS = st.Page("pages/fold_results.py", title="Fold & results", icon=":material/insights:", url_path="results")
LEARN = st.Page("pages/learn_folding.py", title="Learn", icon=":material/school:", url_path="learn")
# the pages each model kind offers: every kind explores, plans and folds through the same pages; the Learn
# walkthrough teaches on a bundled image classifier whatever the session's model is
PAGES_FOR = {"cnn": [MODEL, EXPLORER, PLAN, RESULTS, LEARN], "lm": [MODEL, EXPLORER, PLAN, RESULTS, LEARN]}
PAGES = PAGES_FOR[_wb.kind.key if _wb is not None else "cnn"]
# NOTE on url_path: Streamlit still detects the legacy ``pages/`` folder until st.navigation has run once
# in the process (and in every AppTest run); legacy page hashes come from the file names.  Keeping every
# url_path different from its file name (and giving the default page an explicit one) means a legacy
# lookup never runs a page without this router, so the sidebar and session state are always set up.
page = st.navigation(PAGES)
_ui.sidebar(_wb)
_ui.show_flash()
try:
    page.run()
finally:  # also after st.stop()/st.rerun(): the URL always carries the plan the page left behind
    _ui.write_url()
