"""Datasets, loaders and evaluation.

Dataset specs (see :func:`load_dataset`):

==========================  ==============================================================================
``digits``                  scikit-learn's bundled 8×8 handwritten digits (1797 images, no download), with
                            foldviz's fixed stratified split (25 % test, ``random_state=0``)
``cifar10:ROOT``            torchvision CIFAR-10 under ``ROOT`` (``ROOT/cifar-10-batches-py``)
``cifar100:ROOT``           torchvision CIFAR-100 under ``ROOT`` (``ROOT/cifar-100-python``)
``mnist:ROOT``              torchvision MNIST under ``ROOT`` (``ROOT/MNIST/raw``)
``fashionmnist:ROOT``       torchvision Fashion-MNIST under ``ROOT`` (``ROOT/FashionMNIST/raw``)
``svhn:ROOT``               torchvision SVHN under ``ROOT`` (``ROOT/train_32x32.mat``, ``ROOT/test_32x32.mat``)
``imagefolder:DIR``         torchvision ``ImageFolder`` (one sub-folder per class); ``DIR/train`` serves the
                            train split and ``DIR/val`` (or ``DIR/test``) the test split when they exist,
                            otherwise ``DIR`` serves both (see :func:`data_specs` for the overlap check)
==========================  ==============================================================================

*Honest data.* Repair/calibration inputs come from the train split, accuracy from the test split.
:func:`data_specs` resolves ``--data``/``--repair-data``/``--test-data`` into the two specs and refuses
(unless ``allow_overlap``) a repair folder that is the test folder or lies inside it (or the reverse), compared by
resolved real path.

*Loader workers.* File-backed datasets (image folders, torchvision datasets) are decoded by
:func:`default_workers` worker processes (from the CPU count; :func:`set_workers` overrides it, e.g. the CLI's
``--workers``); in-memory datasets are read in-process.

foldviz never downloads data: torchvision datasets are opened with ``download=False`` and a missing dataset
raises :class:`DataError` naming the exact path that was expected.

Inputs are transformed to what the model expects, taken from its card: ``input_shape`` (channels converted
grey↔RGB, resized / centre-cropped to size) and ``normalization`` (per-channel mean/std).  No augmentation.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .utils import resolve_device

__all__ = [
    "DataError",
    "DATASET_KINDS",
    "DIGITS_SPLIT",
    "load_dataset",
    "make_loader",
    "sample_inputs",
    "EvalResult",
    "evaluate",
    "digits_arrays",
    "digits_normalization",
    "default_card",
    "imagefolder_dir",
    "data_specs",
    "check_overlap",
    "default_workers",
    "set_workers",
]

#: The fixed split used for the bundled digits demos.
DIGITS_SPLIT = {"seed": 0, "test_fraction": 0.25}

#: dataset kind → (native input shape, default normalisation used when no card is given)
DATASET_KINDS: dict[str, tuple[tuple[int, int, int], dict | None]] = {
    "digits": ((1, 8, 8), None),  # stats of the train split, computed on demand
    "cifar10": ((3, 32, 32), {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}),
    "cifar100": ((3, 32, 32), {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}),
    "mnist": ((1, 28, 28), {"mean": [0.1307], "std": [0.3081]}),
    "fashionmnist": ((1, 28, 28), {"mean": [0.2860], "std": [0.3530]}),
    "svhn": ((3, 32, 32), {"mean": [0.4377, 0.4438, 0.4728], "std": [0.1980, 0.2010, 0.1970]}),
    "imagefolder": ((3, 224, 224), {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}),
}


class DataError(ValueError):
    """A dataset could not be opened or used; the message is meant for the user."""


# ----------------------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_SPLIT["test_fraction"], random_state=DIGITS_SPLIT["seed"], stratify=y
    )
    return x_tr, x_te, y_tr, y_te


def digits_arrays(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Raw digits images in [0, 1] shaped (N, 1, 8, 8) and int64 labels for ``split`` ("train" | "test")."""
    split = _check_split(split)
    x_tr, x_te, y_tr, y_te = _digits_split()
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def digits_normalization() -> dict:
    """Mean/std (one channel) of the digits train split after scaling pixels to [0, 1]."""
    x_tr = _digits_split()[0].astype(np.float64)
    return {"mean": [float(x_tr.mean())], "std": [float(x_tr.std())]}


