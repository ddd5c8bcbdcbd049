"""The channel groups of a decoder language model with the Llama layout (Llama, Mistral, Qwen2, Qwen3, Gemma).

Layout: ``model.model.layers[i].mlp.{gate,up,down}_proj`` and ``model.model.layers[i].self_attn.{q,k,v,o}_proj``.
Per decoder layer two groups, described exactly like a vision model's channel groups
(:class:`foldviz.groups.ChannelGroup` with members), so that features, clustering and the merge rule are the engine's:

``model.layers.{i}.mlp`` — the MLP intermediate neurons
    neuron j owns gate row j, up row j (and their biases) on the producing side and down column j on the consuming
    side. Folding averages the producing rows of a cluster and sums its down columns.
``model.layers.{i}.self_attn`` — the query heads
    head h owns ``head_dim`` rows of q_proj (and of k_proj/v_proj when every head has its own KV head, MHA) and
    ``head_dim`` columns of o_proj. With grouped-query attention the heads are clustered **within each KV group**
    (``partitions`` = KV heads) and the same number is kept in every KV group, so the model stays a plain GQA model;
    k/v and the per-head q/k norms (Qwen3, Gemma 3) are shared and untouched. ``head_dim`` is never split, so RoPE
    acts on whole heads as before.

The residual width (embeddings, norms, every o/down output, lm_head) is listed as one group that is never folded.
Fused projections (``qkv_proj``, ``gate_up_proj`` ...) and mixture-of-experts MLPs are refused with
:class:`UnsupportedLMError`.
"""
from __future__ import annotations

from torch import nn

from ..groups import ChannelGroup, GroupGraph, Member

__all__ = ["UnsupportedLMError", "find_lm_groups", "decoder_layers", "attn_shape", "HIDDEN_GROUP_ID",
           "layer_sizes", "is_uniform", "sync_config", "config_problem", "SUPPORTED_MODEL_TYPES", "MOE_HINTS"]

HIDDEN_GROUP_ID = "model.hidden"
#: the transformers model types whose layout foldviz knows (others with the same layout also fold)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_FUSED = ("qkv_proj", "gate_up_proj", "W_pack", "query_key_value", "c_attn", "Wqkv")
#: module / config names that mark a mixture-of-experts model
MOE_HINTS = ("experts", "block_sparse_moe", "router", "shared_expert", "num_local_experts", "num_experts")


# every group gets its own clustering seed (plan.seed + offset; KV group j of a heads group adds j)
SEED_STRIDE, HEADS_SEED_OFFSET = 1009, 500


class UnsupportedLMError(ValueError):
    """The model is not a decoder with the Llama layout; the message says what is supported."""


SUPPORTED_TEXT = ("decoders with separate q/k/v/o and gate/up/down projections (Llama, Mistral, Qwen2, Qwen3, "
                  "Gemma)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a ``*ForCausalLM`` (or ``model.layers`` of a bare decoder)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedLMError(f"{type(model).__name__} has no model.layers decoder stack; foldviz folds "
                                 f"{SUPPORTED_TEXT}")
    return layers


def _linear(m, name):
    sub = getattr(m, name, None)
    return sub if isinstance(sub, nn.Linear) else None


