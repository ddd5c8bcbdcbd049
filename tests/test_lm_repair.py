"""Data-free repairs of folded decoders (foldviz.lm.repair) on tiny constructed Llama models."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from foldviz.lm.repair import (  # noqa: E402
    norm_parameters,
    refit_outputs,
    rescale_outputs,
    self_generate,
    tune_norms,
    weighted_merge,
)

V, CTX = 40, 16


def fold_lm(model, ratio: float, ratios: dict | None = None):
    """The engine's fold of a decoder with no repair (what the LM repairs below start from)."""
    from foldviz.fold import fold
    from foldviz.lm.kind import DECODER, LM_CLUSTERING
    from foldviz.plans import FoldPlan

    plan = FoldPlan(default_ratio=ratio, ratios=dict(ratios or {}), repair="none", clustering=dict(LM_CLUSTERING))
    return fold(model, plan, example_input=torch.zeros(1, 2, dtype=torch.long), kind=DECODER)



def tiny(nq=4, nkv=2, inter=24, layers=2, hidden=16, hd=4, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=nq, num_key_value_heads=nkv, head_dim=hd, max_position_embeddings=CTX,
                      tie_word_embeddings=False, eos_token_id=0, bos_token_id=None, pad_token_id=None)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.4)
    return m


def logits(m, x):
    with torch.no_grad():
        return m(input_ids=x, use_cache=False).logits


X = torch.randint(0, V, (3, CTX), generator=torch.Generator().manual_seed(5))


def test_self_generate():
    m = tiny()
    t = self_generate(m, 5, 24, seed=1, batch_size=2)           # longer than the context: sliding window
    assert t.shape == (5, 24) and t.dtype == torch.long
    assert (t[:, 0] == 0).all() and int(t.max()) < V and int(t.min()) >= 0
    assert torch.equal(t, self_generate(m, 5, 24, seed=1, batch_size=5))   # batching does not change the draw
    assert not torch.equal(t, self_generate(m, 5, 24, seed=2))
    greedy = self_generate(m, 1, 10, top_k=1)[0]
    seq = [0]
    for _ in range(9):                                          # argmax decoding without a cache
        seq.append(int(logits(m, torch.tensor([seq]))[0, -1].argmax()))
    assert greedy.tolist() == seq
    with pytest.raises(ValueError, match="temperature"):
        self_generate(m, 1, 4, temperature=0)


def _clusters(labels):
    labels = np.asarray(labels)
    return {c: np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)}


@pytest.mark.parametrize("nkv", [2, 4])
def test_weighted_merge_matches_definition(nkv):
    m = tiny(nq=4, nkv=nkv)
    res = fold_lm(m, 0.5)
    maps = res.unit_maps
    big = [c for c, mem in _clusters(maps["model.layers.0.mlp"]).items() if len(mem) >= 2][0]
    silent = _clusters(maps["model.layers.0.mlp"])[big][0]
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[:, silent] = 0      # contributes nothing: gets no weight
    before = copy.deepcopy(res.model)
    assert weighted_merge(m, res.model, maps) == {"groups": len(maps)}
    for i in range(2):
        mo, mf = m.model.layers[i].mlp, res.model.model.layers[i].mlp
        w = (mo.down_proj.weight.detach().double() ** 2).sum(0)
        for c, mem in _clusters(maps[f"model.layers.{i}.mlp"]).items():
            for nm in ("gate_proj", "up_proj"):
                rows = getattr(mo, nm).weight.detach().double()[mem]
                want = (rows * w[mem, None]).sum(0) / w[mem].sum()
                torch.testing.assert_close(getattr(mf, nm).weight.detach().double()[c], want, atol=1e-6, rtol=1e-5)
        # consuming side untouched
        assert torch.equal(mf.down_proj.weight, before.model.layers[i].mlp.down_proj.weight)
    mem = _clusters(maps["model.layers.0.mlp"])[big]
    rest = [j for j in mem if j != silent]
    if len(rest) == 1:   # the silent member is ignored entirely
        torch.testing.assert_close(res.model.model.layers[0].mlp.gate_proj.weight[big],
                                   m.model.layers[0].mlp.gate_proj.weight[rest[0]])
    ao, af = m.model.layers[1].self_attn, res.model.model.layers[1].self_attn
    w = (ao.o_proj.weight.detach().double().reshape(16, 4, 4) ** 2).sum((0, 2))
    q = ao.q_proj.weight.detach().double().reshape(4, 4, 16)
    for c, mem in _clusters(maps["model.layers.1.self_attn"]).items():
        want = (q[mem] * w[mem, None, None]).sum(0) / w[mem].sum()
        torch.testing.assert_close(af.q_proj.weight.detach().double().reshape(-1, 4, 16)[c], want, atol=1e-6,
                                   rtol=1e-5)
    with pytest.raises(ValueError, match="unknown group id"):
        weighted_merge(m, res.model, {"model.hidden": np.zeros(3)})


