"""Perplexity and greedy generation for causal LMs.

Perplexity protocol (the Wanda convention used by the model-folding paper for WikiText-2):

1. the documents are joined with ``"\\n\\n"`` and tokenised once;
2. the token stream is cut into ``n = numel // seq_len`` non-overlapping windows of ``seq_len`` tokens (the model's
   context length, ``max_position_embeddings``, unless given); the remainder is dropped;
3. each window is scored independently (no carried-over context): mean next-token cross-entropy over its
   ``seq_len - 1`` predictions, multiplied by ``seq_len`` (the Wanda NLL);
4. ``ppl = exp(Σ NLL / (n · seq_len))`` — i.e. the exponential of the mean of the per-window mean losses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["PROTOCOL", "perplexity", "generate", "mlp_variances", "mlp_variance_ratios"]

PROTOCOL = ("Wanda convention: documents joined with '\\n\\n', tokenised once, cut into numel//seq_len "
            "non-overlapping windows of seq_len = context length (remainder dropped); each window scored "
            "independently; ppl = exp(mean over windows of the mean next-token CE over seq_len-1 predictions)")


#: float32 logits held at once while scoring (the batch shrinks for long contexts and large vocabularies)
LOGIT_BYTES = 256 * 1024 * 1024


@torch.no_grad()
def perplexity(model, tokens, *, seq_len: int | None = None, batch_size: int = 8, max_windows: int | None = None,
               device=None, progress=None) -> dict:
    """Perplexity of ``model`` on a 1-D token tensor (see the module docstring for the protocol).

    ``progress(done, total)`` is called with window counts. Returns ``{"perplexity", "nll", "windows",
    "seq_len", "tokens_scored", "protocol"}``.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if seq_len is None:
        seq_len = int(getattr(model.config, "max_position_embeddings"))
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    n = tokens.numel() // seq_len
    if max_windows is not None:
        n = min(n, int(max_windows))
    if max_windows is not None and int(max_windows) < 1:
        raise ValueError(f"the number of windows must be at least 1, got {max_windows}")
    if n < 1:
        raise ValueError(f"need at least {seq_len} tokens for one window, got {tokens.numel()}")
    vocab = int(getattr(model.config, "vocab_size", 1))
    batch_size = max(1, min(int(batch_size), LOGIT_BYTES // max(1, seq_len * vocab * 4)))
    dev = device or next(model.parameters()).device
    windows = tokens[: n * seq_len].view(n, seq_len)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, n, batch_size):
            x = windows[i:i + batch_size].to(dev)
            logits = model(input_ids=x, use_cache=False).logits.float()
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                 reduction="none").view(x.size(0), -1).mean(1)
            total += float((ce * seq_len).sum())
            if progress is not None:
                progress(min(n, i + batch_size), n)
    finally:
        model.train(was_training)
    nll = total / (n * seq_len)
    return {"perplexity": math.exp(nll), "nll": nll, "windows": n, "seq_len": seq_len,
            "tokens_scored": n * (seq_len - 1), "protocol": PROTOCOL}


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` (deterministic), returned as text without the prompt.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (``encode(text).ids`` / ``decode(ids)``) or anything with
    ``encode(text) -> list[int]`` and ``decode(ids) -> str``. The context is truncated to the model's window.
    """
    enc = tokenizer.encode(prompt)
    ids = list(getattr(enc, "ids", enc))
    ctx = int(getattr(model.config, "max_position_embeddings", 2048))
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    new = []
    try:
        for _ in range(max_new_tokens):
            x = torch.tensor([(ids + new)[-ctx:]], device=dev)
            nxt = int(model(input_ids=x, use_cache=False).logits[0, -1].argmax())
            new.append(nxt)
    finally:
        model.train(was_training)
    return tokenizer.decode(new)


@torch.no_grad()
def mlp_variances(model, tokens, *, seq_len: int | None = None, max_tokens: int = 4096) -> dict[int, float]:
    """Variance of each decoder layer's MLP output over the first ``max_tokens`` tokens (whole windows)."""
    from .groups import decoder_layers

    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    seq = int(seq_len or getattr(model.config, "max_position_embeddings"))
    n = max(1, min(tokens.numel() // seq, max(1, int(max_tokens) // seq)))
    x = tokens[: n * seq].view(n, seq).to(next(model.parameters()).device)
    out, hooks = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        hooks.append(layer.mlp.register_forward_hook(lambda _m, _i, o, i=i: out.__setitem__(i, float(o.float().var()))))
    was = model.training
    try:
        model.eval()(input_ids=x, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return out


def mlp_variance_ratios(original, folded, tokens, *, max_tokens: int = 4096, base: dict | None = None) -> list[dict]:
    """Per decoder layer: Var(folded MLP output) / Var(original MLP output) on the same tokens (each model runs its
    own residual stream). Below 1: the merged MLP's contribution shrank; above 1: it grew. ``base``: the original's
    :func:`mlp_variances`, if already measured."""
    b = base if base is not None else mlp_variances(original, tokens, max_tokens=max_tokens)
    f = mlp_variances(folded, tokens, max_tokens=max_tokens)
    return [{"layer": f"layer {i} MLP", "ratio": f[i] / b[i] if b[i] > 0 else None} for i in sorted(b)]
