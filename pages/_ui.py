"""Shared Streamlit glue for the foldviz pages (state, the workbench registry, progress, small widgets).

Everything that computes lives in ``foldviz`` (``session.Workbench``, ``figures``); this module only wires it to
Streamlit:

* ``st.session_state`` holds plain data: ``model_source`` / ``data_source`` (dicts), ``plan`` (a FoldPlan dict),
  ``outcome`` (the last fold), ``sweep`` (rows), ``compare`` (variance ratios);
* ``st.cache_resource`` holds one Workbench per model source (shared by every session). The Workbench is the one
  cache: it memoises every analysis, evaluation and fold, and runs background work (:mod:`foldviz.jobs`);
  the base model is never folded in place.
"""
from __future__ import annotations

import json
import threading
import time
import traceback
import weakref
from typing import Callable

import plotly.graph_objects as go
import streamlit as st

from foldviz.figures import fmt_count
from foldviz.methods import label as method_label
from foldviz.methods import plan_method
from foldviz.share import StateError, decode_state, encode_state
from foldviz.session import DEFAULT_MODEL, DataSource, ModelSource, Workbench, WorkbenchError

from foldviz.utils import ASSETS_DIR as ASSETS  # noqa: E402,F401 - the app's own icon and images (pages use _ui.ASSETS)

#: what a page catches as "the action failed, say why in one line"
LOAD_ERRORS = (WorkbenchError,)

PLAN_WIDGET_PREFIX = "planw_"
# plan-page widgets and the plan field each one edits: (field, sub-field or None). Per-group widgets are
# "ratio_<group id>" (ratios[gid]) and "skip_<group id>" (gid in skip). Pages build keys with pkey().
PLAN_WIDGETS = {"default_ratio": ("default_ratio", None), "repair": ("repair", None), "seed": ("seed", None),
                "samples": ("repair_settings", "samples"), "dir_it": ("repair_settings", "iterations"),
                "dir_bs": ("repair_settings", "batch_size"), "dir_lr": ("repair_settings", "lr"),
                "algo": ("clustering", "algorithm"), "ninit": ("clustering", "n_init"),
                "maxit": ("clustering", "max_iter")}


def pkey(name: str, group: str | None = None) -> str:
    """Session-state key of a plan-page widget: a PLAN_WIDGETS name, or "ratio"/"skip" with a group id."""
    if group is not None:
        if name not in ("ratio", "skip"):
            raise KeyError(name)
        return f"{PLAN_WIDGET_PREFIX}{name}_{group}"
    if name not in PLAN_WIDGETS:
        raise KeyError(name)
    return PLAN_WIDGET_PREFIX + name


# ------------------------------------------------------------------------------------------------
# state
# ------------------------------------------------------------------------------------------------

def init_state() -> None:
    ss = st.session_state
    ss.setdefault("model_source", ModelSource(DEFAULT_MODEL).to_dict())
    ss.setdefault("data_source", DataSource("digits").to_dict())   # the default demo's data
    ss.setdefault("plan", None)          # FoldPlan.to_dict(); created once the model is loaded
    ss.setdefault("outcome", None)       # FoldOutcome of the last run
    ss.setdefault("sweep", None)         # {"key": ..., "rows": [...]}
    ss.setdefault("compare", None)       # {"key": ..., "data": {...}}
    ss.setdefault("messages", [])        # (kind, text) shown once on the next run


# ------------------------------------------------------------------------------------------------
# the URL: model, data and plan survive a reload and travel in a shared link (foldviz.share)
# ------------------------------------------------------------------------------------------------

URL_KEY = "s"


