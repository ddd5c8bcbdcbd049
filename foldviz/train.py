"""Deterministic training of the bundled demo models on scikit-learn's 8×8 digits.

``train_preset("digits-resnet")`` rebuilds ``assets/models/digits-resnet.{safetensors,json}`` from scratch.
Command line: ``python -m foldviz train --preset NAME [--out DIR] [--epochs N]`` (wired by ``foldviz.cli``) or
``python -m foldviz.train --preset NAME|all`` directly.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch and the engine are imported inside the functions that train: `python -m foldviz --help` and
# argument errors must not pay for importing torch (under 1 s)

__all__ = ["PRESETS", "DEFAULT_RECIPE", "train_preset", "add_train_subparser", "run_train", "main"]

#: Recipe shared by all presets (individual presets may override entries).
DEFAULT_RECIPE = {
    "optimizer": "SGD",
    "lr": 0.05,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 5e-4,
    "epochs": 40,
    "batch_size": 64,
    "schedule": "per-step linear warm-up for min(warmup_epochs, epochs // 5) epochs, then cosine to 0",
    "warmup_epochs": 2,
    "augmentation": "random shift of up to ±1 pixel in x and y (zero padding)",
    "loss": "cross-entropy",
}

#: name → architecture, kwargs and recipe overrides.
PRESETS: dict[str, dict] = {
    "digits-resnet": {
        "arch": "DigitsResNet",
        "kwargs": {"widths": [32, 64, 128], "blocks": [2, 2, 2], "num_classes": 10, "in_channels": 1},
        "recipe": {"epochs": 30},
        "description": "CIFAR-style ResNet (BasicBlocks 2-2-2, widths 32-64-128) for 8×8 digits",
    },
    "digits-resnet-2x": {
        "arch": "DigitsResNet",
        "kwargs": {"widths": [64, 128, 256], "blocks": [2, 2, 2], "num_classes": 10, "in_channels": 1},
        "recipe": {"epochs": 30},
        "description": "The same ResNet at twice the width (64-128-256); wider networks fold better",
    },
    "digits-vgg": {
        "arch": "DigitsVGG",
        "kwargs": {"cfg": [32, 32, "M", 64, 64, "M", 128, 128], "hidden": 256, "num_classes": 10,
                   "in_channels": 1, "input_size": 8, "dropout": 0.3},
        "recipe": {"epochs": 40},
        "description": "VGG-style net with BatchNorm and a hidden FC layer on the flattened 128×2×2 features",
    },
    "digits-mlp": {
        "arch": "DigitsMLP",
        "kwargs": {"hidden": [512, 256, 128], "num_classes": 10, "in_features": 64},
        "recipe": {"epochs": 100, "lr": 0.02},
        "description": "MLP 64-512-256-128-10 with BatchNorm1d after every hidden Linear",
    },
    "digits-resnet18": {
        "arch": "DigitsResNet",
        "kwargs": {"widths": [16, 32, 64, 128], "blocks": [2, 2, 2, 2], "num_classes": 10, "in_channels": 3},
        "input_shape": [3, 32, 32],
        "recipe": {"epochs": 30},
        "description": "The paper's ResNet-18 (torchvision layout with the CIFAR stem: 3×3 stride-1 conv1, no "
                       "max-pool; BasicBlocks 2-2-2-2) at 1/4 width (16-32-64-128), on digits upsampled to 3×32×32",
    },
}

SEED = 0
NUM_THREADS = 1  # results depend on the intra-op thread count; 1 is reproducible everywhere


def _shift_batch(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Randomly translate each image by up to ``max_shift`` pixels (zero padding); x is (N, C, H, W) in [0, 1]."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    ni = torch.arange(n)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[ni, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@contextlib.contextmanager
def _deterministic(num_threads: int):
    import torch

    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def train_preset(name: str, out_dir: str | os.PathLike | None = None, epochs: int | None = None,
                 progress=None, preset: dict | None = None) -> dict:
    """Train demo preset ``name`` on the digits train split and write ``NAME.safetensors`` + ``NAME.json``.

    ``out_dir`` defaults to ``assets/models``.  ``epochs`` overrides the preset's epoch count. ``preset``: a
    preset of the same form as :data:`PRESETS`' values, for a model that is not bundled (e.g. the benchmarks'
    checkpoints); ``name`` then only names the files.
    ``progress(epoch, epochs, stats)`` is called after every epoch with ``stats = {"loss", "train_accuracy",
    "lr"}``.  Runs on CPU with a fixed seed, 1 thread and deterministic algorithms, so the same machine
    reproduces the same weights.  Returns the card (also written as JSON).
    """
    import torch
    import torch.nn.functional as F

    from .checkpoints import save_safetensors
    from .data import (DIGITS_SPLIT, tensor_transform, digits_arrays, digits_normalization, evaluate,
                       load_dataset, make_loader)
    from .metrics import count_params
    from .models import MODELS_DIR
    from .utils import set_seed, state_dict_hash
    from .zoo import build_architecture

    if preset is None:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        preset = PRESETS[name]
    recipe = {**DEFAULT_RECIPE, **preset.get("recipe", {})}
    if epochs is not None:
        if int(epochs) < 1:
            raise ValueError("epochs must be >= 1")
        recipe["epochs"] = int(epochs)
    out = Path(out_dir) if out_dir is not None else MODELS_DIR
    out.mkdir(parents=True, exist_ok=True)

    norm = digits_normalization()
    mean, std = norm["mean"][0], norm["std"][0]
    shape = tuple(int(v) for v in preset.get("input_shape", (1, 8, 8)))
    if shape[0] != 1:  # grey digits replicated over the channels: same statistics per channel
        norm = {"mean": norm["mean"] * shape[0], "std": norm["std"] * shape[0]}
    x_train, y_train = digits_arrays("train")
    x_test, _ = digits_arrays("test")
    card = {
        "name": name,
        "arch": preset["arch"],
        "kwargs": copy.deepcopy(preset["kwargs"]),
        "description": preset.get("description", ""),
        "input_shape": list(shape),
        "num_classes": int(preset["kwargs"].get("num_classes", 10)),
        "normalization": norm,
        "data": "digits",
        "split": {**DIGITS_SPLIT, "stratified": True, "n_train": int(len(x_train)), "n_test": int(len(x_test))},
        "recipe": recipe,
        "seed": SEED,
    }

    t0 = time.perf_counter()
    with _deterministic(NUM_THREADS):
        set_seed(SEED)
        model = build_architecture(card)
        opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                              weight_decay=recipe["weight_decay"], nesterov=recipe["nesterov"])
        bs = int(recipe["batch_size"])
        n = len(x_train)
        steps_per_epoch = math.ceil(n / bs)
        total_steps = steps_per_epoch * recipe["epochs"]
        # short runs (e.g. --epochs 2 in tests) skip most of the warm-up so that the cosine still anneals
        warmup_steps = steps_per_epoch * min(int(recipe["warmup_epochs"]), recipe["epochs"] // 5)
        gen = torch.Generator().manual_seed(SEED)
        step = 0
        for epoch in range(recipe["epochs"]):
            model.train()
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                if len(idx) < 2:  # BatchNorm needs more than one sample
                    continue
                lr = recipe["lr"] * _lr_factor(step, warmup_steps, total_steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                xb = _shift_batch(x_train[idx], gen)
                if shape != (1, 8, 8):  # upsample (and replicate channels) the way foldviz.data does at test time
                    xb = tensor_transform(xb, shape, None)
                xb = (xb - mean) / std
                yb = y_train[idx]
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(idx)
            if progress is not None:
                progress(epoch + 1, recipe["epochs"], {"loss": loss_sum / max(1, seen),
                                                       "train_accuracy": correct / max(1, seen), "lr": lr})
        model.eval()
        trained_seconds = time.perf_counter() - t0

        weights_path = out / f"{name}.safetensors"
        save_safetensors(model, weights_path)
        # Measure on what was written, through the same path users take (load -> digits test split).
        from .checkpoints import apply_state_dict, load_state_dict_file

        check = build_architecture(card)
        apply_state_dict(check, load_state_dict_file(weights_path))
        check.eval()
        res = evaluate(check, make_loader(load_dataset("digits", "test", card=card), batch_size=256))

    card.update({
        "test_accuracy": res.accuracy,
        "test_loss": res.loss,
        "params": count_params(check),
        "weights_sha256": state_dict_hash(check),
        "torch_version": torch.__version__.split("+")[0],
        "trained_seconds": round(trained_seconds, 1),
    })
    (out / f"{name}.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    return card


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def add_train_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on an ``argparse`` sub-parsers object; sets ``func=run_train``."""
    p = subparsers.add_parser("train", help="(re)train a bundled demo model on the 8×8 digits",
                              description="Deterministically (re)train a bundled demo model on scikit-learn's "
                                          "8×8 digits and write NAME.safetensors + NAME.json.")
    p.add_argument("--preset", required=True, choices=[*PRESETS, "all"], help="demo to train, or 'all'")
    p.add_argument("--out", default=None, help="output directory (default: the bundled assets/models)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's number of epochs")
    p.set_defaults(func=run_train)
    return p


def run_train(args) -> int:
    from .models import MODELS_DIR

    names = list(PRESETS) if args.preset == "all" else [args.preset]
    for name in names:
        def report(epoch, total, stats, _name=name):
            print(f"[{_name}] epoch {epoch:3d}/{total}  loss {stats['loss']:.4f}  "
                  f"train acc {stats['train_accuracy']:.4f}  lr {stats['lr']:.4f}", flush=True)

        card = train_preset(name, out_dir=args.out, epochs=args.epochs, progress=report)
        out = Path(args.out) if args.out else MODELS_DIR
        print(f"[{name}] test accuracy {card['test_accuracy']:.4f}  test loss {card['test_loss']:.4f}  "
              f"params {card['params']:,}  {card['trained_seconds']:.1f}s  -> {out / (name + '.safetensors')}",
              flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foldviz.train")
    sub = parser.add_subparsers(dest="command")
    add_train_subparser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