def attn_shape(attn: nn.Module, config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of one attention module, read from its weights."""
    hd = int(getattr(attn, "head_dim", 0) or getattr(config, "head_dim", 0)
             or config.hidden_size // config.num_attention_heads)
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd, hd


def _check_fused(model: nn.Module) -> None:
    for name, _mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in _FUSED:
            raise UnsupportedLMError(f"{type(model).__name__} uses a fused projection ({name}); foldviz folds "
                                     f"{SUPPORTED_TEXT}")


def _rows(n: int, per: int = 1) -> tuple[list[int], list[int]]:
    """idxs / root_idxs of ``n * per`` consecutive rows, ``per`` for each unit."""
    return list(range(n * per)), [i // per for i in range(n * per)]


def _member(name: str, side: str, n: int, per: int = 1) -> Member:
    idxs, roots = _rows(n, per)
    return Member(name, side, "Linear", idxs, roots)


def _mlp_group(pre: str, i: int, mlp: nn.Module | None) -> ChannelGroup:
    gid = f"{pre}.mlp"
    g, u, d = (_linear(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) if mlp is not None else (None,) * 3

    def other(reason: str) -> ChannelGroup:
        return ChannelGroup(gid, 0, [], [], False, reason, "Linear", None, False, [], "neuron", 1, i, "other")

    if mlp is None:
        return other("layer has no .mlp module")
    if any(hasattr(mlp, a) for a in MOE_HINTS):
        return other(f"mixture-of-experts MLP ({type(mlp).__name__}) is not folded")
    if g is None or u is None or d is None:
        return other(f"{type(mlp).__name__} lacks separate gate_proj/up_proj/down_proj Linear layers")
    if not (g.out_features == u.out_features == d.in_features):
        return other("gate/up/down widths disagree")
    n = g.out_features
    members = [_member(f"{pre}.mlp.gate_proj", "out", n), _member(f"{pre}.mlp.up_proj", "out", n),
               _member(f"{pre}.mlp.down_proj", "in", n)]
    per_unit = g.in_features + u.in_features + d.out_features + (g.bias is not None) + (u.bias is not None)
    reason = None if n >= 2 else "a single neuron cannot be folded"
    return ChannelGroup(gid, n, [f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj"], [f"{pre}.mlp.down_proj"],
                        reason is None, reason, "Linear", None, False, members, "neuron", 1, i, "mlp",
                        {"feature_dim": per_unit, "params_per_unit": per_unit, "seed_offset": SEED_STRIDE * i})


def _heads_group(pre: str, i: int, attn: nn.Module | None, config) -> ChannelGroup:
    gid = f"{pre}.self_attn"
    projs = [_linear(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] if attn is not None else [None]

    def other(reason: str) -> ChannelGroup:
        return ChannelGroup(gid, 0, [], [], False, reason, "Linear", None, False, [], "head", 1, i, "other")

    if attn is None or any(p is None for p in projs):
        return other("no self_attn with separate q_proj/k_proj/v_proj/o_proj Linear layers")
    q, k, v, o = projs
    nq, nkv, hd = attn_shape(attn, config)
    if nq * hd != q.out_features or nkv * hd != k.out_features or nkv * hd != v.out_features \
            or o.in_features != nq * hd or nkv == 0 or nq % nkv:
        return other(f"projection shapes do not split into heads of {hd} (q {q.out_features}, k {k.out_features}, "
                     f"o in {o.in_features})")
    mha = nq == nkv
    producers = [f"{pre}.self_attn.q_proj"] + ([f"{pre}.self_attn.k_proj", f"{pre}.self_attn.v_proj"] if mha else [])
    members = [_member(p, "out", nq, hd) for p in producers] + [_member(f"{pre}.self_attn.o_proj", "in", nq, hd)]
    per = nq if mha else nq // nkv
    per_head = hd * q.in_features * (3 if mha else 1) + hd * o.out_features
    per_head += hd * sum(lin.bias is not None for lin in ((q, k, v) if mha else (q,)))
    note = "MHA: whole heads (q, k, v mean; o sum)" if mha else \
        f"GQA: {per} query heads per KV group, the same number kept in each of the {nkv} KV groups"
    if hasattr(attn, "q_norm"):
        note += "; the per-head q/k norms are shared and untouched"
    reason = None if per >= 2 else "one query head per KV group"
    return ChannelGroup(gid, nq, producers, [f"{pre}.self_attn.o_proj"], reason is None, reason, "Linear", None,
                        False, members, "head", 1 if mha else nkv, i, "heads",
                        {"kv_groups": 1 if mha else nkv, "heads_per_kv": per, "head_dim": hd, "mha": mha,
                         "feature_dim": per_head, "params_per_unit": per_head, "note": note,
                         "seed_offset": SEED_STRIDE * i + HEADS_SEED_OFFSET})


def find_lm_groups(model: nn.Module) -> GroupGraph:
    """The channel groups of a Llama-layout decoder (see the module docstring); raises UnsupportedLMError."""
    _check_fused(model)
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedLMError(f"{type(model).__name__} has no .config; pass a transformers *ForCausalLM model")
    layers = decoder_layers(model)
    hidden = int(config.hidden_size)
    groups = [ChannelGroup(HIDDEN_GROUP_ID, hidden, [], [], False,
                           "the residual stream width is never folded: every layer, the embeddings, the norms and "
                           "lm_head share it", "Embedding", None, False, [], "channel", 1, None, "other")]
    for i, layer in enumerate(layers):
        pre = f"model.layers.{i}"
        groups.append(_mlp_group(pre, i, getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)))
        groups.append(_heads_group(pre, i, getattr(layer, "self_attn", None), config))
    return GroupGraph(groups, None, model, ["lm_head"], kind="lm")


# ---------------------------------------------------------------------------------------------------------------
# sizes and config
# ---------------------------------------------------------------------------------------------------------------
def layer_sizes(model: nn.Module) -> list[dict]:
    """Per decoder layer: intermediate_size, num_attention_heads, num_key_value_heads, head_dim (from the weights)."""
    out = []
    for layer in decoder_layers(model):
        nq, nkv, hd = attn_shape(layer.self_attn, model.config)
        out.append({"intermediate_size": int(layer.mlp.gate_proj.out_features), "num_attention_heads": int(nq),
                    "num_key_value_heads": int(nkv), "head_dim": int(hd)})
    return out


def is_uniform(sizes: list[dict]) -> bool:
    return all(s == sizes[0] for s in sizes)


def config_problem(config, **changes) -> str:
    """Why transformers would refuse ``config`` with ``changes`` applied ("" when it validates).

    transformers' ``LlamaConfig`` requires ``hidden_size % num_attention_heads == 0`` even with an explicit
    ``head_dim``; other model types do not. Checked on a copy, so nothing changes.
    """
    import copy

    cfg = copy.deepcopy(config)
    try:
        for k, v in changes.items():
            setattr(cfg, k, v)
        validate = getattr(cfg, "validate", None)
        if validate is not None:
            validate()
    except Exception as e:  # noqa: BLE001 - huggingface_hub's StrictDataclassClassValidationError and friends
        msg = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        text = msg[-1] if msg else type(e).__name__
        return (text.split(": ", 1)[1] if text.startswith("ValueError: ") else text)[:200]
    return ""


def sync_config(model: nn.Module) -> bool:
    """Write the layers' sizes into ``model.config`` and each attention/MLP module; True when all layers agree.

    When layers differ the config keeps the largest sizes and ``config.foldviz_layers`` the per-layer ones.
    """
    sizes = layer_sizes(model)
    cfg = model.config
    for layer, s in zip(decoder_layers(model), sizes):
        attn, mlp = layer.self_attn, layer.mlp
        attn.num_key_value_groups = s["num_attention_heads"] // s["num_key_value_heads"]
        attn.head_dim = s["head_dim"]
        for attr, key in (("num_heads", "num_attention_heads"), ("num_attention_heads", "num_attention_heads"),
                          ("num_key_value_heads", "num_key_value_heads")):
            if hasattr(attn, attr):
                setattr(attn, attr, s[key])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = s["intermediate_size"]
    uniform = is_uniform(sizes)
    cfg.intermediate_size = max(s["intermediate_size"] for s in sizes)
    cfg.num_attention_heads = max(s["num_attention_heads"] for s in sizes)
    cfg.num_key_value_heads = max(s["num_key_value_heads"] for s in sizes)
    cfg.head_dim = sizes[0]["head_dim"]
    if uniform:
        if hasattr(cfg, "foldviz_layers"):
            delattr(cfg, "foldviz_layers")
    else:
        cfg.foldviz_layers = sizes
    return uniform
