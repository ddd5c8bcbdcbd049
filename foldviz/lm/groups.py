"""Structural adapter for decoder-only LMs with the Llama layout (Llama, Mistral, Qwen2, Qwen3 in transformers).

Layout: ``model.model.layers[i].mlp.{gate,up,down}_proj`` and ``model.model.layers[i].self_attn.{q,k,v,o}_proj``.
Per decoder layer the adapter emits two channel groups with stable ids:

``model.layers.{i}.mlp`` — the MLP intermediate neurons
    feature of neuron j = gate row j ‖ up row j ‖ down column j (‖ gate/up bias j). Folding takes the cluster
    **mean** of gate and up rows (and biases) and the **sum** of down columns.
``model.layers.{i}.self_attn`` — the query heads
    * GQA (``num_key_value_heads < num_attention_heads``): query heads are clustered **within each KV group** and
      the same number of query heads is kept in every KV group, so the q→kv mapping stays a plain
      ``repeat_kv``. Feature of a head = its q_proj row block (‖ q bias block) ‖ its o_proj column block.
      q blocks take the cluster mean, o blocks the sum; k/v are untouched.
    * MHA (every head its own KV group): whole heads are clustered; q, k and v blocks take the mean, o the sum.
    head_dim is never split, so RoPE and q/k norms (Qwen3) act on whole heads as before.

The hidden/residual width (embeddings, norms, o_proj/down_proj outputs, lm_head) is never folded; it is listed as a
non-foldable group with the reason. MoE MLPs and unrecognised modules are listed as non-foldable with the reason.
Fused projections (``qkv_proj``, ``gate_up_proj``, ``W_pack``, ``query_key_value``) are refused outright with
:class:`UnsupportedLMError`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

__all__ = ["LMGroup", "UnsupportedLMError", "find_lm_groups", "decoder_layers", "attn_shape", "HIDDEN_GROUP_ID"]

HIDDEN_GROUP_ID = "model.hidden"
_FUSED = ("qkv_proj", "gate_up_proj", "W_pack", "query_key_value", "c_attn", "Wqkv")
_MOE = ("experts", "block_sparse_moe", "router", "shared_expert")


class UnsupportedLMError(ValueError):
    """The model is not a decoder with the Llama layout (or uses fused projections); the message says why."""


@dataclass
class LMGroup:
    id: str
    kind: str                     # "mlp" | "heads" | "hidden" | "other"
    layer: int | None
    n: int                        # units in the group (neurons or query heads)
    unit: str                     # "neuron" | "head" | "channel"
    foldable: bool
    reason: str = ""              # why it is not foldable (empty when foldable)
    members: list[str] = field(default_factory=list)   # "param_name:side" (side = mean | sum | untouched)
    feature_dim: int = 0
    kv_groups: int = 1            # heads: number of KV groups the heads are clustered within
    heads_per_kv: int = 1         # heads: query heads per KV group before folding
    head_dim: int = 0
    mha: bool = False
    params_per_unit: int = 0      # parameters removed per unit folded away
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a ``*ForCausalLM`` (or ``model.layers`` of a bare decoder)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedLMError(f"{type(model).__name__} has no model.layers decoder stack; only decoders with the "
                                 "Llama layout (Llama, Mistral, Qwen2, Qwen3) are supported")
    return layers


def _linear(m, name):
    sub = getattr(m, name, None)
    return sub if isinstance(sub, nn.Linear) else None


def attn_shape(attn: nn.Module, config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of one attention module, read from its weights."""
    hd = int(getattr(attn, "head_dim", 0) or getattr(config, "head_dim", 0)
             or config.hidden_size // config.num_attention_heads)
    nq = attn.q_proj.out_features // hd
    nkv = attn.k_proj.out_features // hd
    return nq, nkv, hd


def _check_fused(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _FUSED:
            raise UnsupportedLMError(
                f"{type(model).__name__} uses a fused projection ({name}); foldviz folds only separate "
                "q/k/v/o and gate/up/down projections (Llama, Mistral, Qwen2, Qwen3)")


def find_lm_groups(model: nn.Module) -> list[LMGroup]:
    """Channel groups of a Llama-layout decoder (see the module docstring); raises UnsupportedLMError."""
    _check_fused(model)
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedLMError(f"{type(model).__name__} has no .config; pass a transformers *ForCausalLM model")
    layers = decoder_layers(model)
    hidden = int(config.hidden_size)
    groups = [LMGroup(HIDDEN_GROUP_ID, "hidden", None, hidden, "channel", False,
                      reason="the residual stream width is never folded: every layer, the embeddings, the norms "
                             "and lm_head share it (folding-spec §6)")]
    for i, layer in enumerate(layers):
        pre = f"model.layers.{i}"
        # --- MLP -------------------------------------------------------------------------------------------
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        gid = f"{pre}.mlp"
        g, u, d = (_linear(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) if mlp is not None else (None,) * 3
        if mlp is None:
            groups.append(LMGroup(gid, "other", i, 0, "neuron", False, reason="layer has no .mlp module"))
        elif any(hasattr(mlp, a) for a in _MOE):
            groups.append(LMGroup(gid, "other", i, 0, "neuron", False,
                                  reason=f"mixture-of-experts MLP ({type(mlp).__name__}): experts and router "
                                         "are not folded"))
        elif g is None or u is None or d is None:
            groups.append(LMGroup(gid, "other", i, 0, "neuron", False,
                                  reason=f"{type(mlp).__name__} lacks separate gate_proj/up_proj/down_proj Linear layers"))
        elif not (g.out_features == u.out_features == d.in_features):
            groups.append(LMGroup(gid, "other", i, 0, "neuron", False, reason="gate/up/down widths disagree"))
        else:
            n = g.out_features
            members = [f"{pre}.mlp.gate_proj.weight:mean", f"{pre}.mlp.up_proj.weight:mean",
                       f"{pre}.mlp.down_proj.weight:sum"]
            extra = 0
            for nm, lin in (("gate_proj", g), ("up_proj", u)):
                if lin.bias is not None:
                    members.append(f"{pre}.mlp.{nm}.bias:mean")
                    extra += 1
            if d.bias is not None:
                members.append(f"{pre}.mlp.down_proj.bias:untouched")
            groups.append(LMGroup(gid, "mlp", i, n, "neuron", True, members=members,
                                  feature_dim=g.in_features + u.in_features + d.out_features + extra,
                                  params_per_unit=g.in_features + u.in_features + d.out_features + extra))
        # --- attention -------------------------------------------------------------------------------------
        attn = getattr(layer, "self_attn", None)
        gid = f"{pre}.self_attn"
        projs = [_linear(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] if attn is not None else [None]
        if attn is None or any(p is None for p in projs):
            groups.append(LMGroup(gid, "other", i, 0, "head", False,
                                  reason="no self_attn with separate q_proj/k_proj/v_proj/o_proj Linear layers"))
            continue
        q, k, v, o = projs
        nq, nkv, hd = attn_shape(attn, config)
        if nq * hd != q.out_features or nkv * hd != k.out_features or nkv * hd != v.out_features \
                or o.in_features != nq * hd or nkv == 0 or nq % nkv:
            groups.append(LMGroup(gid, "other", i, 0, "head", False,
                                  reason=f"projection shapes do not split into heads of {hd} "
                                         f"(q {q.out_features}, k {k.out_features}, o in {o.in_features})"))
            continue
        mha = nq == nkv
        members = [f"{pre}.self_attn.q_proj.weight:mean", f"{pre}.self_attn.o_proj.weight:sum"]
        if q.bias is not None:
            members.append(f"{pre}.self_attn.q_proj.bias:mean")
        if mha:
            members += [f"{pre}.self_attn.k_proj.weight:mean", f"{pre}.self_attn.v_proj.weight:mean"]
            members += [f"{pre}.self_attn.{p}_proj.bias:mean" for p, lin in (("k", k), ("v", v)) if lin.bias is not None]
        else:
            members += [f"{pre}.self_attn.k_proj.weight:untouched", f"{pre}.self_attn.v_proj.weight:untouched"]
        if o.bias is not None:
            members.append(f"{pre}.self_attn.o_proj.bias:untouched")
        n_in = q.in_features
        per_head = hd * n_in * (3 if mha else 1) + hd * o.out_features
        per_head += hd * sum(lin.bias is not None for lin in ((q, k, v) if mha else (q,)))
        note = "MHA: whole heads (q, k, v mean; o sum)" if mha else \
            f"GQA: {nq // nkv} query heads per KV group, the same number kept in each of the {nkv} KV groups"
        if hasattr(attn, "q_norm"):
            note += "; q/k norms act per head and are shared, so they are untouched"
        groups.append(LMGroup(gid, "heads", i, nq, "head", nq // nkv > 1 or mha and nq > 1,
                              reason="" if (nq // nkv > 1 or (mha and nq > 1)) else "one query head per KV group",
                              members=members, feature_dim=per_head, kv_groups=1 if mha else nkv,
                              heads_per_kv=nq if mha else nq // nkv, head_dim=hd, mha=mha,
                              params_per_unit=per_head, note=note))
    return groups
