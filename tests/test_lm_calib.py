"""Calibration statistics and the Wanda-sp / FLAP baselines (foldviz.lm.calib) on a constructed two-layer decoder,
the calibration/evaluation overlap refusal and the WikiText-2 text spec."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from foldviz.lm.calib import (  # noqa: E402
    CalibrationOverlapError,
    UnitStats,
    add_output_bias,
    calibration_windows,
    check_no_overlap,
    flap_bias,
    flap_compensate,
    flap_scores,
    unit_input_stats,
    unit_maps_from_scores,
    wanda_sp_scores,
)
from foldviz.lm.corpus import TextError, read_wikitext2, split_text, wikitext2_file  # noqa: E402

V, H, L, NQ, NKV, HD, INTER, CTX = 50, 16, 2, 4, 2, 4, 24, 12


def two_layer(seed=0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=L,
                      num_attention_heads=NQ, num_key_value_heads=NKV, head_dim=HD, max_position_embeddings=CTX,
                      tie_word_embeddings=False, **kw)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.4)
            elif p.dim() == 1 and kw:
                p.normal_(0, 0.3)     # biases (and norms) matter too
    return m


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, V, (6, CTX), generator=torch.Generator().manual_seed(3))


def captured_inputs(model, windows):
    """Every token's input of down_proj and o_proj per layer, as float64 numpy (tokens, channels)."""
    got = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for key, mod in (("mlp", layer.mlp.down_proj), ("heads", layer.self_attn.o_proj)):
            hooks.append(mod.register_forward_pre_hook(
                lambda _m, a, k=(i, key): got.setdefault(k, []).append(a[0].detach().double().reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).numpy() for k, v in got.items()}


def hand_scores(model, x_by_layer):
    """Wanda-sp and FLAP per unit from their definitions, with explicit loops."""
    wanda, flap = {}, {}
    for i, layer in enumerate(model.model.layers):
        for key, lin, size, gid in (("mlp", layer.mlp.down_proj, 1, f"model.layers.{i}.mlp"),
                                    ("heads", layer.self_attn.o_proj, HD, f"model.layers.{i}.self_attn")):
            w = lin.weight.detach().double().numpy()
            x = x_by_layer[(i, key)]
            t = x.shape[0]
            units = w.shape[1] // size
            ws, fs = np.zeros(units), np.zeros(units)
            for u in range(units):
                for c in range(u * size, (u + 1) * size):
                    norm = np.sqrt(sum(x[n, c] ** 2 for n in range(t)))
                    mean = sum(x[n, c] for n in range(t)) / t
                    var = sum((x[n, c] - mean) ** 2 for n in range(t)) / (t - 1)
                    for r in range(w.shape[0]):
                        ws[u] += abs(w[r, c]) * norm
                        fs[u] += w[r, c] ** 2 * var
            wanda[gid], flap[gid] = ws, fs
    return wanda, flap


def test_scores_match_hand_computation(windows):
    m = two_layer()
    stats = unit_input_stats(m, windows, max_tokens=10_000, batch_size=4)
    wanda, flap = hand_scores(m, captured_inputs(m, windows))
    got_w, got_f = wanda_sp_scores(m, stats), flap_scores(m, stats)
    assert set(got_w) == set(wanda) == {f"model.layers.{i}.{k}" for i in range(L) for k in ("mlp", "self_attn")}
    for gid in wanda:
        assert got_w[gid].shape == wanda[gid].shape == ((INTER,) if gid.endswith("mlp") else (NQ,))
        np.testing.assert_allclose(got_w[gid], wanda[gid], rtol=1e-9, atol=1e-5)
        np.testing.assert_allclose(got_f[gid], flap[gid], rtol=1e-9, atol=1e-5)
    std = flap_scores(m, stats, standardize=True)
    for gid, s in std.items():
        assert abs(s.mean()) < 1e-9 and s.std() == pytest.approx(1.0)
        assert (np.argsort(s) == np.argsort(got_f[gid])).all()


def test_stats_bounded_and_batch_independent(windows):
    m = two_layer()
    s = unit_input_stats(m, windows, max_tokens=3 * CTX + 5, batch_size=2)   # 3 whole windows, no more
    assert s[0]["mlp"].count == s[1]["heads"].count == 3 * CTX
    assert s[0]["mlp"].mean.shape == (INTER,) and s[0]["heads"].m2.shape == (NQ * HD,)
    assert s[0]["heads"].unit_size == HD and s[0]["heads"].units == NQ
    ref = captured_inputs(m, windows[:3])
    for (i, key), x in ref.items():
        st = s[i][key]
        np.testing.assert_allclose(st.mean, x.mean(0), atol=1e-12)
        np.testing.assert_allclose(st.var, x.var(0, ddof=1), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st.l2, np.linalg.norm(x, axis=0), rtol=1e-12)
        np.testing.assert_allclose(st.max_abs, np.abs(x).max(0))
    one = unit_input_stats(m, windows, max_tokens=3 * CTX, batch_size=1)
    np.testing.assert_allclose(one[1]["mlp"].var, s[1]["mlp"].var, rtol=1e-10)
    with pytest.raises(ValueError, match="below one window"):
        unit_input_stats(m, windows, max_tokens=CTX - 1)
    with pytest.raises(ValueError, match="exceed the model's context length"):
        unit_input_stats(m, torch.zeros(1, CTX + 1, dtype=torch.long), max_tokens=10_000)


def test_stats_bf16():
    m = two_layer()
    w = torch.randint(0, V, (4, CTX), generator=torch.Generator().manual_seed(0))
    ref = unit_input_stats(m, w, max_tokens=10_000)
    got = unit_input_stats(m.to(torch.bfloat16), w, max_tokens=10_000)
    for i in range(L):
        for key in ("mlp", "heads"):
            assert got[i][key].mean.dtype == np.float64 and np.isfinite(got[i][key].m2).all()
            np.testing.assert_allclose(got[i][key].l2, ref[i][key].l2, rtol=0.1)


def test_unit_maps_keep_top_per_kv_group():
    m = two_layer()
    scores = {"model.layers.0.mlp": np.arange(INTER, dtype=float)[::-1],        # unit 0 best
              "model.layers.0.self_attn": np.array([1.0, 3.0, 2.0, 0.5]),      # KV groups {0,1}, {2,3}
              "model.layers.1.self_attn": np.array([5.0, 5.0, 1.0, 1.0])}      # ties keep the lower index
    maps = unit_maps_from_scores(m, scores, 0.5)
    assert set(maps) == set(scores)
    assert (maps["model.layers.0.mlp"] == np.r_[np.arange(12), np.full(12, -1)]).all()
    assert maps["model.layers.0.self_attn"].tolist() == [-1, 0, 1, -1]
    assert maps["model.layers.1.self_attn"].tolist() == [0, -1, 1, -1]
    assert (unit_maps_from_scores(m, scores, 0.2)["model.layers.0.mlp"] >= 0).sum() == round(INTER * 0.8)
    with pytest.raises(ValueError, match="scores for"):
        unit_maps_from_scores(m, {"model.layers.0.mlp": np.ones(3)}, 0.5)


def _zero_removed(model, maps):
    """Pruning as a function: the removed units' output-projection columns set to zero."""
    with torch.no_grad():
        for gid, lab in maps.items():
            i, kind = int(gid.split(".")[2]), gid.rsplit(".", 1)[1]
            lin = model.model.layers[i].mlp.down_proj if kind == "mlp" else model.model.layers[i].self_attn.o_proj
            size = 1 if kind == "mlp" else HD
            cols = np.flatnonzero(np.repeat(np.asarray(lab) < 0, size))
            lin.weight[:, torch.as_tensor(cols)] = 0
    return model


def test_flap_bias_exact_for_constant_inputs(windows, tmp_path):
    """A unit whose input is constant over every token is replaced exactly by its contribution as a bias."""
    m = two_layer(mlp_bias=True, attention_bias=True)
    with torch.no_grad():
        mlp = m.model.layers[0].mlp
        mlp.gate_proj.weight[5] = 0                 # neuron 5: silu(b_g) * b_u whatever the input
        mlp.up_proj.weight[5] = 0
        attn = m.model.layers[1].self_attn
        attn.v_proj.weight[HD:2 * HD] = 0           # KV head 1 (query heads 2, 3): output = its v bias
    stats = unit_input_stats(m, windows, max_tokens=10_000)
    assert stats[0]["mlp"].var[5] < 1e-12 and stats[1]["heads"].var[2 * HD:4 * HD].max() < 1e-12
    maps = {"model.layers.0.mlp": np.where(np.arange(INTER) == 5, -1, np.arange(INTER) - (np.arange(INTER) > 5)),
            "model.layers.1.self_attn": np.array([0, 1, -1, 2])}
    bias = flap_bias(m, stats, maps)
    with torch.no_grad():
        const = torch.nn.functional.silu(mlp.gate_proj.bias[5]) * mlp.up_proj.bias[5]
        expect = (mlp.down_proj.weight[:, 5] * const).double().numpy()
    np.testing.assert_allclose(bias["model.layers.0.mlp"], expect, atol=1e-6)
    pruned = flap_compensate(m, _zero_removed(_clone(m), maps), stats, maps)
    with torch.no_grad():
        ref = m(input_ids=windows, use_cache=False).logits
        got = pruned(input_ids=windows, use_cache=False).logits
        plain = _zero_removed(_clone(m), maps)(input_ids=windows, use_cache=False).logits
    assert (plain - ref).abs().max() > 1e-3            # the removal alone changes the output
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _clone(m):
    return copy.deepcopy(m)


def test_bias_surgery_on_bias_free_llama_reloads(windows, tmp_path):
    m = two_layer()
    assert m.model.layers[0].mlp.down_proj.bias is None and not m.config.mlp_bias
    stats = unit_input_stats(m, windows, max_tokens=10_000)
    maps = unit_maps_from_scores(m, flap_scores(m, stats), 0.25)
    pruned = flap_compensate(m, _zero_removed(_clone(m), maps), stats, maps)
    assert pruned.config.mlp_bias and pruned.config.attention_bias
    for layer in pruned.model.layers:
        assert all(getattr(layer.mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj"))
        assert float(layer.mlp.gate_proj.bias.detach().abs().max()) == 0.0
        assert all(getattr(layer.self_attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert float(pruned.model.layers[1].mlp.down_proj.bias.detach().abs().max()) > 0
    pruned.save_pretrained(tmp_path / "m", safe_serialization=True)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=windows).logits, pruned(input_ids=windows).logits,
                                   atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="bias of shape"):
        add_output_bias(_clone(m), {"model.layers.0.mlp": np.zeros(3)})


# ----------------------------------------------------------------------------------------------------------------
def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_overlap_refused_in_one_line(tmp_path):
    for a, b in (("shakespeare:test", "shakespeare:test"), ("test", "shakespeare:test"), ("demo", "test")):
        with pytest.raises(CalibrationOverlapError) as e:
            check_no_overlap(a, b)
        assert "is the evaluation text" in _one_line(e)
    f = tmp_path / "eval.txt"
    f.write_text(split_text("shakespeare:test")[0][:20000])
    link = tmp_path / "same.txt"
    link.symlink_to(f)
    with pytest.raises(CalibrationOverlapError) as e:
        check_no_overlap(f"text:{link}", f"text:{f}")
    _one_line(e)
    # a copied passage inside an otherwise different file
    passage = " ".join(split_text("shakespeare:test")[1].split()[5000:5040])
    g = tmp_path / "calib.txt"
    g.write_text(split_text("shakespeare:train")[0][:30000] + "\n" + passage + "\n")
    with pytest.raises(CalibrationOverlapError) as e:
        check_no_overlap(f"text:{g}", "shakespeare:test")
    assert "shared runs of 32 words" in _one_line(e)
    check_no_overlap("shakespeare:train", "shakespeare:test")     # the bundled split is disjoint
    h = tmp_path / "short.txt"
    h.write_text(" ".join(passage.split()[:31]))                   # 31 words: below the rule
    check_no_overlap(f"text:{h}", "shakespeare:test")
    with pytest.raises(TextError):
        check_no_overlap("text:/nonexistent/x.txt", "shakespeare:test")


def test_calibration_windows():
    class Tok:
        def encode(self, text):
            return [ord(c) % 97 for c in text]

    w = calibration_windows(Tok(), "shakespeare:train", 5, 32, seed=1)
    assert w.shape == (5, 32) and w.dtype == torch.long
    assert torch.equal(w, calibration_windows(Tok(), "shakespeare:train", 5, 32, seed=1))
    assert not torch.equal(w, calibration_windows(Tok(), "shakespeare:train", 5, 32, seed=2))
    with pytest.raises(CalibrationOverlapError):
        calibration_windows(Tok(), "shakespeare:test", 5, 32, eval_spec="test")
    with pytest.raises(ValueError, match="calib-samples"):
        calibration_windows(Tok(), "shakespeare:train", 0, 32)


RAW = " \n = Robert = \n \n Robert is an actor . \n \n = = Career = = \n \n He acted .\n"


def test_wikitext2_raw_layouts(tmp_path):
    d = tmp_path / "wt"
    (d / "wikitext-2-raw").mkdir(parents=True)
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text(RAW)
    (d / "wikitext-2-raw" / "wiki.train.raw").write_text(" \n = Other = \n")
    rows = split_text(f"wikitext2:{d}")
    assert rows == ["", " = Robert = \n", "", " Robert is an actor . \n", "", " = = Career = = \n", "",
                    " He acted .\n"]
    assert "\n\n".join(rows).startswith("\n\n = Robert = \n\n\n\n\n Robert")
    assert split_text(f"wikitext2-train:{d}") == ["", " = Other = \n"]
    assert wikitext2_file(d / "wikitext-2-raw") == d / "wikitext-2-raw" / "wiki.test.raw"
    with pytest.raises(TextError) as e:
        split_text(f"wikitext2-valid:{d}")
    assert "wiki.valid.raw" in _one_line(e) and str(d) in str(e.value)
    with pytest.raises(TextError) as e:
        split_text(f"wikitext2:{tmp_path / 'missing'}")
    assert "not found" in _one_line(e)
    check_no_overlap(f"wikitext2-train:{d}", f"wikitext2:{d}")
    with pytest.raises(CalibrationOverlapError):
        check_no_overlap(f"text:{d / 'wikitext-2-raw' / 'wiki.test.raw'}", f"wikitext2:{d}")


def test_wikitext2_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    d = tmp_path / "wikitext-2-raw-v1"
    d.mkdir()
    rows = ["", " = Robert = \n", "", " Robert is an actor . \n"]
    pq.write_table(pa.table({"text": rows}), d / "test-00000-of-00001.parquet")
    assert read_wikitext2(tmp_path, "test") == rows
    pq.write_table(pa.table({"other": [1, 2]}), d / "train-00000-of-00001.parquet")
    with pytest.raises(TextError) as e:
        read_wikitext2(tmp_path, "train")
    assert "'text' column" in _one_line(e)


def test_unit_stats_update_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 5))
    s = UnitStats.empty(5)
    for part in np.array_split(x, 7):
        s.update(torch.as_tensor(part))
    np.testing.assert_allclose(s.var, x.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12)
    assert s.count == 1000


@pytest.mark.parametrize("arch", ["Mistral", "Qwen2", "Qwen3", "Gemma"])
def test_other_layouts(arch, windows, tmp_path):
    import transformers

    cfg_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=L, num_attention_heads=NQ,
                  num_key_value_heads=NKV, head_dim=HD, max_position_embeddings=CTX, tie_word_embeddings=False)
    m = model_cls(cfg).eval()
    stats = unit_input_stats(m, windows, max_tokens=2 * CTX)
    assert stats[1]["heads"].count == 2 * CTX and stats[1]["heads"].units == NQ
    wanda, flap = hand_scores(m, captured_inputs(m, windows[:2]))
    got_w, got_f = wanda_sp_scores(m, stats), flap_scores(m, stats)
    for gid in wanda:
        np.testing.assert_allclose(got_w[gid], wanda[gid], rtol=1e-9, atol=1e-5)
        np.testing.assert_allclose(got_f[gid], flap[gid], rtol=1e-9, atol=1e-5)
    maps = unit_maps_from_scores(m, got_f, 0.5)
    # which output projections the architecture can give a bias that survives save/load (transformers' configs)
    holds = {"Mistral": (), "Qwen2": (), "Qwen3": ("self_attn",), "Gemma": ("self_attn",)}[arch]
    for kind in ("mlp", "self_attn"):
        part = {k: v for k, v in maps.items() if k.endswith(kind)}
        target = _zero_removed(_clone(m), part)
        if kind not in holds:
            before = {k: v.clone() for k, v in target.state_dict().items()}
            with pytest.raises(ValueError, match=f"cannot hold a bias on {kind}") as e:
                flap_compensate(m, target, stats, part)
            assert "\n" not in str(e.value)
            assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())   # nothing changed
            continue
        pruned = flap_compensate(m, target, stats, part)
        pruned.save_pretrained(tmp_path / arch, safe_serialization=True)
        back = AutoModelForCausalLM.from_pretrained(tmp_path / arch, local_files_only=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=windows).logits, pruned(input_ids=windows).logits,
                                       atol=1e-5, rtol=1e-5)


