"""Language models through the one engine: groups, exact folds, transformers round trips, safe loading, perplexity.

Tiny randomly initialised decoders built here (fast, offline); the bundled demos where noted.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import (AutoModelForCausalLM, Gemma2Config, GemmaConfig, LlamaConfig,  # noqa: E402
                          MistralConfig, Qwen2Config, Qwen3Config)

from foldviz.apply import apply_method  # noqa: E402
from foldviz.kinds import get_kind  # noqa: E402
from foldviz.lm.corpus import TextError, read_text_file  # noqa: E402
from foldviz.lm.evaluate import perplexity  # noqa: E402
from foldviz.lm.groups import UnsupportedLMError, find_lm_groups, layer_sizes  # noqa: E402
from foldviz.lm.io import LMLoadError  # noqa: E402
from foldviz.models import load_model  # noqa: E402
from foldviz.persist import save_folded  # noqa: E402
from foldviz.plans import FoldPlan, PlanError  # noqa: E402
from kinds_fixtures import (V, duplicate_mlp_neurons, duplicate_query_heads, logits, save_hf, tiny_llama,  # noqa: E402
                            tokens)

LM = get_kind("lm")


@pytest.fixture(scope="module")
def x():
    return tokens()


def loaded_from(model, tmp_path, name="base"):
    return load_model(save_hf(model, tmp_path / name))


def test_groups_are_channel_groups_with_partitions():
    graph = find_lm_groups(tiny_llama(nq=8, nkv=2, inter=40))
    gs = graph.by_id
    assert not gs["model.hidden"].foldable and "residual" in gs["model.hidden"].reason
    mlp, heads = gs["model.layers.1.mlp"], gs["model.layers.1.self_attn"]
    assert (mlp.role, mlp.channels, mlp.unit, mlp.partitions, mlp.info["feature_dim"]) == ("mlp", 40, "neuron", 1, 96)
    assert (heads.role, heads.channels, heads.partitions, heads.per_partition, heads.info["mha"]) == \
        ("heads", 8, 2, 4, False)
    assert heads.info["params_per_unit"] == 8 * 32 * 2   # q row block + o column block
    # every q row and o column belongs to exactly one head (head_dim rows each)
    q = next(m for m in heads.members if m.module.endswith("q_proj"))
    assert len(q.idxs) == 64 and q.root_idxs[:9] == [0] * 8 + [1]
    # a partition is the group restricted to one KV group, renumbered from 0
    p1 = heads.partition(1)
    assert p1.channels == 4 and set(next(m for m in p1.members if m.module.endswith("o_proj")).root_idxs) == {0, 1, 2, 3}


@pytest.mark.parametrize("nq,nkv", [(8, 2), (4, 4)])
def test_ratio_zero_and_k_equals_n_are_the_identity(nq, nkv, x, tmp_path):
    lm = loaded_from(tiny_llama(nq=nq, nkv=nkv, inter=48), tmp_path)
    ref = logits(lm.model, x)
    for plan in (FoldPlan(default_ratio=0.0, repair="none"), FoldPlan(default_ratio=0.01, repair="none")):
        res = apply_method(lm, plan, "fold")
        assert [g["channels_after"] for g in res.groups] == [g["channels_before"] for g in res.groups]
        torch.testing.assert_close(logits(res.model, x), ref, rtol=0, atol=1e-6)


def test_duplicate_mlp_neurons_fold_back_exactly(x, tmp_path):
    ref_m = tiny_llama(nq=4, nkv=2, inter=24)
    dup = loaded_from(duplicate_mlp_neurons(ref_m), tmp_path)
    ref = logits(ref_m, x)
    torch.testing.assert_close(logits(dup.model, x), ref, rtol=1e-5, atol=1e-5)
    plan = FoldPlan(default_ratio=0.0, repair="none", ratios={f"model.layers.{i}.mlp": 0.5 for i in range(2)})
    res = apply_method(dup, plan, "fold")
    assert [s["intermediate_size"] for s in layer_sizes(res.model)] == [24, 24]
    assert res.model.config.intermediate_size == 24
    torch.testing.assert_close(logits(res.model, x), ref, rtol=1e-5, atol=1e-5)
    # pruning half of the duplicates loses half of each neuron's output: not exact
    assert (logits(apply_method(dup, plan, "magnitude").model, x) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("nq,nkv", [(4, 2), (4, 1), (2, 2)])
def test_duplicate_query_heads_fold_back_within_their_kv_group(nq, nkv, x, tmp_path):
    ref_m = tiny_llama(nq=nq, nkv=nkv, inter=24)
    dup = loaded_from(duplicate_query_heads(ref_m), tmp_path)   # MHA: whole heads (q, k, v) duplicated
    ref = logits(ref_m, x)
    torch.testing.assert_close(logits(dup.model, x), ref, rtol=1e-5, atol=1e-5)
    plan = FoldPlan(default_ratio=0.0, repair="none", ratios={f"model.layers.{i}.self_attn": 0.5 for i in range(2)})
    res = apply_method(dup, plan, "fold")
    assert all(s["num_attention_heads"] == nq and s["num_key_value_heads"] == nkv for s in layer_sizes(res.model))
    torch.testing.assert_close(logits(res.model, x), ref, rtol=1e-5, atol=1e-5)
    # clusters never cross KV groups: heads of KV group j merge into heads of KV group j
    units = res.unit_maps["model.layers.0.self_attn"]
    per_old, per_new = 2 * nq // nkv, nq // nkv
    assert all(units[h] // per_new == h // per_old for h in range(2 * nq))


ARCHS = [LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, GemmaConfig, Gemma2Config]


@pytest.mark.parametrize("config_cls", ARCHS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_every_fold_loads_in_transformers_with_the_same_logits(config_cls, ratio, x, tmp_path):
    """GQA head folds and MLP folds: what foldviz writes, AutoModelForCausalLM.from_pretrained reads back with the
    logits of foldviz's own load; a plan transformers could not hold is refused before folding."""
    lm = loaded_from(tiny_llama(nq=8, nkv=2, inter=40, hidden=48, hd=12, config_cls=config_cls), tmp_path)
    plan = LM.default_plan(lm, ratio)
    problem = ""
    try:
        LM.check_output(lm, LM.graph(lm), plan)
    except PlanError as e:
        problem = str(e)
    if problem:   # only LlamaConfig validates hidden % heads: 48 % 6 == 0, so every case here is expressible
        pytest.fail(problem)
    res = apply_method(lm, plan, "fold")
    out = save_folded(res, lm, tmp_path / "folded")
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    own = load_model(f"file:{out}")
    assert hf.config.num_attention_heads == 8 - int(8 * ratio) and hf.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(hf, x), logits(own.model, x), rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(own.model, x), logits(res.model, x), rtol=0, atol=1e-5)