def restore_from_url() -> None:
    """Once per session (a new tab, a reload): adopt the model, data and plan packed in the URL, if any.
    A bad or unusable link gives a one-line warning and the defaults; nothing raises."""
    ss = st.session_state
    if ss.get("url_checked"):
        return
    ss["url_checked"] = True
    raw = st.query_params.get(URL_KEY)
    if not raw:
        return
    try:
        state = decode_state(raw)
    except StateError as exc:
        flash("warning", f"This link's saved state was ignored: {exc}. Starting from the defaults.")
        return
    m = state["model"]
    if m.get("upload"):
        # a link cannot carry a file: keep the link as it is (so nothing is lost) until the user loads a model
        ss["url_pending"] = raw
        flash("info", f"This link was made with an uploaded checkpoint ({m['upload']}), which a link cannot carry: "
                      f"upload it again on the Model & data page (architecture {m['spec']}).")
        return
    if not m["spec"].startswith(("demo:", "torchvision:")):
        # a link must not make this server open local folders: hf:DIR models load from the Model & data page
        ss["url_pending"] = raw
        flash("info", f"This link names a local model ({m['spec'][:120]}), which a link does not open: load it on the "
                      "Model & data page.")
        return
    src = ModelSource(m["spec"], num_classes=m.get("num_classes"), cifar_stem=bool(m.get("cifar_stem")))
    try:
        wb = get_workbench(src)
    except Exception as exc:  # noqa: BLE001 — any loader failure: keep the defaults
        flash("warning", f"This link's model {m['spec']!r} could not be loaded ({str(exc).splitlines()[0][:160]}); "
                         f"showing {DEFAULT_MODEL}.")
        return
    ss["model_source"] = src.to_dict()
    data = state["data"]
    if data is not None and data.get("spec") not in (None, "digits"):
        # a local dataset folder in a link is not opened either: the model's default data instead
        flash("info", f"This link's evaluation data ({str(data.get('spec'))[:120]}) is a local folder, which a link "
                      "does not open: pick it on the Model & data page.")
        data = None
    try:
        ss["data_source"] = DataSource.from_dict(data).to_dict() if data is not None \
            else wb.default_data().to_dict()
    except TypeError:
        ss["data_source"] = wb.default_data().to_dict()
    if state["plan"] is not None:
        try:  # validated like any imported plan
            ss["plan"] = dict(wb.plan_from(dict(state["plan"], model=src.spec)).to_dict(), model=src.spec)
        except (*LOAD_ERRORS, ValueError, TypeError) as exc:
            flash("error", f"The link's plan is not valid for this model ({str(exc).splitlines()[0][:200]}); "
                           "starting from a default plan.")
    reset_plan_widgets()


def write_url() -> None:
    """Keep the URL's state in step with the session (only when it changed: each write updates the browser)."""
    ss = st.session_state
    if ss.get("url_pending"):
        return
    try:
        text = encode_state(ss["model_source"], ss.get("data_source"), ss.get("plan"))
    except Exception:  # noqa: BLE001 — never let the URL break a page
        return
    if st.query_params.get(URL_KEY) != text:
        st.query_params[URL_KEY] = text


def model_source() -> ModelSource:
    return ModelSource.from_dict(st.session_state["model_source"])


def data_source() -> DataSource:
    return DataSource.from_dict(st.session_state["data_source"])


def source_key(src: ModelSource | None = None) -> tuple:
    src = src or model_source()
    return (src.spec, src.weights, src.weights_name, src.num_classes, src.cifar_stem)


def data_key(data: DataSource | None = None) -> tuple:
    data = data or data_source()
    return (data.spec, data.limit, data.repair_samples, data.calib)


def unknown_path_to_home(url_paths: list[str]) -> None:
    """A URL path that is no page of the app (a typo, an old link) opens the home page with a one-line notice,
    instead of Streamlit's blocking "Page not found" dialog."""
    try:
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        ctx = get_script_run_ctx()
        name = ctx.pages_manager.intended_page_name if ctx else None
    except Exception:  # noqa: BLE001 - an older or newer Streamlit: keep its own behaviour
        return
    if name and name not in url_paths:
        ctx.pages_manager.set_script_intent("", "")
        flash("info", f"There is no page at /{name[:60]}: showing the Model & data page.")