def test_adaptive_unit_maps_budget_and_kv_groups(windows):
    from foldviz.lm.calib import adaptive_unit_maps
    from foldviz.lm.groups import find_lm_groups

    m = two_layer()
    groups = {g.id: g for g in find_lm_groups(m).groups if g.foldable}
    stats = unit_input_stats(m, windows, max_tokens=10_000)
    scores = flap_scores(m, stats)
    uni = unit_maps_from_scores(m, scores, 0.3)
    ada = adaptive_unit_maps(m, scores, 0.3)
    cost = lambda maps: sum(int((v < 0).sum()) * groups[k].info["params_per_unit"] for k, v in maps.items())  # noqa: E731
    biggest = max(g.info["params_per_unit"] * (NKV if g.role == "heads" else 1) for g in groups.values())
    assert cost(uni) <= cost(ada) < cost(uni) + biggest
    for gid, lab in ada.items():
        assert (lab >= 0).sum() >= 1 and sorted(lab[lab >= 0]) == list(range(int((lab >= 0).sum())))
        if gid.endswith("self_attn"):      # the same number of heads kept in each KV group
            kept = (lab.reshape(NKV, NQ // NKV) >= 0).sum(1)
            assert (kept == kept[0]).all() and kept[0] >= 1
        z = (scores[gid] - scores[gid].mean()) / scores[gid].std()
        if gid.endswith("mlp") and (lab < 0).any():    # within a group the lowest scores go first
            assert z[lab < 0].max() <= z[lab >= 0].min()
    # a group whose scores have one far outlier below the rest gives up that unit first
    skewed = {k: v.copy() for k, v in scores.items()}
    skewed["model.layers.1.mlp"] = np.r_[-1000.0, np.linspace(1, 2, INTER - 1)]
    tiny = adaptive_unit_maps(m, skewed, 0.1)
    assert tiny["model.layers.1.mlp"][0] == -1


def test_blank_rows_are_not_shared_text(tmp_path):
    """WikiText's many blank rows and stock headings never add up to an overlap on their own."""
    d = tmp_path / "wt"
    d.mkdir()
    head = " \n" * 40 + " = = Reception = = \n" + " \n" * 40      # 80 blank rows: 80 empty documents
    (d / "wiki.test.raw").write_text((head + " Alpha beta gamma delta . \n") * 5)
    (d / "wiki.train.raw").write_text((head + " Epsilon zeta eta theta . \n") * 5)
    check_no_overlap(f"wikitext2-train:{d}", f"wikitext2:{d}")
