"""The GPU path: folds on CUDA agree with folds on the CPU. Skipped (with the reason) on machines without CUDA;
run on a GPU machine with ``python -m pytest -q -m cuda tests/test_cuda.py``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from foldviz.data import evaluate, load_dataset, make_loader
from foldviz.fold import fold
from foldviz.models import load_model
from foldviz.plans import FoldPlan

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("demo, repair", [("digits-resnet", "none"), ("digits-vgg", "ar"), ("digits-mlp", "dfr")])
def test_cuda_fold_matches_the_cpu_fold(demo, repair):
    loaded = load_model(f"demo:{demo}")
    plan = FoldPlan(default_ratio=0.5, repair=repair)
    x = loaded.example_input(1)
    cpu = fold(loaded.model, plan, example_input=x, device="cpu", num_classes=loaded.num_classes)
    gpu = fold(loaded.model, plan, example_input=x, device="cuda", num_classes=loaded.num_classes)
    assert set(cpu.labels) == set(gpu.labels)
    for gid in cpu.labels:  # the same clusters (k-means is seeded; ties are rare on trained weights)
        assert np.array_equal(cpu.labels[gid], gpu.labels[gid]), gid
    assert next(gpu.model.parameters()).device.type == "cpu"  # results come back to the CPU
    xb = loaded.example_input(64, seed=1)
    with torch.no_grad():
        a, b = cpu.model(xb), gpu.model(xb)
    assert (a - b).abs().max() <= 1e-3 * max(1.0, float(a.abs().max()))


def test_cuda_evaluation_matches_the_cpu():
    loaded = load_model("demo:digits-resnet")
    loader = make_loader(load_dataset("digits", "test", card=loaded.card))
    cpu = evaluate(loaded.model, loader, device="cpu")
    gpu = evaluate(loaded.model, loader, device="cuda")
    assert gpu.n == cpu.n == 450 and abs(gpu.accuracy - cpu.accuracy) <= 1 / 450
    assert gpu.loss == pytest.approx(cpu.loss, abs=1e-3)
    assert next(loaded.model.parameters()).device.type == "cpu"  # moved back