def flash(kind: str, text: str) -> None:
    """Queue a message for the next run (survives st.rerun / page switches)."""
    st.session_state["messages"].append((kind, text))


def show_flash() -> None:
    msgs, st.session_state["messages"] = st.session_state["messages"], []
    for kind, text in msgs:
        getattr(st, kind, st.info)(text)


# ------------------------------------------------------------------------------------------------
# the workbench registry (the Workbench itself is the cache)
# ------------------------------------------------------------------------------------------------

@st.cache_resource(show_spinner="Loading the model and finding its groups…", max_entries=4)
def _workbench(key: tuple) -> Workbench:
    spec, weights, weights_name, num_classes, cifar_stem = key
    wb = Workbench.load(ModelSource(spec, weights, weights_name, num_classes, cifar_stem))
    _ = wb.graph  # find the groups once, inside the spinner
    return wb


def get_workbench(src: ModelSource | None = None) -> Workbench:
    """The Workbench for ``src`` (default: the session's model), of any model kind; raises WorkbenchError."""
    wb = _workbench(source_key(src or model_source()))
    _WORKBENCHES.add(wb)
    _session_watch()
    return wb


# every workbench a session used: a closed session's background work is stopped in all of them
_WORKBENCHES: "weakref.WeakSet[Workbench]" = weakref.WeakSet()


@st.cache_resource
def _session_watch() -> threading.Thread:
    """One thread per server: four times a second, stop the jobs of browser sessions that went away (a closed tab
    stops its live estimate and precomputations within a second, instead of keeping two cores busy)."""
    def loop():
        from streamlit.runtime import Runtime

        while True:
            time.sleep(0.25)
            if not Runtime.exists():
                continue
            rt = Runtime.instance()
            for wb in list(_WORKBENCHES):
                for owner in wb.jobs.owners():
                    if isinstance(owner, str) and owner != "local" and not rt.is_active_session(owner):
                        wb.jobs.cancel(owner)
    t = threading.Thread(target=loop, name="foldviz-session-watch", daemon=True)
    t.start()
    return t


def kind(wb: Workbench | None = None) -> str:
    """The session model's kind: "cnn" (image classifier) or "lm" (language model)."""
    try:
        return (wb or get_workbench()).kind.key
    except Exception:  # noqa: BLE001 - a model that does not load: the page reports it
        return "cnn"


def workbench_or_stop() -> Workbench:
    """Current workbench; on failure show the error, fall back to the default demo, or stop the page."""
    try:
        wb = get_workbench()
    except LOAD_ERRORS as exc:
        st.error(f"{exc}")
        if model_source().spec != DEFAULT_MODEL:
            st.info(f"Switching back to {DEFAULT_MODEL}.")
            wb = get_workbench(ModelSource(DEFAULT_MODEL))
            set_model(ModelSource(DEFAULT_MODEL), wb.default_data())
        else:
            st.stop()
    ensure_plan(wb)
    return wb


def page(title: str, caption: str) -> tuple[Workbench, object]:
    """Start a page that works on the session's model: title, caption, then (workbench, plan)."""
    st.title(title)
    st.caption(caption)
    wb = workbench_or_stop()
    return wb, current_plan(wb)


def group_detail_live(wb: Workbench, group_id: str, ratio: float, plan, embed_method: str) -> dict:
    """The Layer explorer's data for one group at ``ratio``: every part is memoised inside the Workbench (shared
    by all sessions); the background precomputations pause meanwhile."""
    with wb.foreground():
        return wb.group_detail(group_id, plan, ratio, embed_method=embed_method)


def precompute_stops(wb: Workbench, group_id: str, plan) -> dict:
    """Compute the group's clusters for every slider stop in the background (the latest group wins), then every
    other group at the plan's ratio; returns how many stops are ready."""
    status = wb.path_status(group_id, plan)
    if len(status["ready"]) < status["total"]:
        wb.cluster_path(group_id, plan, background=True, owner=session_id())
    else:
        wb.warm_groups(plan, owner=session_id())
    return status


