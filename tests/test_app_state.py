"""The app's state in the URL (foldviz.share): a reload or a shared link restores model, data and plan."""
from __future__ import annotations

import base64
import json
import zlib

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from foldviz.share import MAX_STATE_CHARS, StateError, decode_state, encode_state  # noqa: E402
from test_app import APP, TIMEOUT, assert_clean, goto, new_app  # noqa: E402

MODEL = {"spec": "demo:digits-resnet", "weights": None, "weights_name": None, "num_classes": None,
         "cifar_stem": False}


def plan(at) -> dict:
    return at.session_state["plan"]


def url_state(at) -> str:
    return at.query_params["s"][0] if isinstance(at.query_params["s"], list) else at.query_params["s"]


# ------------------------------------------------------------------------------------------------ library

def test_state_round_trip_and_upload_names_only_the_file():
    p = {"foldviz_plan": 1, "default_ratio": 0.4, "ratios": {"conv1": 0.7}, "skip": ["fc"], "repair": "ar"}
    s = encode_state(MODEL, {"spec": "digits", "limit": 500, "repair_samples": 256}, p)
    assert set(s) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")  # URL-safe, no padding
    d = decode_state(s)
    assert d["plan"] == p and d["data"]["limit"] == 500 and d["model"]["spec"] == "demo:digits-resnet"
    up = decode_state(encode_state(dict(MODEL, weights="/tmp/ab12.safetensors", weights_name="mine.safetensors"),
                                   None, None))
    assert up["model"]["upload"] == "mine.safetensors" and "/tmp" not in json.dumps(up)


def _pack(obj) -> str:
    return base64.urlsafe_b64encode(zlib.compress(json.dumps(obj).encode())).decode().rstrip("=")


@pytest.mark.parametrize("text, why", [
    ("", "empty"), ("not base64 !!", "not a foldviz"), ("A" * (MAX_STATE_CHARS + 1), "limit"),
    (_pack([1, 2]), "version"), (_pack({"v": 1, "model": {"spec": "x", "evil": 1}}), "unknown"),
    (_pack({"v": 1, "model": {"spec": "demo:x", "num_classes": True}}), "wrong type"),
    (_pack({"v": 1, "model": {"spec": "demo:x", "num_classes": -3}}), "out of range"),
    (_pack({"v": 1, "model": {"spec": "  "}}), "no model"),
    (_pack({"v": 1, "model": {"spec": "demo:x"}, "plan": [1]}), "plan"),
    (base64.urlsafe_b64encode(zlib.compress(b" " * 10_000_000)).decode(), "unpacks"),  # a zlib bomb
])
def test_bad_state_strings_give_one_line_errors(text, why):
    with pytest.raises(StateError, match=why) as e:
        decode_state(text)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ app

def test_url_carries_the_plan_and_a_new_session_restores_it():
    at = new_app()
    goto(at, "fold_plan")
    at.slider(key="planw_default_ratio").set_value(0.45).run()
    at.selectbox(key="fp_group").set_value("layer1.0.conv1").run()
    at.slider(key="planw_ratio_layer1.0.conv1").set_value(0.6).run()
    s = url_state(at)
    d = decode_state(s)
    assert d["plan"]["default_ratio"] == 0.45 and d["plan"]["ratios"] == {"layer1.0.conv1": 0.6}

    # a reload = a new session with the same URL
    at2 = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at2.query_params["s"] = s
    at2.run()
    assert_clean(at2)
    assert plan(at2)["default_ratio"] == 0.45 and plan(at2)["ratios"] == {"layer1.0.conv1": 0.6}
    goto(at2, "fold_plan")
    assert at2.slider(key="planw_default_ratio").value == 0.45


def test_url_restores_another_model():
    p = {"foldviz_plan": 1, "default_ratio": 0.2, "repair": "none", "model": "demo:digits-mlp"}
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["s"] = encode_state(dict(MODEL, spec="demo:digits-mlp"), None, p)
    at.run()
    assert_clean(at)
    assert at.session_state["model_source"]["spec"] == "demo:digits-mlp"
    assert plan(at)["default_ratio"] == 0.2 and plan(at)["repair"] == "none"


@pytest.mark.parametrize("s, says", [
    ("%%%garbage", "ignored"),
    (encode_state(dict(MODEL, spec="demo:no-such-model"), None, None), "could not be loaded"),
])
def test_bad_links_warn_and_start_from_the_defaults(s, says):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["s"] = s
    at.run()
    assert not at.exception and not at.error
    assert any(says in w.value for w in at.warning), [w.value for w in at.warning]
    assert at.session_state["model_source"]["spec"] == "demo:digits-resnet"
    assert decode_state(url_state(at))["model"]["spec"] == "demo:digits-resnet"  # the URL is repaired


