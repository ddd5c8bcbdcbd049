"""Tiny models of every kind, built here (fast, offline), and what the invariant tests need to know about them."""
from __future__ import annotations

import copy
import os

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 61   # vocabulary of the tiny language models


def tiny_llama(nq=4, nkv=2, inter=24, layers=2, hidden=32, hd=8, seed=0, config_cls=None, **kw):
    """A random decoder of ``config_cls`` (default LlamaConfig) whose weights all matter (std 0.3)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = (config_cls or LlamaConfig)(vocab_size=V, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=nq, num_key_value_heads=nkv,
                                      head_dim=hd, max_position_embeddings=16, tie_word_embeddings=False, **kw)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m


def save_hf(model, path) -> str:
    """Save a transformers model as a local ``hf:DIR`` spec (safetensors)."""
    model.save_pretrained(str(path))
    return f"hf:{path}"


def tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@torch.no_grad()
def duplicate_mlp_neurons(model):
    """Every MLP neuron twice (gate/up rows copied, down columns halved): the same function with 2x neurons."""
    from foldviz.lm.groups import decoder_layers, sync_config

    m = copy.deepcopy(model)
    for layer in decoder_layers(m):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)
            new = torch.nn.Linear(lin.in_features, 2 * lin.out_features, bias=lin.bias is not None)
            new.weight.copy_(torch.cat([lin.weight, lin.weight]))
            setattr(mlp, name, new)
        d = mlp.down_proj
        new = torch.nn.Linear(2 * d.in_features, d.out_features, bias=d.bias is not None)
        new.weight.copy_(torch.cat([d.weight / 2, d.weight / 2], 1))
        if d.bias is not None:
            new.bias.copy_(d.bias)
        mlp.down_proj = new
    sync_config(m)
    return m


@torch.no_grad()
def duplicate_query_heads(model):
    """Every query head twice, inside its own KV group (q rows copied, o columns halved): the same function. In MHA
    (one query head per KV head) the head's k and v rows are copied too, so the copy stays its own KV head."""
    from foldviz.lm.groups import attn_shape, decoder_layers, sync_config

    m = copy.deepcopy(model)
    for layer in decoder_layers(m):
        attn = layer.self_attn
        nq, nkv, hd = attn_shape(attn, m.config)
        per = nq // nkv
        # new head order, KV group by KV group: each original head followed by its copy
        order = np.repeat(np.arange(nq).reshape(nkv, per), 2, axis=1).reshape(-1)
        rows = torch.as_tensor((order[:, None] * hd + np.arange(hd)).reshape(-1))
        q = attn.q_proj
        nqw = torch.nn.Linear(q.in_features, 2 * q.out_features, bias=q.bias is not None)
        nqw.weight.copy_(q.weight[rows])
        if q.bias is not None:
            nqw.bias.copy_(q.bias[rows])
        attn.q_proj = nqw
        if nq == nkv:   # MHA: duplicate whole heads
            for name in ("k_proj", "v_proj"):
                lin = getattr(attn, name)
                new = torch.nn.Linear(lin.in_features, 2 * lin.out_features, bias=lin.bias is not None)
                new.weight.copy_(lin.weight[rows])
                if lin.bias is not None:
                    new.bias.copy_(lin.bias[rows])
                setattr(attn, name, new)
        o = attn.o_proj
        now = torch.nn.Linear(2 * o.in_features, o.out_features, bias=o.bias is not None)
        now.weight.copy_(o.weight[:, rows] / 2)
        if o.bias is not None:
            now.bias.copy_(o.bias)
        attn.o_proj = now
    sync_config(m)
    return m