@st.cache_resource
def _umap_warm() -> dict:
    return {"started": False, "lock": threading.Lock()}


def warm_up_umap() -> None:
    """Compile UMAP once per server process, in a background thread, so the first real UMAP is quick."""
    state = _umap_warm()
    with state["lock"]:
        if state["started"]:
            return
        state["started"] = True
    from foldviz.embedding import warm_up

    threading.Thread(target=warm_up, name="foldviz-umap-warmup", daemon=True).start()


def session_id() -> str:
    """This browser session's id (jobs are owned by it, so a closed session can stop them)."""
    try:
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        ctx = get_script_run_ctx()
        return ctx.session_id if ctx else "local"
    except Exception:  # noqa: BLE001
        return "local"


#: models up to this many parameters get the plan page's estimate on every change (the demos fold in well under a
#: second with the cached proxy); larger ones estimate on request
LIVE_AUTO_PARAMS = 5_000_000


def live_estimate_auto(wb: Workbench) -> bool:
    return wb.summary()["params"] <= LIVE_AUTO_PARAMS


# ------------------------------------------------------------------------------------------------
# model / plan mutations
# ------------------------------------------------------------------------------------------------

def set_model(src: ModelSource, data: DataSource | None = None) -> None:
    """Switch model (after it loaded successfully); the plan and results belong to the old model."""
    st.session_state["model_source"] = src.to_dict()
    st.session_state.pop("url_pending", None)
    if data is not None:
        st.session_state["data_source"] = data.to_dict()
    st.session_state["plan"] = None
    st.session_state["outcome"] = None
    st.session_state["sweep"] = None
    st.session_state["compare"] = None
    reset_plan_widgets()


def ensure_plan(wb: Workbench) -> None:
    p = st.session_state.get("plan")
    if p is None or p.get("model") != wb.spec:
        st.session_state["plan"] = wb.default_plan(0.3).to_dict()


def current_plan(wb: Workbench):
    ensure_plan(wb)
    try:
        return wb.plan_from(st.session_state["plan"])
    except LOAD_ERRORS as exc:
        st.error(f"The current plan is not valid for this model ({exc}); starting from a default plan.")
        st.session_state["plan"] = wb.default_plan(0.3).to_dict()
        return wb.plan_from(st.session_state["plan"])


def update_plan(**changes) -> None:
    """Change fields of the session plan (plain dict) — validated by the next current_plan()."""
    p = dict(st.session_state["plan"])
    p.update(changes)
    st.session_state["plan"] = p


def replace_plan(plan_dict: dict) -> None:
    """Replace the whole plan (import, suggestion, table edit, ...). The plan page's widgets are re-synced
    from it at the start of its next run (see sync_plan_widgets)."""
    st.session_state["plan"] = dict(plan_dict)
    reset_plan_widgets()


def reset_plan_widgets() -> None:
    st.session_state["plan_widgets_stale"] = True


def _plan_widget_value(key: str, plan: dict):
    """The value the plan-page widget ``key`` must show for ``plan`` (KeyError: no such value)."""
    name = key[len(PLAN_WIDGET_PREFIX):]
    if name in PLAN_WIDGETS:
        field, sub = PLAN_WIDGETS[name]
        return plan[field] if sub is None else plan.get(field, {})[sub]
    if name.startswith("ratio_"):
        gid = name[len("ratio_"):]
        return float(plan.get("ratios", {}).get(gid, plan["default_ratio"]))
    if name.startswith("skip_"):
        return name[len("skip_"):] in plan.get("skip", [])
    raise KeyError(key)


def sync_plan_widgets() -> None:
    """Call at the top of the plan page, before its widgets: after the plan was replaced, push the new
    values into the widgets' state through the Session State API (so the browser shows them too) and drop
    widget state that has no counterpart in the plan."""
    ss = st.session_state
    if not ss.pop("plan_widgets_stale", False) or not ss.get("plan"):
        return
    for k in list(ss.keys()):
        if isinstance(k, str) and k.startswith(PLAN_WIDGET_PREFIX):
            try:
                ss[k] = _plan_widget_value(k, ss["plan"])
            except KeyError:
                del ss[k]


