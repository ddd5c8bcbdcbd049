"""Language-model research: clustering candidates, data-free repairs, calibration baselines, the paper-shaped table.

Parts (``--part``):

``train``    trains the unshipped research models (:data:`UNSHIPPED`) into ``benchmarks/checkpoints/NAME/``
             (gitignored; re-created by this command, deterministic for a torch build and thread count).
``cluster``  clustering candidates x every model x ratios 0.1-0.5 x seeds 0-2 -> perplexity.
``repair``   data-free repairs and the calibration baselines (wanda_sp, flap) at 0.2 / 0.3 / 0.5.
``table``    the paper-shaped table (method, data used, perplexity, local zero-shot tasks, average).

Results go to ``benchmarks/results/lm_research.{md,json}`` (each part updates its own section).
Run with ``OMP_NUM_THREADS=1 nice -n 5 python benchmarks/research_lm.py --part NAME``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
RESULTS = ROOT / "benchmarks" / "results"
CHECKPOINTS = ROOT / "benchmarks" / "checkpoints"

_RECIPE = {"seed": 0, "steps": 2000, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "min_lr_frac": 0.1,
           "warmup_steps": 50, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0, "optimizer": "AdamW",
           "schedule": "linear warm-up, then cosine to min_lr_frac·lr",
           "sampling": "random windows of seq_len+1 tokens from the joined training plays (seeded generator)"}

#: research models trained here and never shipped: one MHA and one GQA shape unlike the bundled demos
UNSHIPPED: dict[str, dict] = {
    "research-mha": {
        "description": "3-layer MHA Llama (hidden 96, 4 heads of 24, MLP 256, context 128) on 11 Shakespeare plays",
        "vocab_size": 2048, "train_set": "plays11",
        "config": {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "head_dim": 24, "max_position_embeddings": 128,
                   "rope_theta": 10000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
                   "attention_bias": False, "mlp_bias": False},
        "recipe": dict(_RECIPE),
    },
    "research-gqa": {
        "description": "3-layer GQA Llama (hidden 128, 8 query heads of 16, 2 KV heads, MLP 320, context 128) on "
                       "11 Shakespeare plays",
        "vocab_size": 2048, "train_set": "plays11",
        "config": {"hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 3, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128,
                   "rope_theta": 10000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
                   "attention_bias": False, "mlp_bias": False},
        "recipe": dict(_RECIPE),
    },
}


def part_train(names) -> None:
    import torch

    from foldviz.lm.train import train_preset

    torch.set_num_threads(1)
    for name in names:
        out = CHECKPOINTS / name
        train_preset(name, out, preset=UNSHIPPED[name], log=lambda s: print(s, flush=True))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", required=True, choices=["train", "cluster", "repair", "table"])
    p.add_argument("--models", nargs="*", default=None)
    a = p.parse_args(argv)
    if a.part == "train":
        part_train(a.models or list(UNSHIPPED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