def test_an_invalid_plan_in_the_link_falls_back_with_a_message():
    bad = {"foldviz_plan": 1, "default_ratio": 0.3, "ratios": {"no.such.layer": 0.5}}
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["s"] = encode_state(MODEL, None, bad)
    at.run()
    assert not at.exception
    assert any("not valid for this model" in e.value for e in at.error)
    assert "no.such.layer" not in json.dumps(plan(at))


def test_a_link_made_with_an_upload_is_kept_until_a_model_is_loaded():
    s = encode_state(dict(MODEL, weights="/x/y.pt", weights_name="trained.pt"), None, {"default_ratio": 0.3})
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["s"] = s
    at.run()
    assert not at.exception
    assert any("trained.pt" in i.value for i in at.info)
    assert url_state(at) == s  # not overwritten: the link still carries its plan


# ------------------------------------------------------------------------------------------------ linked views

def _figure(at, name):
    from test_app import chart
    return chart(at, name)


def test_explorer_find_channel_highlights_it_in_every_view():
    at = new_app()
    goto(at, "layer_explorer")
    at.selectbox(key="le_group").set_value("layer2.0.conv2").run()
    at.number_input(key="le_find_layer2.0.conv2").set_value(5).run()
    assert_clean(at)
    heat = _figure(at, "similarity_heatmap")
    assert heat["layout"]["meta"]["highlight"] == 5
    assert sum(1 for sh in heat["layout"]["shapes"] if sh["type"] == "line") == 2
    scatter = _figure(at, "embedding_scatter")
    assert [t for t in scatter["data"] if t["name"] == "selected"]
    grid = _figure(at, "filter_grid")
    assert grid["layout"]["meta"]["highlight"]["channel"] == 5
    labels = at.session_state["le_sel_layer2.0.conv2"] == 5
    assert labels
    assert any("Channel 5" in i.value and "cluster" in i.value for i in at.info)
    nb = at.dataframe(key="le_nbtable_layer2.0.conv2").value
    assert len(nb) == 8 and 5 not in set(nb["channel"]) and list(nb["cosine"]) == sorted(nb["cosine"], reverse=True)
    # clear
    at.button(key="le_clear_layer2.0.conv2").click().run()
    assert _figure(at, "similarity_heatmap")["layout"]["meta"]["highlight"] is None


def test_explorer_lasso_panel_shows_cluster_statistics():
    at = new_app()
    goto(at, "layer_explorer")
    at.selectbox(key="le_group").set_value("layer2.0.conv2").run()
    at.session_state["le_lasso_layer2.0.conv2"] = [0, 1, 2, 3, 4, 5]   # what a lasso in the embedding sets
    at.run()
    assert_clean(at)
    md = " ".join(m.value for m in at.markdown)
    assert "Selection: 6 channels in" in md
    tab = next(d.value for d in at.dataframe if "share of the cluster" in d.value.columns)
    assert tab["selected"].sum() == 6


def test_explorer_precomputes_every_slider_stop():
    at = new_app()
    goto(at, "layer_explorer")
    at.selectbox(key="le_group").set_value("layer3.0.conv1").run()
    import time

    from pages import _ui  # noqa: F401  (the workbench is cached process-wide)
    from foldviz.session import ModelSource, Workbench  # noqa: F401
    deadline = time.time() + 120
    while time.time() < deadline:
        at.run()
        cap = " ".join(c.value for c in at.caption)
        if "Every slider stop is precomputed" in cap:
            break
        time.sleep(1)
    assert "Every slider stop is precomputed" in cap
    at.slider(key="le_ratio_layer3.0.conv1").set_value(0.8).run()
    assert_clean(at)
    m = [x for x in at.metric if x.label == "Channels → clusters"][0]
    assert m.value == "128 → 26"   # 128 channels at 0.8 -> round(25.6) = 26


# ------------------------------------------------------------------------------------------------ live accuracy

def _estimates(at):
    return [m for m in at.metric if m.label == "Accuracy (est.)"]


