"""Dataset specs, transforms, loaders, sample batches and evaluation."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from foldviz.data import (
    DataError,
    EvalResult,
    digits_arrays,
    digits_normalization,
    evaluate,
    load_dataset,
    make_loader,
    data_specs,
    default_workers,
    imagefolder_dir,
    sample_inputs,
    set_workers,
)


# ---------------------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------------------
def test_digits_fixed_stratified_split():
    x_tr, y_tr = digits_arrays("train")
    x_te, y_te = digits_arrays("test")
    assert x_tr.shape == (1347, 1, 8, 8) and x_te.shape == (450, 1, 8, 8)
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    # stratified: every class has (almost exactly) a quarter of its samples in the test split
    for c in range(10):
        n_te, n_all = int((y_te == c).sum()), int((y_te == c).sum() + (y_tr == c).sum())
        assert abs(n_te - 0.25 * n_all) <= 1
    # deterministic
    assert torch.equal(digits_arrays("test")[0], x_te)


def test_digits_normalised_with_train_stats_or_card():
    ds = load_dataset("digits", "train")
    x = ds.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-4
    norm = digits_normalization()
    assert 0.2 < norm["mean"][0] < 0.4 and len(norm["std"]) == 1
    card = {"input_shape": [1, 8, 8], "normalization": {"mean": [0.5], "std": [0.25]}}
    x_card = load_dataset("digits", "test", card=card).tensors[0]
    assert torch.allclose(x_card, (digits_arrays("test")[0] - 0.5) / 0.25)
    raw = load_dataset("digits", "test", card={"input_shape": [1, 8, 8]}).tensors[0]
    assert torch.equal(raw, digits_arrays("test")[0])  # no normalization in the card → raw [0, 1] pixels
    assert len(ds) == 1347 and ds.classes == [str(i) for i in range(10)]


def test_digits_resized_to_rgb_model_input():
    card = {"input_shape": [3, 32, 32], "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    ds = load_dataset("digits", "test", card=card)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert -1.0 - 1e-5 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-5


@pytest.mark.parametrize("spec, fragment", [
    ("digits:/tmp/x", "takes no path"),
    ("cifar11:/x", "unknown dataset spec 'cifar11:/x'"),
    ("cifar10", "needs a path: cifar10:ROOT"),
    ("", "empty dataset spec"),
])
def test_bad_dataset_specs(spec, fragment):
    with pytest.raises(DataError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(spec)


def test_bad_split():
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        load_dataset("digits", "val")


# ---------------------------------------------------------------------------------------------------------------
# torchvision datasets
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, expected", [
    ("cifar10", "cifar-10-batches-py"),
    ("cifar100", "cifar-100-python"),
    ("mnist", "MNIST/raw"),
    ("fashionmnist", "FashionMNIST/raw"),
    ("svhn", "test_32x32.mat"),
])
def test_missing_dataset_root_names_exact_path(tmp_path, kind, expected):
    root = tmp_path / "no-data-here"
    with pytest.raises(DataError) as exc:
        load_dataset(f"{kind}:{root}", "test")
    msg = str(exc.value)
    assert f"{root}/{expected}" in msg
    assert "never downloads" in msg and "download" in msg


def _write_idx(path, array: np.ndarray, magic: int):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for d in array.shape:
            f.write(struct.pack(">I", d))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_layout_loads_and_converts_to_model_input(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 28, 28))
    labels = np.array([3, 1, 4, 1, 5])
    _write_idx(raw / "t10k-images-idx3-ubyte", imgs, 0x803)
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels, 0x801)
    _write_idx(raw / "train-images-idx3-ubyte", imgs[:4], 0x803)  # torchvision wants both splits present
    _write_idx(raw / "train-labels-idx1-ubyte", labels[:4], 0x801)
    ds = load_dataset(f"mnist:{tmp_path}", "test")
    x, y = ds[2]
    assert x.shape == (1, 28, 28) and y == 4
    assert torch.allclose(x, (torch.tensor(imgs[2] / 255.0, dtype=torch.float32)[None] - 0.1307) / 0.3081,
                          atol=1e-5)
    cifar_like = {"input_shape": [3, 32, 32], "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    x3, _ = load_dataset(f"mnist:{tmp_path}", "test", card=cifar_like)[0]
    assert x3.shape == (3, 32, 32)
    assert len(load_dataset(f"mnist:{tmp_path}", "train")) == 4
    (raw / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="MNIST/raw"):
        load_dataset(f"mnist:{tmp_path}", "test")


# ---------------------------------------------------------------------------------------------------------------
# imagefolder
# ---------------------------------------------------------------------------------------------------------------
def _make_imagefolder(root, per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def test_imagefolder_loads_pngs(tmp_path):
    root = _make_imagefolder(tmp_path / "imgs")
    ds = load_dataset(f"imagefolder:{root}", "test")
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    x, y = ds[4]
    assert x.shape == (3, 224, 224) and y == 1
    card = {"input_shape": [1, 8, 8], "normalization": {"mean": [0.3], "std": [0.4]}}
    ds8 = load_dataset(f"imagefolder:{root}", "train", card=card)
    x8, y8 = ds8[0]
    assert x8.shape == (1, 8, 8) and y8 == 0
    batch = sample_inputs(f"imagefolder:{root}", "test", 4, card=card)
    assert batch.shape == (4, 1, 8, 8)


def test_imagefolder_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        load_dataset(f"imagefolder:{tmp_path / 'absent'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as exc:
        load_dataset(f"imagefolder:{empty}")
    assert f"image folder {empty} has no images" in str(exc.value)
    (empty / "cat").mkdir()
    (empty / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="has no images"):
        load_dataset(f"imagefolder:{empty}")


# ---------------------------------------------------------------------------------------------------------------
# honest data: train/val folders, overlap refusal, loader workers
# ---------------------------------------------------------------------------------------------------------------
def _split_folder(root):
    """ROOT/train (2 per class) and ROOT/val (3 per class) with different image sizes, so they can be told apart."""
    _make_imagefolder(root / "train", per_class=2, size=(20, 20))
    _make_imagefolder(root / "val", per_class=3, size=(30, 30))
    return root


def test_imagefolder_train_and_val_folders_serve_the_two_splits(tmp_path):
    root = _split_folder(tmp_path / "data")
    train, test = load_dataset(f"imagefolder:{root}", "train"), load_dataset(f"imagefolder:{root}", "test")
    assert len(train) == 4 and len(test) == 6 and train.classes == test.classes == ["cat", "dog"]
    assert all("/train/" in p for p, _ in train.samples) and all("/val/" in p for p, _ in test.samples)
    assert imagefolder_dir(root, "train") == root / "train" and imagefolder_dir(root, "test") == root / "val"
    assert data_specs(f"imagefolder:{root}") == (f"imagefolder:{root}", f"imagefolder:{root}")
    (root / "val").rename(root / "test")  # ROOT/test is accepted when there is no ROOT/val
    assert imagefolder_dir(root, "test") == root / "test"
    (root / "test").rename(root / "other")
    with pytest.raises(DataError, match="has train/ but no test split"):
        load_dataset(f"imagefolder:{root}", "test")


def test_one_folder_for_repair_and_test_is_refused_unless_allowed(tmp_path):
    flat = _make_imagefolder(tmp_path / "flat")
    with pytest.raises(DataError, match=r"overlap \(both read .*flat\).*--allow-overlap") as exc:
        data_specs(f"imagefolder:{flat}")
    assert "\n" not in str(exc.value)
    assert data_specs(f"imagefolder:{flat}", allow_overlap=True) == (f"imagefolder:{flat}",) * 2
    link = tmp_path / "alias"
    link.symlink_to(flat, target_is_directory=True)  # the same folder under another name
    with pytest.raises(DataError, match="both read"):
        data_specs(repair_data=f"imagefolder:{link}", test_data=f"imagefolder:{flat}")
    # different folders, and datasets with their own train/test split, are fine
    other = _make_imagefolder(tmp_path / "other")
    assert data_specs(None, f"imagefolder:{flat}", f"imagefolder:{other}") == (f"imagefolder:{flat}",
                                                                                f"imagefolder:{other}")
    assert data_specs("digits") == ("digits", "digits")
    assert data_specs("digits", test_data=f"imagefolder:{other}") == ("digits", f"imagefolder:{other}")


def test_nested_folders_are_refused(tmp_path):
    outer = _make_imagefolder(tmp_path / "all")
    inner = outer / "cat"
    with pytest.raises(DataError, match=r"lies inside"):
        data_specs(repair_data=f"imagefolder:{outer}", test_data=f"imagefolder:{inner}")
    with pytest.raises(DataError, match=r"lies inside"):
        data_specs(repair_data=f"imagefolder:{inner}", test_data=f"imagefolder:{outer}")
    assert data_specs(repair_data=f"imagefolder:{outer}", test_data=f"imagefolder:{inner}",
                      allow_overlap=True)[1] == f"imagefolder:{inner}"


def test_cli_fold_refuses_overlap_and_accepts_split_folders(tmp_path, capsys):
    from foldviz import cli

    flat = _make_imagefolder(tmp_path / "flat", size=(8, 8))
    out = tmp_path / "o"
    args = ["fold", "demo:digits-mlp", "--ratio", "0.3", "--repair", "r", "--repair-samples", "4", "--no-latency",
            "--variance-samples", "0", "--quiet", "--out", str(out)]
    assert cli.main([*args, "--data", f"imagefolder:{flat}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the repair data and the test data overlap")
    assert not out.exists()
    root = _split_folder(tmp_path / "split")
    assert cli.main([*args, "--data", f"imagefolder:{root}", "--workers", "0"]) == 0, capsys.readouterr().err
    report = __import__("json").loads((out / "report.json").read_text())
    assert report["eval_samples"] == 6 and report["data"] == f"imagefolder:{root}"
    assert cli.main([*args, "--force", "--repair-data", "digits", "--test-data", f"imagefolder:{flat}"]) == 0
    report = __import__("json").loads((out / "report.json").read_text())
    assert report["eval_samples"] == 6 and report["data"] == f"imagefolder:{flat}"


def test_loader_workers_follow_the_dataset_and_the_setting(tmp_path):
    flat = _make_imagefolder(tmp_path / "imgs")
    card = {"input_shape": [3, 8, 8], "normalization": None}
    files = load_dataset(f"imagefolder:{flat}", "test", card=card)
    mem = torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4))
    try:
        set_workers(None)
        assert make_loader(mem).num_workers == 0  # in memory: nothing to decode in parallel
        assert make_loader(files).num_workers == default_workers()
        set_workers(1)
        assert make_loader(files, limit=3).num_workers == 1
        one = sample_inputs(f"imagefolder:{flat}", "test", 5, card=card, seed=2)
        set_workers(0)
        assert make_loader(files).num_workers == 0
        assert torch.equal(sample_inputs(f"imagefolder:{flat}", "test", 5, card=card, seed=2), one)
        with pytest.raises(DataError, match="workers must be between 0 and"):
            set_workers(-1)
    finally:
        set_workers(None)


def test_worker_errors_stay_one_line(tmp_path):
    flat = _make_imagefolder(tmp_path / "imgs")
    (flat / "cat" / "broken.png").write_bytes(b"not an image")
    ds = load_dataset(f"imagefolder:{flat}", "test", card={"input_shape": [3, 8, 8], "normalization": None})
    with pytest.raises(DataError) as exc:
        for _ in make_loader(ds, batch_size=2, num_workers=1):
            pass
    assert str(exc.value).startswith("cannot read image") and "broken.png" in str(exc.value)
    assert "\n" not in str(exc.value) and "Traceback" not in str(exc.value)


# ---------------------------------------------------------------------------------------------------------------
# loaders, sample batches
# ---------------------------------------------------------------------------------------------------------------
def test_make_loader_limit_and_seeded_shuffle():
    ds = load_dataset("digits", "test")
    first = make_loader(ds, batch_size=32, limit=50)
    assert sum(len(y) for _, y in first) == 50
    xs = torch.cat([x for x, _ in first])
    assert torch.equal(xs, ds.tensors[0][:50])
    a = torch.cat([y for _, y in make_loader(ds, 64, shuffle=True, limit=100, seed=3)])
    b = torch.cat([y for _, y in make_loader(ds, 64, shuffle=True, limit=100, seed=3)])
    c = torch.cat([y for _, y in make_loader(ds, 64, shuffle=True, limit=100, seed=4)])
    assert len(a) == 100 and torch.equal(a, b) and not torch.equal(a, c)
    assert make_loader(ds).num_workers == 0


def test_sample_inputs_fixed_batch():
    a = sample_inputs("digits", "train", 64, seed=0)
    b = sample_inputs("digits", "train", 64, seed=0)
    c = sample_inputs("digits", "train", 64, seed=1)
    assert a.shape == (64, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert sample_inputs("digits", "test", 10_000).shape[0] == 450  # capped at the split size


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------
class _ConstantLogits(nn.Module):
    def __init__(self, favourite: int = 0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))
        self.favourite = favourite

    def forward(self, x):
        out = self.bias.expand(x.shape[0], 10).clone()
        out[:, self.favourite] += 1e-3
        return out


def test_evaluate_loss_is_per_sample_mean_and_accuracy_exact():
    ds = load_dataset("digits", "test")
    y = ds.tensors[1]
    model = _ConstantLogits(favourite=3).train()
    calls = []
    res = evaluate(model, make_loader(ds, batch_size=64), progress=lambda d, t: calls.append((d, t)))
    assert isinstance(res, EvalResult) and res.n == 450
    assert res.accuracy == int((y == 3).sum()) / 450
    expected = -math.log(math.exp(1e-3) / (9 + math.exp(1e-3)))
    # the uneven last batch (450 = 7×64 + 2) must not change the per-sample mean
    assert abs(res.loss - (expected * int((y == 3).sum()) + -math.log(1 / (9 + math.exp(1e-3))) *
                           int((y != 3).sum())) / 450) < 1e-5
    assert calls[-1] == (450, 450) and len(calls) == 8
    assert model.training  # mode restored


def test_evaluate_limit_and_device_restore():
    ds = load_dataset("digits", "test")
    model = _ConstantLogits().eval()
    res = evaluate(model, make_loader(ds, batch_size=64), limit=100, device="cpu")
    assert res.n == 100
    assert next(model.parameters()).device.type == "cpu" and not model.training
    with pytest.raises(DataError, match="no samples"):
        evaluate(model, make_loader(ds, batch_size=64), limit=0)


def test_cli_sweep_refuses_overlap_before_any_work(tmp_path, capsys):
    from foldviz import cli

    flat = _make_imagefolder(tmp_path / "flat", size=(8, 8))
    out = tmp_path / "s.csv"
    assert cli.main(["sweep", "demo:digits-mlp", "--ratios", "0.3", "--methods", "none", "--data",
                     f"imagefolder:{flat}", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "overlap" in err[0] and "--allow-overlap" in err[0]
    assert not out.exists()