def test_a_plan_transformers_cannot_hold_is_refused_before_folding_with_the_nearest_plan(tmp_path):
    lm = loaded_from(tiny_llama(nq=8, nkv=2, inter=40, hidden=32), tmp_path)   # 32 % 6 != 0 for LlamaConfig
    with pytest.raises(PlanError, match=r"not a multiple.*nearest plan that can keeps 30 of 40 MLP neurons and "
                                        r"(2|4) of 4 query heads per KV group") as e:
        LM.check_output(lm, LM.graph(lm), LM.default_plan(lm, 0.25))
    assert "\n" not in str(e.value) and "--format foldviz-lm" in str(e.value)
    # layers of different sizes: one config cannot hold them
    uneven = LM.default_plan(lm, 0.25, ratios={"model.layers.0.mlp": 0.5})
    with pytest.raises(PlanError, match="different sizes"):
        LM.check_output(lm, LM.graph(lm), uneven)


def test_per_layer_plans_save_in_foldviz_format_and_load_back(tmp_path, x):
    lm = loaded_from(tiny_llama(nq=8, nkv=2, inter=40, layers=3), tmp_path)
    plan = LM.default_plan(lm, 0.25, ratios={"model.layers.0.mlp": 0.5, "model.layers.2.self_attn": 0.5},
                           skip=["model.layers.1.mlp"])
    LM.check_output(lm, LM.graph(lm), plan, "foldviz-lm")   # no error: this format holds any sizes
    res = apply_method(lm, plan, "fold")
    assert [s["intermediate_size"] for s in layer_sizes(res.model)] == [20, 40, 30]
    assert [s["num_attention_heads"] for s in layer_sizes(res.model)] == [6, 6, 4]
    with pytest.raises(ValueError, match="cannot write a transformers directory: its layers differ in size.*"
                                         "'foldviz-lm' format"):
        save_folded(res, lm, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    out = save_folded(res, lm, tmp_path / "f", fmt="foldviz-lm")
    torch.testing.assert_close(logits(load_model(str(out)).model, x), logits(res.model, x), rtol=0, atol=1e-6)
    # validated on read: a tampered size is a one-line error, not a crash deep in torch
    meta_p = out / "foldviz_lm.json"
    meta = json.loads(meta_p.read_text())
    meta["layers"][0]["intermediate_size"] = 21
    meta_p.write_text(json.dumps(meta))
    with pytest.raises(LMLoadError, match="layers.0.mlp.gate_proj.weight is \\[20, 32\\]"):
        load_model(str(out))
    meta["layers"][0]["intermediate_size"] = -3
    meta_p.write_text(json.dumps(meta))
    with pytest.raises(LMLoadError, match="whole number between 1"):
        load_model(str(out))


def test_bf16_checkpoints_stay_bf16(tmp_path, x):
    lm = loaded_from(tiny_llama(nq=8, nkv=2, inter=40, hidden=48).to(torch.bfloat16), tmp_path)
    assert lm.dtype == torch.bfloat16
    res = apply_method(lm, LM.default_plan(lm, 0.5), "fold")
    assert {p.dtype for p in res.model.parameters()} == {torch.bfloat16}
    out = save_folded(res, lm, tmp_path / "f")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert load_model(str(out)).dtype == torch.bfloat16


def test_fused_projections_and_mixture_of_experts_are_refused_with_one_line(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=16, pad_token_id=0)
    with pytest.raises(UnsupportedLMError, match=r"fused projection .*qkv_proj"):
        find_lm_groups(Phi3ForCausalLM(cfg))
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                           num_experts_per_tok=1, max_position_embeddings=16))
    moe.save_pretrained(tmp_path / "moe")
    with pytest.raises(LMLoadError, match="mixture-of-experts model .*mixtral.* is not supported; foldviz folds "
                                          "decoders with separate") as e:
        load_model(f"hf:{tmp_path / 'moe'}")
    assert "\n" not in str(e.value)


