"""Per-layer sensitivity (foldviz.lm.sensitivity) on a tiny decoder."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from foldviz.lm.evaluate import perplexity  # noqa: E402
from foldviz.lm.sensitivity import layer_sensitivity  # noqa: E402


def fold_lm(model, ratio: float, ratios: dict | None = None):
    """The engine's fold of a decoder with no repair (what the LM repairs below start from)."""
    from foldviz.fold import fold
    from foldviz.lm.kind import DECODER, LM_CLUSTERING
    from foldviz.plans import FoldPlan

    plan = FoldPlan(default_ratio=ratio, ratios=dict(ratios or {}), repair="none", clustering=dict(LM_CLUSTERING))
    return fold(model, plan, example_input=torch.zeros(1, 2, dtype=torch.long), kind=DECODER)



def test_layer_sensitivity():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=4, max_position_embeddings=8)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.4)
    tokens = torch.randint(0, 30, (200,), generator=torch.Generator().manual_seed(1))
    calls = []

    def compress(model, gids):
        calls.append(gids)
        return fold_lm(model, 0.0, {g: 0.5 for g in gids}).model

    rows = layer_sensitivity(m, tokens, compress, max_windows=10)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert calls == [[f"model.layers.{i}.mlp", f"model.layers.{i}.self_attn"] for i in range(3)]
    base = perplexity(m, tokens, max_windows=10)["perplexity"]
    for r, gids in zip(rows, calls):
        want = perplexity(fold_lm(m, 0.0, {g: 0.5 for g in gids}).model, tokens,
                          max_windows=10)["perplexity"]
        assert r["perplexity"] == pytest.approx(want, rel=1e-6)
        assert r["delta"] == pytest.approx(want - base, rel=1e-6) and r["relative"] == pytest.approx(want / base)
    same = layer_sensitivity(m, tokens, lambda model, gids: model, max_windows=10, base=base)
    assert all(r["delta"] == pytest.approx(0.0, abs=1e-9) for r in same)
