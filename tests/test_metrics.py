"""Metrics: FLOP convention, sizes, the variance-ratio diagnostic."""
import torch
from torch import nn

from foldviz.fold import fold
from foldviz.metrics import compare, count_flops, count_params, model_size_bytes, variance_ratios
from engine_models import random_demo


def test_flops_count_two_per_multiply_add():
    lin = nn.Linear(64, 10)
    assert count_flops(lin, torch.randn(1, 64)) == 2 * 64 * 10
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, torch.randn(1, 3, 8, 8)) == 2 * 8 * 3 * 9 * 64


def test_size_tracks_parameters():
    m = random_demo("mlp")
    nbytes = model_size_bytes(m)
    n_buffers = sum(b.numel() for b in m.buffers() if b.dtype == torch.float32)
    assert 4 * (count_params(m) + n_buffers) <= nbytes < 4 * (count_params(m) + n_buffers) + 8192


def test_variance_ratio_is_one_for_identity_and_collapses_for_naive_fold():
    m = random_demo("resnet")
    x = torch.randn(128, 1, 8, 8) * 2 + 0.5
    same = variance_ratios(m, m, x)
    assert all(abs(r["ratio"] - 1) < 1e-6 for r in same)
    naive = fold(m, 0.5, example_input=x[:1], repair="none")
    rows = variance_ratios(m, naive.model, x, naive.channel_maps)
    assert {"layer", "ratio", "channels_before", "channels_after"} <= set(rows[0])
    bns = [r for r in rows if "bn" in r["layer"]]
    assert sum(r["ratio"] < 1 for r in bns) > 0.8 * len(bns)  # merged channels lose variance: collapse


def test_compare_reports_ratios():
    m = random_demo("vgg")
    res = fold(m, 0.5, example_input=torch.randn(1, 1, 8, 8), repair="none")
    c = compare(m, res.model, torch.randn(1, 1, 8, 8), latency=False)
    assert c["after"]["params"] < c["before"]["params"] and 0.6 < c["param_sparsity"] < 0.8
    assert 0.2 < c["flops_ratio"] < 0.4