@pytest.mark.parametrize("kind", ["mlp", "self_attn"])
def test_rescale_restores_a_scaled_output(kind):
    m = tiny()
    f = copy.deepcopy(m)
    with torch.no_grad():
        for layer in f.model.layers:
            (layer.mlp.down_proj if kind == "mlp" else layer.self_attn.o_proj).weight.mul_(0.5)
    assert (logits(f, X) - logits(m, X)).abs().max() > 1e-2
    out = rescale_outputs(m, f, {f"model.layers.{i}.{kind}": None for i in range(2)}, tokens=X)
    assert set(out["scales"]) == {f"model.layers.{i}.{kind}" for i in range(2)}
    for s in out["scales"].values():
        assert s == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(logits(f, X), logits(m, X), atol=1e-4, rtol=1e-4)
    g = copy.deepcopy(m)                       # Gaussian probes (weights only): the scale is a property of the weights
    with torch.no_grad():
        g.model.layers[1].mlp.down_proj.weight.mul_(0.25)
    s = rescale_outputs(m, g, {"model.layers.1.mlp": None}, n_probe=4, seqlen=8)["scales"]
    assert s == {"model.layers.1.mlp": pytest.approx(4.0, rel=1e-6)}


def test_refit_recovers_a_perturbed_projection_and_helps_a_fold():
    m = tiny()
    f = copy.deepcopy(m)
    with torch.no_grad():
        for layer in f.model.layers:
            layer.mlp.down_proj.weight.add_(0.3 * torch.randn_like(layer.mlp.down_proj.weight))
            layer.self_attn.o_proj.weight.mul_(1.7)
    toks = torch.randint(0, V, (32, CTX), generator=torch.Generator().manual_seed(9))
    rep = refit_outputs(m, f, tokens=toks, ridge=1e-8)["relative_error"]
    assert all(after < 1e-8 for _before, after in rep.values())
    torch.testing.assert_close(logits(f, X), logits(m, X), atol=1e-4, rtol=1e-4)
    g = copy.deepcopy(m)
    with torch.no_grad():
        g.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    refit_outputs(m, g, tokens=toks, ridge=1e-8, target="original-stream")
    torch.testing.assert_close(logits(g, X), logits(m, X), atol=1e-4, rtol=1e-4)
    res = fold_lm(m, 0.4)
    for target in ("same-input", "original-stream"):
        folded = copy.deepcopy(res.model)
        rep = refit_outputs(m, folded, res.unit_maps, tokens=toks, target=target)["relative_error"]
        assert set(rep) == set(res.unit_maps)
        assert all(after < before for before, after in rep.values())
    with pytest.raises(ValueError, match="unknown refit target"):
        refit_outputs(m, copy.deepcopy(res.model), res.unit_maps, tokens=toks, target="elsewhere")


def test_tune_norms_only_touches_norms():
    m = tiny()
    res = fold_lm(m, 0.4)
    toks = torch.randint(0, V, (16, CTX), generator=torch.Generator().manual_seed(2))
    before = {n: p.detach().clone() for n, p in res.model.named_parameters()}
    grad = {n: p.requires_grad for n, p in res.model.named_parameters()}   # the engine's folds are frozen
    norms = {id(p) for p in norm_parameters(res.model)}
    assert len(norms) == 2 * 2 + 1                       # input + post-attention per layer, final norm
    out = tune_norms(m, res.model, res.unit_maps, tokens=toks, steps=12, lr=2e-2)
    assert out["params"] == 5 * 16 and out["kl"][1] < out["kl"][0]
    for n, p in res.model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (id(p) in norms), n
        assert p.requires_grad == grad[n]                # tuning restores every flag