def test_magnitude_keeps_the_largest_feature_norms_and_every_method_keeps_the_same_counts(x, tmp_path):
    lm = loaded_from(tiny_llama(nq=8, nkv=2, inter=40), tmp_path)
    plan = LM.default_plan(lm, 0.5)
    counts = {}
    for meth in ("fold", "magnitude", "random"):
        res = apply_method(lm, plan, meth)
        counts[meth] = [dict(s) for s in layer_sizes(res.model)]
        assert logits(res.model, x).shape == (2, 16, V)
    assert counts["fold"] == counts["magnitude"] == counts["random"]
    res = apply_method(lm, plan, "magnitude")
    mlp = lm.model.model.layers[0].mlp
    norms = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T], 1).norm(dim=1)
    kept = np.flatnonzero(res.unit_maps["model.layers.0.mlp"] >= 0)
    assert set(kept.tolist()) == set(torch.topk(norms, 20).indices.tolist())


def test_an_image_method_on_a_language_model_is_a_one_line_error(tmp_path):
    lm = loaded_from(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="Fold-DFR does not apply to a language model; methods for it: fold, "
                                         "refit, magnitude, wanda_sp, flap, random"):
        apply_method(lm, LM.default_plan(lm, 0.3), "dfr")


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
    """logits(x_t) = log P[x_t, :]: a model whose perplexity can be computed by hand."""

    def __init__(self, probs, ctx):
        super().__init__()
        self.logp = torch.nn.Parameter(probs.log())
        self.config = type("C", (), {"max_position_embeddings": ctx, "vocab_size": probs.shape[0]})()

    def forward(self, input_ids, use_cache=False):
        return type("O", (), {"logits": self.logp[input_ids]})()


