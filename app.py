"""foldviz — Streamlit workbench for data-free model folding.

Run:  python app.py [streamlit options]      (what `make app` does; `streamlit run app.py` works too)

The entry point is a router: it sets up the page, the session state and the sidebar, then runs the
selected page from ``pages/`` (st.navigation + st.Page).  All computation lives in ``foldviz``.
"""
from __future__ import annotations

import sys

import streamlit as st


def _serve() -> int:
    """`python app.py`: start the Streamlit server on this script, in this process. Streamlit treats a folder named
    ``pages/`` beside the main script as a legacy page list until ``st.navigation`` has run once, so on a fresh
    server the first deep link (``/plan?s=...``) would meet a "Page not found" dialog; telling it up front that the
    app navigates itself avoids that."""
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.web import cli

    PagesManager.uses_pages_directory = False
    sys.argv = ["streamlit", "run", __file__, *sys.argv[1:]]
    return cli.main()


if __name__ == "__main__" and not st.runtime.exists():
    sys.exit(_serve())

from pages import _ui  # noqa: E402

st.set_page_config(page_title="foldviz — fold a network", page_icon=str(_ui.ASSETS / "favicon.png"), layout="wide",
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
_ui.unknown_path_to_home([p.url_path for p in PAGES])
# NOTE on url_path: Streamlit still detects the legacy ``pages/`` folder until st.navigation has run once
# in the process (and in every AppTest run); legacy page hashes come from the file names.  Keeping every
# url_path different from its file name (and giving the default page an explicit one) means a legacy
# lookup never runs a page without this router, so the sidebar and session state are always set up.
page = st.navigation(PAGES)
_ui.show_flash()
try:
    page.run()
finally:  # also after st.stop()/st.rerun(): the URL carries the plan the page left behind, and the sidebar
    _ui.write_url()          # shows this run's fold (drawn after the page, not one run behind)
    _ui.sidebar(_wb)