def test_plan_page_shows_a_live_accuracy_estimate_that_follows_the_plan():
    import time

    at = new_app()
    goto(at, "fold_plan")

    def settle():
        deadline = time.time() + 120
        while time.time() < deadline:
            at.run()
            ms = _estimates(at)
            if ms and all(m.value != "…" for m in ms):
                return ms
            time.sleep(0.5)
        raise AssertionError("the estimate never finished")

    ms = settle()
    assert len(ms) == 2 and sum("on 256 test samples" in c.value for c in at.caption) == 2
    first = float(ms[0].value.rstrip("%"))
    assert 0 < first <= 100 and "vs. unfolded" in ms[0].delta
    at.slider(key="planw_default_ratio").set_value(0.9).run()
    ms = settle()
    assert float(ms[0].value.rstrip("%")) < first      # folding 90 % of every group costs accuracy
    # the number is the library's: the same fold evaluated on the same 256 samples
    from foldviz.session import DataSource, Workbench

    wb = Workbench.load("demo:digits-resnet")
    p = wb.plan_from(at.session_state["plan"])
    est = wb.quick_metric(p, DataSource("digits"))
    assert est["metric"] == "accuracy" and ms[0].value == f"{100 * est['value']:.1f}%"


def test_learn_walks_through_any_layer_default_the_most_redundant():
    from foldviz.session import Workbench

    at = new_app()
    goto(at, "learn_folding")
    wb = Workbench.load("demo:digits-resnet")
    rows = [r for r in wb.overview_rows(0.3) if r["foldable"]]
    most = max(rows, key=lambda r: r["score"])["id"]
    sel = at.selectbox(key="learn_group_demo:digits-resnet")
    assert sel.value == most and most != wb.foldable_ids()[0]
    at.button(key="learn_next").click().run()          # step 2: similarity in the original order
    heat = [c for c in __import__("test_app").charts(at) if c["layout"]["meta"].get("figure") == "similarity_heatmap"][0]
    assert heat["layout"]["meta"]["channels"] == wb.group(most).channels
    assert "original order" in heat["layout"]["xaxis"]["title"]["text"]   # the axes agree with the title
    sel.set_value("layer1.0.conv1").run()
    assert_clean(at)
    heat = [c for c in __import__("test_app").charts(at) if c["layout"]["meta"].get("figure") == "similarity_heatmap"][0]
    assert heat["layout"]["meta"]["channels"] == 32


# ------------------------------------------------------------------------------------------------ upload errors

def _torch_bytes(obj) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("name, data, says", [
    ("garbage.pt", b"not a checkpoint at all", "is not a PyTorch checkpoint"),
    ("empty.pt", b"", "is empty"),
    ("cut.pt", None, "truncated"),
    ("bad.safetensors", b"\xff\xff", "header is damaged"),
    ("keys.pt", "wrongkeys", "does not match the model architecture"),
])
def test_checkpoint_errors_name_the_users_file_in_plain_words(name, data, says, tmp_path):
    import torch

    from foldviz.session import ModelSource, Workbench, WorkbenchError, save_upload

    if data is None:
        data = _torch_bytes({"w": torch.zeros(64)})[:200]
    elif data == "wrongkeys":
        data = _torch_bytes({"foo": torch.zeros(3)})
    path = save_upload(data, name, tmp_path)
    with pytest.raises(WorkbenchError) as e:
        Workbench.load(ModelSource("demo:digits-resnet", weights=path, weights_name=name))
    msg = str(e.value)
    assert says in msg and name in msg and "\n" not in msg
    stem = path.rsplit("/", 1)[-1].split(".")[0]
    assert stem not in msg and str(tmp_path) not in msg   # never foldviz's hashed temp copy
    for raw in ("Unsupported operand", "EOFError", "pop from", "deserializing", "PytorchStreamReader"):
        assert raw not in msg


def test_results_page_shows_feature_maps_before_and_after():
    from test_app import chart

    at = new_app()
    goto(at, "fold_results")
    at.button(key="fr_run").click().run()
    assert_clean(at)
    maps = chart(at, "feature_map_grid")
    res = at.session_state["outcome"].result
    gid = at.selectbox(key="fr_act_group").value
    assert gid in res.labels and maps["layout"]["meta"]["clusters"] == len(set(res.labels[gid]))
    assert chart(at, "input_image")
    at.slider(key="fr_act_image").set_value(3).run()
    assert_clean(at)
    assert "#3" in chart(at, "input_image")["layout"]["title"]["text"]


def test_a_link_never_opens_local_folders():
    s = encode_state(dict(MODEL, spec="hf:/etc"), None, None)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["s"] = s
    at.run()
    assert not at.exception and at.session_state["model_source"]["spec"] == "demo:digits-resnet"
    assert any("local model" in i.value for i in at.info)
    s2 = encode_state(MODEL, {"spec": "imagefolder:/home", "limit": None, "repair_samples": 64}, None)
    at2 = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at2.query_params["s"] = s2
    at2.run()
    assert not at2.exception and at2.session_state["data_source"]["spec"] == "digits"
    assert any("local folder" in i.value for i in at2.info)
