"""Language-model folding (foldviz.lm) on tiny randomly initialised decoders built here (fast, offline)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from foldviz.lm import (  # noqa: E402
    LMLoadError,
    TextError,
    UnsupportedLMError,
    find_lm_groups,
    fold_lm,
    layer_sizes,
    lm_plan,
    load_lm,
    perplexity,
    read_text_file,
    save_lm,
)
from foldviz.plans import PlanError  # noqa: E402

V = 61


def tiny(nq=4, nkv=2, inter=24, layers=2, hidden=32, hd=8, seed=0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=nq, num_key_value_heads=nkv, head_dim=hd, max_position_embeddings=16,
                      tie_word_embeddings=False, **kw)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # default init is tiny; make every weight matter
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(m, x):
    with torch.no_grad():
        return m(input_ids=x, use_cache=False).logits


def test_groups_gqa_and_hidden_not_foldable():
    gs = {g.id: g for g in find_lm_groups(tiny(nq=8, nkv=2, inter=40))}
    assert not gs["model.hidden"].foldable and "residual" in gs["model.hidden"].reason
    mlp, heads = gs["model.layers.1.mlp"], gs["model.layers.1.self_attn"]
    assert (mlp.kind, mlp.n, mlp.feature_dim) == ("mlp", 40, 3 * 32)
    assert (heads.kind, heads.n, heads.kv_groups, heads.heads_per_kv, heads.mha) == ("heads", 8, 2, 4, False)
    assert heads.params_per_unit == 8 * 32 * 2   # q row block + o column block


@pytest.mark.parametrize("nq,nkv", [(8, 2), (4, 4)])
def test_k_equals_n_is_identity(nq, nkv, x):
    m = tiny(nq=nq, nkv=nkv, inter=48)
    ref = logits(m, x)
    # 48·(1-0.01) rounds to 48 and 4·0.99 to 4: every group goes through clustering with k = n
    res = fold_lm(m, lm_plan(0.01))
    assert [g["n_after"] for g in res.groups] == [g["n_before"] for g in res.groups]
    assert res.params_after == res.params_before
    torch.testing.assert_close(logits(res.model, x), ref, rtol=0, atol=1e-6)


def _dup_mlp(src: LlamaForCausalLM) -> LlamaForCausalLM:
    """Same function, every MLP neuron present twice (gate/up rows copied, down columns halved)."""
    cfg = LlamaConfig(**{**src.config.to_dict(), "intermediate_size": 2 * src.config.intermediate_size})
    dst = LlamaForCausalLM(cfg).eval()
    sd = src.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith(("gate_proj.weight", "up_proj.weight")):
            out[k] = torch.cat([v, v], 0)
        elif k.endswith("down_proj.weight"):
            out[k] = torch.cat([v / 2, v / 2], 1)
        else:
            out[k] = v
    dst.load_state_dict(out)
    return dst


def test_duplicate_mlp_neurons_fold_back(x):
    ref_m = tiny(nq=4, nkv=2, inter=24)
    dup = _dup_mlp(ref_m)
    ref = logits(ref_m, x)
    torch.testing.assert_close(logits(dup, x), ref, rtol=1e-5, atol=1e-5)
    plan = lm_plan(0.0, ratios={f"model.layers.{i}.mlp": 0.5 for i in range(2)})
    for meth in ("magnitude",):   # pruning half of the duplicates loses half of each neuron's output: not exact
        assert (logits(fold_lm(dup, plan, method=meth).model, x) - ref).abs().max() > 1e-2
    res = fold_lm(dup, plan)
    assert [s["intermediate_size"] for s in layer_sizes(res.model)] == [24, 24]
    assert res.model.config.intermediate_size == 24
    torch.testing.assert_close(logits(res.model, x), ref, rtol=1e-5, atol=1e-5)


def _dup_heads(src: LlamaForCausalLM) -> LlamaForCausalLM:
    """Same function, every query head present twice within its KV group (MHA: k/v duplicated too)."""
    c = src.config
    nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    mha = nq == nkv
    cfg = LlamaConfig(**{**c.to_dict(), "num_attention_heads": 2 * nq,
                         "num_key_value_heads": 2 * nkv if mha else nkv})
    dst = LlamaForCausalLM(cfg).eval()
    out = {}
    for k, v in src.state_dict().items():
        if k.endswith("q_proj.weight") or (mha and k.endswith(("k_proj.weight", "v_proj.weight"))):
            groups = 1 if mha else nkv
            blk = v.reshape(groups, -1, hd, v.shape[1])                     # (kv groups, heads/group, hd, in)
            out[k] = torch.cat([blk, blk], 1).reshape(-1, v.shape[1])
        elif k.endswith("o_proj.weight"):
            groups = 1 if mha else nkv
            blk = v.reshape(v.shape[0], groups, -1, hd) / 2
            out[k] = torch.cat([blk, blk], 2).reshape(v.shape[0], -1)
        else:
            out[k] = v
    dst.load_state_dict(out)
    return dst


@pytest.mark.parametrize("nq,nkv", [(4, 2), (4, 1), (2, 2)])
def test_duplicate_query_heads_fold_back(nq, nkv, x):
    ref_m = tiny(nq=nq, nkv=nkv, inter=24)
    dup = _dup_heads(ref_m)
    ref = logits(ref_m, x)
    torch.testing.assert_close(logits(dup, x), ref, rtol=1e-5, atol=1e-5)
    plan = lm_plan(0.0, ratios={f"model.layers.{i}.self_attn": 0.5 for i in range(2)})
    res = fold_lm(dup, plan)
    sizes = layer_sizes(res.model)
    assert all(s["num_attention_heads"] == nq and s["num_key_value_heads"] == nkv for s in sizes)
    assert (res.model.config.num_attention_heads, res.model.config.num_key_value_heads) == (nq, nkv)
    torch.testing.assert_close(logits(res.model, x), ref, rtol=1e-5, atol=1e-5)
    # GQA: heads of different KV groups are never merged
    if nq != nkv and nkv > 1:
        lab = res.labels["model.layers.0.self_attn"]
        per_new = nq // nkv
        assert all(lab[h] // per_new == h // (2 * nq // nkv) for h in range(2 * nq))


def test_uniform_plan_save_pretrained_roundtrip(tmp_path, x):
    m = tiny(nq=8, nkv=2, inter=40, hidden=48)   # 48 % 6 heads == 0: transformers accepts the folded config
    res = fold_lm(m, lm_plan(0.25))
    assert res.uniform
    info = save_lm(res.model, tmp_path / "f", fold_summary=res.summary())
    assert info["format"] == "hf"
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "f", local_files_only=True, use_safetensors=True)
    assert (re.config.intermediate_size, re.config.num_attention_heads, re.config.num_key_value_heads,
            re.config.head_dim) == (30, 6, 2, 8)
    torch.testing.assert_close(logits(re.eval(), x), logits(res.model, x), rtol=0, atol=1e-6)
    loaded = load_lm(f"hf:{tmp_path / 'f'}")
    assert loaded.source == "hf" and "fold" in loaded.card
    torch.testing.assert_close(logits(loaded.model, x), logits(res.model, x), rtol=0, atol=1e-6)


def test_uniform_plan_that_transformers_rejects_uses_foldviz_format(tmp_path, x):
    m = tiny(nq=8, nkv=2, inter=40, hidden=32)   # 8 → 6 heads, and LlamaConfig wants hidden_size % heads == 0
    res = fold_lm(m, lm_plan(0.25))
    assert res.uniform and any("refuses" in n for n in res.notes)
    assert save_lm(res.model, tmp_path / "f")["format"] == "foldviz-lm"
    torch.testing.assert_close(logits(load_lm(str(tmp_path / "f")).model, x), logits(res.model, x), rtol=0, atol=1e-6)


def test_per_layer_plan_foldviz_format_roundtrip(tmp_path, x):
    m = tiny(nq=8, nkv=2, inter=40, layers=3)
    plan = lm_plan(0.25, ratios={"model.layers.0.mlp": 0.5, "model.layers.2.self_attn": 0.5},
                   skip=["model.layers.1.mlp"])
    res = fold_lm(m, plan)
    assert not res.uniform
    assert [s["intermediate_size"] for s in layer_sizes(res.model)] == [20, 40, 30]
    assert [s["num_attention_heads"] for s in layer_sizes(res.model)] == [6, 6, 4]
    info = save_lm(res.model, tmp_path / "f")
    assert info["format"] == "foldviz-lm" and not (tmp_path / "f" / "config.json").exists()
    loaded = load_lm(f"hf:{tmp_path / 'f'}")
    assert loaded.source == "foldviz"
    torch.testing.assert_close(logits(loaded.model, x), logits(res.model, x), rtol=0, atol=1e-6)
    # validated on read: a tampered size is a one-line error, not a crash deep in torch
    meta_p = tmp_path / "f" / "foldviz_lm.json"
    meta = json.loads(meta_p.read_text())
    meta["layers"][0]["intermediate_size"] = 21
    meta_p.write_text(json.dumps(meta))
    with pytest.raises(LMLoadError, match="do not match"):
        load_lm(f"hf:{tmp_path / 'f'}")
    meta["layers"][0]["intermediate_size"] = -3
    meta_p.write_text(json.dumps(meta))
    with pytest.raises(LMLoadError, match="positive integer"):
        load_lm(f"hf:{tmp_path / 'f'}")


def test_fused_projection_model_is_refused():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=16, pad_token_id=0)
    with pytest.raises(UnsupportedLMError, match=r"fused projection .*qkv_proj") as e:
        find_lm_groups(Phi3ForCausalLM(cfg))
    assert "\n" not in str(e.value)
    with pytest.raises(UnsupportedLMError):
        fold_lm(Phi3ForCausalLM(cfg), 0.2)


def test_moe_mlp_listed_not_foldable():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                        max_position_embeddings=16)
    gs = {g.id: g for g in find_lm_groups(MixtralForCausalLM(cfg))}
    assert not gs["model.layers.0.mlp"].foldable and "mixture-of-experts" in gs["model.layers.0.mlp"].reason
    assert gs["model.layers.0.self_attn"].foldable
    with pytest.raises(PlanError, match="not foldable"):
        fold_lm(MixtralForCausalLM(cfg), lm_plan(0.2, ratios={"model.layers.0.mlp": 0.5}))


def test_plan_errors():
    m = tiny()
    with pytest.raises(PlanError, match="unknown group id"):
        fold_lm(m, lm_plan(0.2, ratios={"model.layers.9.mlp": 0.5}))
    with pytest.raises(PlanError, match="repair"):
        fold_lm(m, lm_plan(0.2, repair="ar"))
    with pytest.raises(ValueError, match="unknown method"):
        fold_lm(m, 0.2, method="l1")


def test_baselines_prune_same_counts(x):
    m = tiny(nq=8, nkv=2, inter=40)
    counts = {}
    for meth in ("fold", "magnitude", "random"):
        res = fold_lm(m, lm_plan(0.5), method=meth)
        counts[meth] = (res.params_after, [s for s in layer_sizes(res.model)])
        assert logits(res.model, x).shape == (2, 16, V)
        if meth != "fold":
            lab = res.labels["model.layers.0.mlp"]
            assert (lab >= 0).sum() == 20 and sorted(lab[lab >= 0]) == list(range(20))
    assert counts["fold"] == counts["magnitude"] == counts["random"]
    # magnitude keeps the largest-norm neurons
    res = fold_lm(m, lm_plan(0.5), method="magnitude")
    mlp = m.model.layers[0].mlp
    norms = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T], 1).norm(dim=1)
    kept = torch.nonzero(torch.as_tensor(res.labels["model.layers.0.mlp"]) >= 0).flatten()
    assert set(kept.tolist()) == set(torch.topk(norms, 20).indices.tolist())


def test_hf_spec_errors(tmp_path):
    with pytest.raises(LMLoadError, match="does not exist"):
        load_lm(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LMLoadError, match="no config.json"):
        load_lm(f"hf:{tmp_path / 'empty'}")
    d = tmp_path / "pickle"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny().config.to_dict()))
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LMLoadError, match="safetensors only"):
        load_lm(f"hf:{d}")
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(LMLoadError, match="no \\*.safetensors"):
        load_lm(f"hf:{d}")
    with pytest.raises(LMLoadError, match="unknown demo LM"):
        load_lm("demo:does-not-exist")
    with pytest.raises(LMLoadError, match="hf:DIR"):
        load_lm("gpt2")


def test_text_file_validation(tmp_path):
    with pytest.raises(TextError, match="not found"):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TextError, match="UTF-8"):
        read_text_file(tmp_path / "latin1.txt")
    (tmp_path / "big.txt").write_text("a" * 200)
    with pytest.raises(TextError, match="limit"):
        read_text_file(tmp_path / "big.txt", max_bytes=100)
    (tmp_path / "ok.txt").write_text("To be, or not to be")
    assert read_text_file(tmp_path / "ok.txt").startswith("To be")


class _Bigram(torch.nn.Module):
    """logits(x_t) = log P[x_t, :] — a model whose perplexity can be computed by hand."""

    def __init__(self, probs, ctx):
        super().__init__()
        self.logp = torch.nn.Parameter(probs.log())
        self.config = type("C", (), {"max_position_embeddings": ctx})()

    def forward(self, input_ids, use_cache=False):
        return type("O", (), {"logits": self.logp[input_ids]})()


def test_perplexity_protocol_constructed():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 5, generator=g) + 0.1
    probs /= probs.sum(1, keepdim=True)
    tokens = torch.randint(0, 5, (23,), generator=g)
    model = _Bigram(probs, ctx=6)
    out = perplexity(model, tokens, batch_size=2)
    # by hand: 23 // 6 = 3 non-overlapping windows, remainder (5 tokens) dropped, each window scored alone
    window_means = []
    for w in range(3):
        seg = tokens[w * 6:(w + 1) * 6].tolist()
        window_means.append(sum(-math.log(probs[a, b]) for a, b in zip(seg[:-1], seg[1:])) / 5)
    assert out["windows"] == 3 and out["seq_len"] == 6 and out["tokens_scored"] == 15
    assert out["perplexity"] == pytest.approx(math.exp(sum(window_means) / 3), rel=1e-6)
    # uniform predictions have perplexity = vocabulary size, independent of the windowing
    uni = _Bigram(torch.full((5, 5), 0.2), ctx=4)
    assert perplexity(uni, tokens)["perplexity"] == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least"):
        perplexity(model, tokens[:5])


def test_cli_inspect_and_fold(tmp_path, capsys):
    from foldviz.lm.__main__ import main

    m = tiny(nq=8, nkv=2, inter=40, hidden=48)
    m.save_pretrained(tmp_path / "base")
    assert main(["inspect", f"hf:{tmp_path / 'base'}"]) == 0
    assert "model.layers.1.self_attn" in capsys.readouterr().out
    assert main(["fold", f"hf:{tmp_path / 'base'}", "--ratio", "0.25", "--out", str(tmp_path / "f"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["saved"]["format"] == "hf" and report["params_after"] < report["params_before"]
    assert main(["eval", f"hf:{tmp_path / 'f'}"]) == 2          # no tokenizer.json: clear error, exit code 2
    assert "tokenizer" in capsys.readouterr().err
    assert main(["inspect", f"hf:{tmp_path / 'missing'}"]) == 2


def test_bundled_demo_lm_loads():
    from foldviz.lm import list_lm_demos, split_text

    assert "shakespeare-llama" in list_lm_demos()  # bundled in assets/models/ (python -m foldviz.lm train rebuilds it)
    lm = load_lm("demo:shakespeare-llama")
    assert lm.source == "demo" and lm.card["kind"] == "causal-lm" and lm.params == lm.card["params"]
    groups = {g.id: g for g in find_lm_groups(lm.model)}
    assert groups["model.layers.0.self_attn"].heads_per_kv == 4 and groups["model.layers.0.mlp"].n == 512
    ids = lm.encode("To be, or not to be")
    assert lm.tokenizer.decode(ids.tolist()) == "To be, or not to be"
    tokens = lm.encode_documents(split_text("shakespeare:test"))
    assert perplexity(lm.model, tokens, max_windows=4)["perplexity"] < 500


def test_mlp_features_are_streamed_bit_for_bit():
    """The MLP group's k-means reads [gate | up | down^T | biases] block by block from the weights (never the
    whole feature matrix): the same Gram matrix and the same labels as k-means on the concatenated features."""
    from foldviz.kmeans import DEFAULT_CLUSTERING, _gram_blocks, kmeans
    from foldviz.lm.fold import _column_blocks

    m = tiny(inter=40, mlp_bias=True)
    mlp = m.model.layers[1].mlp
    parts = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T,
             mlp.gate_proj.bias[:, None], mlp.up_proj.bias[:, None]]
    feat = torch.cat([p.detach().float() for p in parts], dim=1)       # (40, 32 + 32 + 32 + 2)
    for step in (7, 32, 50, 1000):    # blocks that cut inside, at and across the parts' borders
        with torch.no_grad():
            blocks = list(_column_blocks([p.detach() for p in parts], step))
        assert [b.shape[1] for b in blocks] == [min(step, 98 - j) for j in range(0, 98, step)]
        assert torch.equal(_gram_blocks(iter(blocks), torch.float32),
                           _gram_blocks((feat[:, j:j + step] for j in range(0, 98, step)), torch.float32))
    plan = lm_plan(0.3, seed=4)
    res = fold_lm(m, plan)
    want = kmeans(feat, 28, seed=4 + 1009, **{**DEFAULT_CLUSTERING, **plan.clustering})
    assert np.array_equal(res.labels["model.layers.1.mlp"], want.labels)
    assert res.groups[2]["inertia"] == pytest.approx(want.inertia, rel=1e-6)


def test_gram_prefetch_thread_gives_the_single_threaded_fold():
    """With >= 2 torch threads the next MLP Gram matrix is computed on a second thread: same labels and weights
    as a single-threaded fold, and the caller's thread setting is restored."""
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res = fold_lm(tiny(layers=3, inter=40), lm_plan(0.3))
            assert torch.get_num_threads() == threads
            out[threads] = res
        for gid, lab in out[1].labels.items():
            assert np.array_equal(lab, out[2].labels[gid]), gid
        for p1, p2 in zip(out[1].model.parameters(), out[2].model.parameters()):
            assert torch.equal(p1, p2)
    finally:
        torch.set_num_threads(before)