def test_perplexity_protocol_constructed():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 5, generator=g) + 0.1
    probs /= probs.sum(1, keepdim=True)
    toks = torch.randint(0, 5, (23,), generator=g)
    model = _Bigram(probs, ctx=6)
    out = perplexity(model, toks, batch_size=2)
    # by hand: 23 // 6 = 3 non-overlapping windows, remainder (5 tokens) dropped, each window scored alone
    window_means = []
    for w in range(3):
        seg = toks[w * 6:(w + 1) * 6].tolist()
        window_means.append(sum(-math.log(probs[a, b]) for a, b in zip(seg[:-1], seg[1:])) / 5)
    assert out["windows"] == 3 and out["seq_len"] == 6 and out["tokens_scored"] == 15
    assert out["perplexity"] == pytest.approx(math.exp(sum(window_means) / 3), rel=1e-6)
    uni = _Bigram(torch.full((5, 5), 0.2), ctx=4)   # uniform predictions: perplexity = vocabulary size
    assert perplexity(uni, toks)["perplexity"] == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least"):
        perplexity(model, toks[:5])
    with pytest.raises(ValueError, match="at least 1"):
        perplexity(model, toks, max_windows=0)


def test_bundled_demo_lms_load_with_their_card_tokenizer_and_data():
    from foldviz.lm.io import list_lm_demos

    assert set(list_lm_demos()) >= {"shakespeare-llama", "shakespeare-llama-wide"}
    lm = load_model("demo:shakespeare-llama")
    assert lm.kind == "lm" and lm.source == "demo" and lm.tokenizer is not None
    assert lm.card["heldout_perplexity"] > 1 and LM.default_data(lm) == "shakespeare:test"
    ev = LM.evaluate(lm, lm.model, "shakespeare:test", 4)
    assert ev["samples"] == 4 and ev["seq_len"] == lm.context_length and 10 < ev["perplexity"] < 200
    assert load_model("demo:shakespeare-llama-wide").dtype == torch.bfloat16   # shipped as bf16, kept


# ---------------------------------------------------------------------------------------------------------------
# Fold + refit (the LM default repair) through the engine
# ---------------------------------------------------------------------------------------------------------------
def test_the_default_lm_plan_refits_and_ratio_zero_changes_nothing(x, tmp_path):
    lm = loaded_from(tiny_llama(nq=4, nkv=2, inter=24), tmp_path)
    plan = LM.default_plan(lm, 0.0)
    assert plan.repair == "refit"
    res = apply_method(lm, plan, "refit")
    torch.testing.assert_close(logits(res.model, x), logits(lm.model, x), rtol=0, atol=0)


def test_refit_keeps_an_exact_fold_exact(x, tmp_path):
    ref_m = tiny_llama(nq=4, nkv=2, inter=24)
    dup = loaded_from(duplicate_mlp_neurons(ref_m), tmp_path)
    plan = FoldPlan(default_ratio=0.0, repair="refit", ratios={f"model.layers.{i}.mlp": 0.5 for i in range(2)},
                    repair_settings={"samples": 8, "seqlen": 16})
    res = apply_method(dup, plan, "refit")
    assert res.repair_samples == 8
    torch.testing.assert_close(logits(res.model, x), logits(ref_m, x), rtol=1e-5, atol=1e-5)


def test_refit_brings_a_lossy_fold_closer_to_the_original_and_leaves_the_input_model_alone(x, tmp_path):
    lm = loaded_from(tiny_llama(nq=4, nkv=2, inter=48), tmp_path)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ref = logits(lm.model, x)
    plan = FoldPlan(default_ratio=0.5, repair="none", repair_settings={"samples": 16, "seqlen": 16})
    naive = apply_method(lm, plan, "fold")
    refit = apply_method(lm, plan.with_changes(repair="refit"), "refit")
    assert [g["channels_after"] for g in refit.groups] == [g["channels_after"] for g in naive.groups]
    err = lambda r: float(((logits(r.model, x) - ref) ** 2).mean())  # noqa: E731
    assert err(refit) < err(naive)   # random weights: a modest gain (the demos: benchmarks/results/lm_research.md)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_a_plan_repair_of_the_other_kind_is_a_one_line_error(tmp_path):
    from foldviz.methods import plan_method

    assert plan_method("lm", "refit") == "refit" and plan_method("lm", "none") == "fold"
    assert plan_method("cnn", "dfr") == "dfr"
    with pytest.raises(ValueError, match="repair 'dfr' does not apply to language models; choose one of none, refit"):
        plan_method("lm", "dfr")
    with pytest.raises(ValueError, match="repair 'refit' does not apply to image classifiers"):
        plan_method("cnn", "refit")
