"""Checkpoints the repair research trains for itself and foldviz does not ship (they live in benchmarks/checkpoints/,
which git ignores): other architectures and input sizes than the bundled demos, trained deterministically on the
digits (upsampled) with foldviz.train's recipe, so one command re-creates the very same weights.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoints.py                 # every checkpoint (minutes)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoints.py --only x-vgg-bn

:func:`load_checkpoint` returns a :class:`foldviz.zoo.LoadedModel` (training it first when it is missing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHECKPOINT_DIR = ROOT / "benchmarks" / "checkpoints"

#: name -> foldviz.train preset (architecture, kwargs, input shape, recipe overrides)
CHECKPOINTS: dict[str, dict] = {
    "x-resnet-deep": {
        "arch": "DigitsResNet",
        "kwargs": {"widths": [24, 48, 96], "blocks": [3, 3, 3], "num_classes": 10, "in_channels": 1},
        "input_shape": [1, 16, 16],
        "recipe": {"epochs": 12},
        "description": "deeper CIFAR-style ResNet (BasicBlocks 3-3-3, 18 convs in blocks, widths 24-48-96) on 16x16 "
                       "digits",
    },
    "x-vgg-bn": {
        "arch": "DigitsVGG",
        "kwargs": {"cfg": [32, 32, "M", 64, 64, "M", 128, 128, "M", 256], "hidden": 256, "num_classes": 10,
                   "in_channels": 1, "input_size": 16, "dropout": 0.3},
        "input_shape": [1, 16, 16],
        "recipe": {"epochs": 15},
        "description": "VGG with BatchNorm (7 convs, 4 stages) and a hidden FC layer, on 16x16 digits",
    },
    "x-mobilenet-v2": {
        "arch": "torchvision:mobilenet_v2",
        "kwargs": {"num_classes": 10, "cifar_stem": True},
        "input_shape": [3, 16, 16],
        # batch 100: with 64, every epoch ends on a 3-sample batch, whose BatchNorm statistics at the last stages'
        # 1x1 resolution are 3 values: MobileNetV2 then never left chance level (lr 0.01-0.05)
        "recipe": {"epochs": 15, "lr": 0.03, "weight_decay": 4e-5, "batch_size": 100},
        "description": "torchvision MobileNetV2 (inverted residuals, depthwise convs, ReLU6) with a stride-1 stem, "
                       "on 3x16x16 digits",
    },
    # the resolution study: a small VGG-BN per input size (one max-pool per stage, as large-input nets downsample)
    "x-vgg-64px": {
        "arch": "DigitsVGG",
        "kwargs": {"cfg": [16, "M", 32, "M", 64, "M", 64, "M"], "hidden": 128, "num_classes": 10, "in_channels": 1,
                   "input_size": 64, "dropout": 0.3},
        "input_shape": [1, 64, 64],
        "recipe": {"epochs": 8},
        "description": "small VGG-BN (4 convs, each followed by a max-pool) on digits upsampled to 64x64",
    },
    "x-vgg-128px": {
        "arch": "DigitsVGG",
        "kwargs": {"cfg": [16, "M", 32, "M", 64, "M", 64, "M", 64, "M"], "hidden": 128, "num_classes": 10,
                   "in_channels": 1, "input_size": 128, "dropout": 0.3},
        "input_shape": [1, 128, 128],
        "recipe": {"epochs": 5},
        "description": "the same VGG-BN with one more stage, on digits upsampled to 128x128",
    },
}
MAIN = ("x-resnet-deep", "x-vgg-bn", "x-mobilenet-v2")


def train(name: str, out_dir: Path = CHECKPOINT_DIR, progress: bool = True) -> dict:
    """Train checkpoint ``name`` into ``out_dir`` (deterministic: foldviz.train's seed, 1 thread)."""
    from foldviz.train import train_preset

    def report(epoch, total, stats):
        if progress:
            print(f"[{name}] epoch {epoch}/{total} loss {stats['loss']:.4f} train acc {stats['train_accuracy']:.4f}",
                  flush=True)

    return train_preset(name, out_dir=out_dir, preset=CHECKPOINTS[name], progress=report)


def load_checkpoint(name: str, out_dir: Path = CHECKPOINT_DIR):
    """The trained checkpoint ``name`` as a LoadedModel (trained first when its files are missing)."""
    from foldviz.checkpoints import apply_state_dict, load_state_dict_file
    from foldviz.zoo import LoadedModel, build_architecture

    card_path, weights = out_dir / f"{name}.json", out_dir / f"{name}.safetensors"
    if not (card_path.exists() and weights.exists()):
        train(name, out_dir)
    card = json.loads(card_path.read_text())
    model = build_architecture(card)
    apply_state_dict(model, load_state_dict_file(weights), label=weights.name)
    return LoadedModel(model.float().eval(), f"checkpoint:{name}", card, tuple(card["input_shape"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(CHECKPOINTS), default=list(CHECKPOINTS))
    ap.add_argument("--force", action="store_true", help="train again even when the files exist")
    args = ap.parse_args(argv)
    for name in args.only:
        if args.force or not (CHECKPOINT_DIR / f"{name}.safetensors").exists():
            card = train(name)
            print(f"[{name}] test accuracy {card['test_accuracy']:.4f}, {card['params']:,} parameters, "
                  f"{card['trained_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