# ----------------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------------
def default_card(kind: str) -> dict:
    """A minimal card (input_shape + normalization) describing ``kind``'s native inputs."""
    shape, norm = DATASET_KINDS[kind]
    if kind == "digits":
        norm = digits_normalization()
    return {"input_shape": list(shape), "normalization": norm}


def _target(card: dict | None, kind: str) -> tuple[tuple[int, int, int], dict | None]:
    if card is None:
        c = default_card(kind)
        return tuple(c["input_shape"]), c["normalization"]
    shape = card.get("input_shape")
    if not shape or len(shape) != 3:
        raise DataError(f"card has no usable input_shape (got {shape!r}); expected [C, H, W]")
    return tuple(int(s) for s in shape), card.get("normalization")


def _resize_side(h: int) -> int:
    # ImageNet convention (resize 256 → crop 224) for large inputs; plain resize for small ones.
    return int(math.floor(h / 0.875)) if h >= 128 else h


class _ConvertMode:
    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def _pil_transform(shape: tuple[int, int, int], norm: dict | None, native_hw: tuple[int, int] | None):
    from torchvision import transforms as T

    c, h, w = shape
    if c not in (1, 3):
        raise DataError(f"models with {c} input channels are not supported by the image datasets (need 1 or 3)")
    steps: list = [_ConvertMode("L" if c == 1 else "RGB")]
    if native_hw != (h, w):
        steps += [T.Resize(_resize_side(min(h, w))), T.CenterCrop((h, w))]
    steps.append(T.ToTensor())
    if norm:
        steps.append(T.Normalize(list(norm["mean"]), list(norm["std"])))
    return T.Compose(steps)