def wv(key: str, **default) -> dict:
    """Widget default kwargs (``value=``/``index=``) only when the widget has no state yet — avoids
    Streamlit's 'default value but also set via Session State' warning after sync_plan_widgets."""
    return {} if key in st.session_state else default


def plan_json(plan_dict: dict) -> str:
    return json.dumps(plan_dict, sort_keys=True)


# ------------------------------------------------------------------------------------------------
# presentation helpers
# ------------------------------------------------------------------------------------------------

def chart(fig: go.Figure, key: str | None = None) -> None:
    st.plotly_chart(fig, key=key, config={"displaylogo": False})


def progress_reporter(status, total_label: str = "") -> Callable[[str, int, int], None]:
    """An engine progress callback that drives an st.progress bar inside ``status``."""
    bar = status.progress(0.0, text="starting…")
    names = {"cluster": "clustering groups", "merge": "merging channels", "repair": "resetting BatchNorm statistics",
             "dir": "Deep-Inversion: synthesising inputs", "evaluate": "evaluating", "compare": "repair methods done",
             "sweep": "sweep points done", "sensitivity": "layers done"}

    def cb(stage: str, done: int, total: int) -> None:
        frac = min(1.0, max(0.0, done / total)) if total else 0.0
        bar.progress(frac, text=f"{names.get(stage, stage)}: {done}/{total}{total_label}")
    return cb


def report_failure(exc: Exception, what: str) -> None:
    """A clear in-page error that keeps model, plan and results intact."""
    if isinstance(exc, (WorkbenchError, ValueError)):
        st.error(f"{what} failed: {exc}")
    else:
        st.error(f"{what} failed unexpectedly: {type(exc).__name__}: {exc}. Your model, plan and results are kept.")
        with st.expander("Technical details"):
            st.code("".join(traceback.format_exception(exc)), language="text")


def fmt_pct(x, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * float(x):.{digits}f}%"


def sidebar(wb: Workbench | None) -> None:
    ss = st.session_state
    with st.sidebar:
        st.toggle("Teaching mode", key="teaching", value=ss.get("teaching", False),
                  help="Hide advanced settings (clustering, Deep-Inversion hyper-parameters).")
        st.markdown("**Model**")
        st.caption(model_source().label)
        st.markdown("**Data**")
        st.caption(wb.data_label(data_source()) if wb is not None else data_source().label)
        p = ss.get("plan")
        if p and wb is not None:
            st.markdown("**Plan**")
            try:
                main = method_label(plan_method(wb.kind.key, p["repair"]))
            except ValueError:
                main = str(p.get("repair"))
            st.caption(f"{main} · ratio "
                       f"{100 * p['default_ratio']:.0f}% · "
                       f"{len(p.get('ratios', {}))} override(s) · {len(p.get('skip', []))} skipped · seed {p['seed']}")
        out = ss.get("outcome")
        if out is not None:
            r = out.report
            st.markdown("**Last fold**")
            st.caption(f"{r['label']}: params {fmt_count(r['params_before'])} → {fmt_count(r['params_after'])}"
                       + metric_change(r))


def metric_change(report: dict) -> str:
    """" · accuracy 98.7% → 96.4%" (or perplexity) for a report, "" without evaluation data."""
    if report.get("accuracy_after") is not None:
        return f" · accuracy {fmt_pct(report['accuracy_before'])} → {fmt_pct(report['accuracy_after'])}"
    if report.get("perplexity_after") is not None:
        return f" · perplexity {report['perplexity_before']:.1f} → {report['perplexity_after']:.1f}"
    return ""


def teaching() -> bool:
    return bool(st.session_state.get("teaching", False))