def tensor_transform(x: torch.Tensor, shape: tuple[int, int, int], norm: dict | None) -> torch.Tensor:
    """Batch version for in-memory [0, 1] images shaped (N, C, H, W)."""
    c, h, w = shape
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise DataError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
    if tuple(x.shape[2:]) != (h, w):
        side = _resize_side(min(h, w))
        scale = side / min(x.shape[2], x.shape[3])
        size = (max(h, round(x.shape[2] * scale)), max(w, round(x.shape[3] * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
        x = x[:, :, top:top + h, left:left + w]
    if norm:
        mean = torch.tensor(norm["mean"], dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(norm["std"], dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


class _TransformedImages(Dataset):
    """In-memory [0, 1] images converted lazily to the model's input shape/normalisation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, shape, norm):
        self.x, self.y, self.shape, self.norm = x, y, tuple(shape), norm

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return tensor_transform(self.x[i:i + 1], self.shape, self.norm)[0], self.y[i]


# ----------------------------------------------------------------------------------------------------------------
# load_dataset
# ----------------------------------------------------------------------------------------------------------------
def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', not {split!r}")
    return split


def _missing(kind: str, root: Path, expected: list[Path], cls_name: str) -> DataError:
    where = " and ".join(str(p) for p in expected)
    return DataError(
        f"{kind} data not found: expected {where}. foldviz never downloads data — download {kind} there, "
        f"e.g. python -c \"import torchvision; torchvision.datasets.{cls_name}('{root}', download=True)\""
        + (" (for SVHN once per split, with split='train' and split='test')" if kind == "svhn" else "")
    )


class _CheckedImageFolder:
    """Mixin for torchvision's ImageFolder: an unreadable image is a :class:`DataError` naming the file."""

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except DataError:
            raise
        except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, permission errors, ...
            path = self.samples[index][0] if index < len(getattr(self, "samples", ())) else f"#{index}"
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"cannot read image {path}: {msg[:200]}") from None


def check_classes(ds, card: dict | None, spec: str = "dataset") -> None:
    """Refuse a dataset with more classes than the model has outputs (labels would index past the logits)."""
    n_model = (card or {}).get("num_classes")
    classes = getattr(ds, "classes", None)
    if n_model and classes is not None and len(classes) > int(n_model):
        raise DataError(f"{spec} has {len(classes)} classes but the model has {int(n_model)} outputs; "
                        "use data with at most as many classes as the model (in the same order)")


def load_dataset(spec: str, split: str = "test", *, card: dict | None = None) -> Dataset:
    ds = _load_dataset(spec, split, card=card)
    check_classes(ds, card, str(spec))
    return ds


def _load_dataset(spec: str, split: str = "test", *, card: dict | None = None) -> Dataset:
    """Open a dataset by spec (see module docstring), yielding ``(input_tensor, label)`` pairs shaped for ``card``."""
    split = _check_split(split)
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("empty dataset spec; use digits, cifar10:ROOT, ..., or imagefolder:DIR")
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower().replace("-", "").replace("_", "")
    if kind not in DATASET_KINDS:
        raise DataError(
            f"unknown dataset spec {spec!r}; use one of: digits, cifar10:ROOT, cifar100:ROOT, mnist:ROOT, "
            "fashionmnist:ROOT, svhn:ROOT, imagefolder:DIR"
        )
    shape, norm = _target(card, kind)
    if kind == "digits":
        if arg:
            raise DataError("the digits dataset is bundled and takes no path: use 'digits'")
        x, y = digits_arrays(split)
        if tuple(shape) == tuple(x.shape[1:]):
            ds = TensorDataset(tensor_transform(x, shape, norm), y)
        else:  # e.g. a 3×224×224 model: convert per item instead of materialising every resized image
            ds = _TransformedImages(x, y, shape, norm)
        ds.classes = [str(i) for i in range(10)]
        return ds
    if not arg:
        raise DataError(f"dataset spec {spec!r} needs a path: {kind}:ROOT")
    root = Path(arg).expanduser()
    from torchvision import datasets as D

    native_hw = tuple(DATASET_KINDS[kind][0][1:])
    tf = _pil_transform(shape, norm, native_hw if kind != "imagefolder" else None)
    train = split == "train"
    if kind == "imagefolder":
        if not root.is_dir():
            raise DataError(f"image folder not found: {root}")
        root = imagefolder_dir(root, split)
        try:
            folder = type("CheckedImageFolder", (_CheckedImageFolder, D.ImageFolder), {})
            return folder(str(root), transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(
                f"image folder {root} has no images: expected one sub-folder per class with image files in it "
                f"(e.g. {root / 'cat' / '0001.png'}); {str(exc).splitlines()[0]}"
            ) from None
    if kind in ("cifar10", "cifar100"):
        cls = D.CIFAR10 if kind == "cifar10" else D.CIFAR100
        expected = [root / cls.base_folder]
        kwargs = {"train": train}
    elif kind in ("mnist", "fashionmnist"):
        cls = D.MNIST if kind == "mnist" else D.FashionMNIST
        expected = [root / cls.__name__ / "raw"]
        kwargs = {"train": train}
    else:  # svhn
        cls = D.SVHN
        expected = [root / D.SVHN.split_list[split][1]]
        kwargs = {"split": split}
    try:
        return cls(str(root), download=False, transform=tf, **kwargs)
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "corrupted" in str(exc).lower():
            raise _missing(kind, root, expected, cls.__name__) from None
        raise DataError(f"could not open {kind} at {root}: {str(exc).splitlines()[0]}") from None
    except (FileNotFoundError, OSError) as exc:
        raise _missing(kind, root, expected, cls.__name__) from exc


# ----------------------------------------------------------------------------------------------------------------
# split folders and overlap
# ----------------------------------------------------------------------------------------------------------------
_SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}


def imagefolder_dir(root: str | os.PathLike, split: str) -> Path:
    """The folder an ``imagefolder:ROOT`` spec reads for ``split``.

    ``ROOT/train`` for "train" and ``ROOT/val`` (else ``ROOT/test``) for "test" when ROOT has such sub-folders;
    ROOT itself when it has none of them (a flat folder of class sub-folders serves both splits).
    """
    root, split = Path(root).expanduser(), _check_split(split)
    present = {d for names in _SPLIT_DIRS.values() for d in names if (root / d).is_dir()}
    if not present:
        return root
    for d in _SPLIT_DIRS[split]:
        if d in present:
            return root / d
    want = " or ".join(f"{root / d}" for d in _SPLIT_DIRS[split])
    raise DataError(f"image folder {root} has {', '.join(sorted(present))}/ but no {split} split: expected {want}")


def _split_folder(spec: str, split: str) -> Path | None:
    """The resolved folder ``spec``'s ``split`` is read from (image folders only; None for other kinds)."""
    kind, _, arg = str(spec).strip().partition(":")
    if kind.lower() != "imagefolder" or not arg:
        return None
    return Path(os.path.realpath(imagefolder_dir(arg, split)))


def check_overlap(repair_spec: str, test_spec: str, *, allow_overlap: bool = False) -> None:
    """Refuse repair data (train split of ``repair_spec``) that shares images with the test data (test split of
    ``test_spec``): the same folder, or one folder inside the other, by resolved real path."""
    a, b = _split_folder(repair_spec, "train"), _split_folder(test_spec, "test")
    if allow_overlap or a is None or b is None:
        return
    if a == b:
        how = f"both read {a}"
    elif b in a.parents or a in b.parents:
        inner, outer = (a, b) if b in a.parents else (b, a)
        how = f"{inner} lies inside {outer}"
    else:
        return
    raise DataError(f"the repair data and the test data overlap ({how}), so the accuracy would be measured on "
                    "images the repair saw: arrange ROOT/train and ROOT/val, or give --repair-data and "
                    "--test-data, or pass --allow-overlap")


def data_specs(data: str | None = None, repair_data: str | None = None, test_data: str | None = None, *,
               allow_overlap: bool = False) -> tuple[str | None, str | None]:
    """(repair spec, test spec): ``repair_data``/``test_data`` override ``data`` for their role.

    The repair spec is read on its train split (Fold-R, REPAIR), the test spec on its test split (accuracy);
    overlapping image folders are refused unless ``allow_overlap`` (see :func:`check_overlap`).
    """
    repair, test = repair_data or data, test_data or data
    if repair and test:
        check_overlap(repair, test, allow_overlap=allow_overlap)
    return repair, test


# ----------------------------------------------------------------------------------------------------------------
# loaders and batches
# ----------------------------------------------------------------------------------------------------------------
_WORKERS: int | None = None  # None: default_workers()
MAX_WORKERS = 64


def default_workers() -> int:
    """Loader worker processes for file-backed datasets: one less than the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


def set_workers(n: int | None) -> None:
    """Worker processes for file-backed datasets from now on (0: in-process; None: :func:`default_workers`)."""
    global _WORKERS
    if n is not None and not 0 <= int(n) <= MAX_WORKERS:
        raise DataError(f"workers must be between 0 and {MAX_WORKERS}, got {n}")
    _WORKERS = None if n is None else int(n)


def _in_memory(dataset: Dataset) -> bool:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, (TensorDataset, _TransformedImages))


def _workers_for(dataset: Dataset, num_workers: int | None) -> int:
    if num_workers is not None:
        return int(num_workers)
    if _in_memory(dataset):  # no decoding to parallelise: worker start-up would only cost time
        return 0
    return default_workers() if _WORKERS is None else _WORKERS


_WORKER_ERROR = re.compile(r"^([\w.]*Error): (.+)$", re.M)


class _Loader(DataLoader):
    """A DataLoader whose worker failures surface as one line (the worker's own message, no traceback text)."""

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as exc:
                lines = _WORKER_ERROR.findall(str(exc))
                if self.num_workers and lines:
                    raise DataError(lines[-1][1]) from None
                raise
            yield batch


def make_loader(dataset: Dataset, batch_size: int = 256, *, shuffle: bool = False, limit: int | None = None,
                seed: int = 0, num_workers: int | None = None) -> DataLoader:
    """A DataLoader.  ``limit`` keeps the first N samples (a seeded random subset when ``shuffle``); shuffling
    order is seeded too.  ``num_workers`` defaults to :func:`default_workers` (or :func:`set_workers`) for
    file-backed datasets and 0 for in-memory ones; the batches do not depend on it."""
    n = len(dataset)
    if limit is not None:
        limit = max(0, min(int(limit), n))
        if shuffle:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:limit].tolist()
        else:
            idx = list(range(limit))
        dataset = Subset(dataset, idx)
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return _Loader(dataset, batch_size=int(batch_size), shuffle=shuffle, num_workers=_workers_for(dataset, num_workers),
                   generator=gen)


def sample_inputs(spec: str, split: str, n: int, *, card: dict | None = None, seed: int = 0) -> torch.Tensor:
    """A fixed, seeded batch of ``n`` inputs (fewer if the split is smaller), e.g. for BN repair."""
    ds = load_dataset(spec, split, card=card)
    total = len(ds)
    if total == 0:
        raise DataError(f"dataset {spec!r} ({split}) is empty")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))[: max(0, int(n))]
    if isinstance(ds, TensorDataset):
        return ds.tensors[0][idx].clone()
    loader = make_loader(Subset(ds, idx.tolist()), batch_size=64)
    return torch.cat([batch[0] for batch in loader])


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    accuracy: float  # top-1, fraction 0..1
    loss: float      # mean cross-entropy per sample
    n: int           # samples evaluated


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in model.parameters():
        return t.device, t.dtype
    for t in model.buffers():
        return t.device, (t.dtype if t.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def evaluate(model: nn.Module, loader, *, device=None, limit: int | None = None, progress=None) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of ``model`` over ``loader``.

    Runs in eval mode under ``no_grad``.  ``device=None`` evaluates where the model already is; otherwise the model
    is moved there for the evaluation and moved back afterwards (its train/eval mode is restored as well).
    ``limit`` stops after that many samples.  ``progress(done, total)`` is called after every batch with sample
    counts.
    """
    orig_device, dtype = _model_device_dtype(model)
    target = orig_device if device is None else resolve_device(device)
    was_training = model.training
    moved = target != orig_device
    try:
        total = len(loader.dataset)
    except (AttributeError, TypeError):
        total = 0
    if limit is not None:
        total = min(total, int(limit)) if total else int(limit)
    correct, loss_sum, n = 0, 0.0, 0
    try:
        if moved:
            model.to(target)
        model.eval()
        with torch.no_grad():
            for batch in loader:
                x, y = batch[0], batch[1]
                if limit is not None and n + len(y) > limit:
                    keep = int(limit) - n
                    x, y = x[:keep], y[:keep]
                if len(y) == 0:
                    break
                x = x.to(target)
                if x.is_floating_point() and dtype.is_floating_point and x.dtype != dtype:
                    x = x.to(dtype)
                y = torch.as_tensor(y).to(target)
                logits = model(x).float()
                if len(y) and (int(y.max()) >= logits.shape[1] or int(y.min()) < 0):
                    raise DataError(f"the data has label {int(y.max())} (at least {int(y.max()) + 1} classes) but "
                                    f"the model has {logits.shape[1]} outputs")
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(dim=1) == y).sum().item())
                n += len(y)
                if progress is not None:
                    progress(n, max(total, n))
                if limit is not None and n >= limit:
                    break
    finally:
        if moved:
            model.to(orig_device)
        model.train(was_training)
    if n == 0:
        raise DataError("evaluation saw no samples (empty dataset or limit=0)")
    return EvalResult(accuracy=correct / n, loss=loss_sum / n, n=n)
