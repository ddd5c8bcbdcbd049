"""The persistent proxy cache (foldviz.cache) and Fold-DFR's proxy reuse (foldviz.proxy): validated reads, atomic and
race-free writes, LRU eviction, switching it off, reuse across fold seeds, the CLI's messages, Ray sharing."""
import json
import multiprocessing as mp
import os
import struct
import time
import warnings

import pytest
import torch
from torch import nn

from foldviz import cache as C
from foldviz import proxy as P
from foldviz.cli import main
from foldviz.fold import fold
from foldviz.plans import FoldPlan, PlanError

KEY = C.cache_key("test", 1)
OTHER = C.cache_key("test", 2)


def _store(tmp_path, **kw) -> C.TensorCache:
    return C.TensorCache(tmp_path / "c", namespace="t", **kw)


def _value(n=4, seed=0):
    return torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(seed))


def _rejected(store, key, **kw):
    """get() returns None with exactly one CacheWarning and removes the file."""
    with pytest.warns(C.CacheWarning) as rec:
        assert store.get(key, **kw) is None
    assert len(rec) == 1 and not store.path(key).exists()
    return str(rec[0].message)


def test_round_trip_keeps_values_and_metadata(tmp_path):
    store = _store(tmp_path)
    x = _value()
    p = store.put(KEY, x, {"build_id": "abc", "build_seconds": 1.5})
    assert p == store.path(KEY) and p.exists()
    hit = store.get(KEY, shape=(4, 3, 2, 2), dtype=torch.float32)
    assert torch.equal(hit.tensor, x)
    assert hit.meta["build_id"] == "abc" and hit.meta["build_seconds"] == "1.5" and hit.meta["key"] == KEY
    assert store.get(OTHER) is None  # a miss is silent


def test_get_or_build_builds_once_then_reads(tmp_path):
    store = _store(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return _value(), {"build_id": "first"}

    a, built_a = store.get_or_build(KEY, build, shape=(4, 3, 2, 2))
    b, built_b = store.get_or_build(KEY, build, shape=(4, 3, 2, 2))
    assert (built_a, built_b) == (True, False) and len(calls) == 1
    assert torch.equal(a.tensor, b.tensor) and b.meta["build_id"] == "first"


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty", "garbage", "huge header"])
def test_damaged_file_is_ignored_with_a_warning_and_rebuilt(tmp_path, damage):
    store = _store(tmp_path)
    store.put(KEY, _value(), {"build_id": "old"})
    p = store.path(KEY)
    raw = bytearray(p.read_bytes())
    if damage == "truncated":
        raw = raw[:-7]
    elif damage == "flipped byte":
        raw[-3] ^= 0x40  # inside the tensor data: only the checksum notices
    elif damage == "empty":
        raw = bytearray()
    elif damage == "garbage":
        raw = bytearray(b"not a safetensors file at all" * 10)
    else:
        raw[:8] = struct.pack("<Q", 10 ** 12)
    p.write_bytes(bytes(raw))
    with pytest.warns(C.CacheWarning, match="rebuilt"):
        hit, built = store.get_or_build(KEY, lambda: (_value(), {"build_id": "new"}), shape=(4, 3, 2, 2))
    assert built and hit.meta["build_id"] == "new"
    assert store.get(KEY).meta["build_id"] == "new"  # the rebuilt file is valid


def test_foreign_files_are_rejected(tmp_path):
    from safetensors.torch import save

    store = _store(tmp_path)
    store.put(OTHER, _value())
    store.path(KEY).write_bytes(store.path(OTHER).read_bytes())  # a valid entry copied under another name
    assert "foreign" in _rejected(store, KEY)
    store.path(KEY).write_bytes(save({"value": _value()}))  # a safetensors file foldviz did not write
    assert "not a foldviz cache entry" in _rejected(store, KEY)


def test_wrong_shape_dtype_and_nan_are_rejected(tmp_path):
    from safetensors.torch import save

    store = _store(tmp_path)
    store.put(KEY, _value())
    assert "shape" in _rejected(store, KEY, shape=(5, 3, 2, 2))
    store.put(KEY, _value())
    assert "dtype" in _rejected(store, KEY, dtype=torch.float64)
    # a well-formed entry (right key, checksum and header) holding a NaN
    x = _value()
    x[0, 0, 0, 0] = float("nan")
    meta = {"format": C.FORMAT, "key": KEY, "shape": json.dumps(list(x.shape)), "dtype": "F32",
            "sha256": C._tensor_sha(x)}
    store.path(KEY).write_bytes(save({"value": x}, metadata=meta))
    assert "non-finite" in _rejected(store, KEY)
    with pytest.raises(ValueError, match="non-finite"):
        store.put(KEY, x)


def test_lru_eviction_keeps_the_most_recently_used_within_the_size_limit(tmp_path):
    store = _store(tmp_path)
    store.put(KEY, _value())
    one = store.path(KEY).stat().st_size  # every entry below has this size
    store.path(KEY).unlink()
    store = _store(tmp_path, max_bytes=3 * one)
    keys = [C.cache_key("lru", i) for i in range(4)]
    for i, k in enumerate(keys[:3]):
        store.put(k, _value(seed=i))
    now = time.time()
    for age, k in zip((300, 200, 100), keys[:3]):
        os.utime(store.path(k), (now - age, now - age))
    assert store.get(keys[0]) is not None  # the oldest becomes the most recently used
    store.put(keys[3], _value(seed=3))     # over the limit: the least recently used (keys[1]) goes
    assert [store.path(k).exists() for k in keys] == [True, False, True, True]
    assert store.size() <= 3 * one
    assert _store(tmp_path, max_bytes=one - 1).put(C.cache_key("big"), _value()) is None  # larger than the limit


def _race_worker(root, key, start, log):
    store = C.TensorCache(root, namespace="t")

    def build():
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # both processes are inside get_or_build at once
        return torch.arange(4096, dtype=torch.float32).reshape(64, 64), {"build_id": str(os.getpid())}

    while time.time() < start:
        time.sleep(0.005)
    store.get_or_build(key, build, shape=(64, 64))
    for i in range(20):  # and plain writes racing on the same entry
        store.put(key, torch.full((64, 64), float(i)), {"build_id": str(os.getpid())})


def test_two_processes_filling_one_entry_leave_one_valid_file(tmp_path):
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    log = tmp_path / "builds.log"
    start = time.time() + 1.0
    procs = [ctx.Process(target=_race_worker, args=(tmp_path / "c", KEY, start, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().split()) == 1  # the second process waited for the first one's build
    store = C.TensorCache(tmp_path / "c", namespace="t")
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.CacheWarning)
        hit = store.get(KEY, shape=(64, 64))
    assert hit is not None and hit.tensor.unique().numel() == 1
    assert [p.name for p in store.directory.iterdir() if p.is_file()] == [store.path(KEY).name]  # no temp files


def test_cache_switch_and_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "_CONFIG", {"directory": None, "enabled": None, "max_bytes": None})
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert C.default_cache().directory == tmp_path / "env" / "proxy"
    monkeypatch.setenv(C.CACHE_SWITCH_ENV, "0")
    assert C.default_cache() is None
    monkeypatch.setenv(C.CACHE_SWITCH_ENV, "1")
    monkeypatch.setenv(C.CACHE_MAX_ENV, "2")
    assert C.default_cache().max_bytes == 2 * 1024 * 1024
    (tmp_path / "file").write_text("x")
    with pytest.raises(C.CacheError, match="is a file"):
        C.configure(directory=tmp_path / "file")
    with pytest.raises(C.CacheError, match="64 lowercase hex"):
        C.default_cache().path("../../etc/passwd")


# ---------------------------------------------------------------------------------------------------------------
# Fold-DFR's proxy
# ---------------------------------------------------------------------------------------------------------------
def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


FAST = {"proxy_steps": 3, "samples": 8}


def test_a_new_fold_seed_reuses_the_proxy_and_other_processes_read_it_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(tmp_path))
    P.clear_memory()
    net, x = _net(), torch.randn(1, 1, 8, 8)
    stages = []
    plan = FoldPlan(default_ratio=0.5, repair_settings=FAST)
    a = fold(net, plan, example_input=x, num_classes=4, progress=lambda s, d, t: stages.append(s))
    assert a.proxy["source"] == "built" and stages.count("proxy") == 3 and "proxy-cached" not in stages
    b = fold(net, plan.with_changes(seed=1, default_ratio=0.25), example_input=x, num_classes=4,
             progress=lambda s, d, t: stages.append(s))
    assert b.proxy["source"] == "memory" and b.proxy["build_id"] == a.proxy["build_id"]
    assert stages.count("proxy") == 3 and stages.count("proxy-cached") == 1
    P.clear_memory()  # as a new process would start
    c = fold(net, plan.with_changes(seed=2), example_input=x, num_classes=4)
    assert c.proxy["source"] == "cache" and c.proxy["build_id"] == a.proxy["build_id"]
    # the proxy seed is a setting of its own: another one is another proxy
    d = fold(net, plan.with_changes(repair_settings={**FAST, "proxy_seed": 5}), example_input=x, num_classes=4)
    assert d.proxy["source"] == "built" and d.proxy["key"] != a.proxy["key"]


def test_a_damaged_proxy_file_is_rebuilt_to_the_same_batch(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(tmp_path))
    P.clear_memory()
    net = _net()
    spec = P.proxy_spec((1, 8, 8), {"proxy": "di", **FAST}, num_classes=4)
    x1, info1 = P.get_proxy(net, spec)
    path = info1.path
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    P.clear_memory()
    with pytest.warns(C.CacheWarning, match="checksum"):
        x2, info2 = P.get_proxy(net, spec)
    assert info2.source == "built" and info2.build_id != info1.build_id
    assert torch.equal(x1, x2)  # deterministic: the rebuilt batch is the same
    net2 = _net()
    with torch.no_grad():
        net2[0].weight.mul_(2)  # other weights: another key
    assert P.get_proxy(net2, spec)[1].key != info1.key


def test_no_cache_keeps_the_proxy_in_memory_only(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(C.CACHE_SWITCH_ENV, "0")
    P.clear_memory()
    _x, info = P.get_proxy(_net(), P.proxy_spec((1, 8, 8), FAST, num_classes=4))
    assert info.source == "built" and info.path is None and not any(tmp_path.iterdir())


def test_plan_schema_takes_proxy_settings_strictly():
    ok = FoldPlan(repair_settings={"proxy": "smooth", "proxy_steps": 20, "proxy_seed": 3, "samples": 32})
    assert FoldPlan.from_json(ok.to_json()) == ok
    for bad in ({"proxy": "images"}, {"proxy_steps": 0}, {"proxy_seed": -1}, {"proxy_steps": 2.0},
                {"proxy_colour": 1}):
        with pytest.raises(PlanError):
            FoldPlan(repair_settings=bad)
    spec = P.proxy_spec((3, 32, 32), {"proxy": "di", "proxy_steps": 7})
    assert (spec.kind, spec.samples, spec.steps, spec.seed, spec.lr, spec.normalized) == ("di", 32, 7, 0, 0.25, True)
    assert P.proxy_spec((3, 64, 64), {}).samples == 16 and P.proxy_spec((3, 64, 64), {"samples": 40}).samples == 40
    # larger images are synthesised at a lower resolution unless the plan says
    assert [P.proxy_spec(s, {}).resolution for s in [(64,), (3, 32, 32), (1, 64, 64), (3, 128, 128), (3, 224, 224)]] \
        == [None, None, 32, 32, 56]
    assert P.proxy_spec((1, 64, 64), {"proxy_resolution": 64}).resolution == 64


def test_cli_builds_then_says_from_cache(tmp_path, capsys):
    common = ["fold", "demo:digits-mlp", "--ratio", "0.5", "--no-latency", "--variance-samples", "0",
              "--proxy-steps", "4", "--proxy-samples", "16", "--cache-dir", str(tmp_path / "cache")]
    P.clear_memory()
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().err
    P.clear_memory()  # a second CLI run is a new process
    assert main([*common, "--seed", "3", "--out", str(tmp_path / "b")]) == 0
    second = capsys.readouterr().err
    assert "building the data-free proxy" in first and "built in" in first and "from cache" not in first
    assert "from cache" in second and "building" not in second
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert plan["repair_settings"] == {"proxy_steps": 4, "samples": 16} and plan["seed"] == 3
    assert len(list((tmp_path / "cache" / "proxy").glob("*.safetensors"))) == 1
    P.clear_memory()
    assert main([*common, "--no-cache", "--out", str(tmp_path / "c")]) == 0
    assert "building" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Ray: one build per model, shared by every worker
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_sweep_of_4_workers_builds_the_proxy_once_per_model(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from foldviz.executors import RayExecutor, init_ray
    from foldviz.sweep import run_sweep
    from foldviz.sweepspec import ModelRef, spec_from_args

    monkeypatch.setenv(C.CACHE_DIR_ENV, str(tmp_path / "cache"))  # inherited by the workers
    if ray.is_initialized():
        ray.shutdown()
    try:
        init_ray(num_cpus=4)
        models = ["demo:digits-mlp", "demo:digits-vgg"]
        rows = []
        for m in models:
            spec = spec_from_args(ModelRef(m), [0.25, 0.5], ["dfr"], "digits", seeds=(0, 1), eval_limit=40,
                                  repair_settings={"proxy_steps": 3, "samples": 16})
            s = run_sweep(spec, tmp_path / "out.csv", executor=RayExecutor(), progress=False,
                          callback=lambda done, total, row: rows.append(row))
            assert s.executed == 5 and not s.failed
    finally:
        ray.shutdown()
    folds = [r for r in rows if r["method"] == "dfr"]
    assert len(folds) == 8
    for m in models:
        mine = [r["proxy"] for r in folds if r["model"] == m]
        assert len({p["build_id"] for p in mine}) == 1  # built once for this model ...
        assert {p["source"] for p in mine} == {"shared"}  # ... and handed to every cell, none built its own
    assert len(list((tmp_path / "cache" / "proxy").glob("*.safetensors"))) == 2


# ---------------------------------------------------------------------------------------------------------------
# research options of the proxy and of the repair
# ---------------------------------------------------------------------------------------------------------------
def test_cov_calibration_uses_the_variance_of_the_clusters_sum():
    """Two perfectly correlated members z1 = z, z2 = 2z merged into one channel: the ratio is
    Var(s1 z1 + s2 z2) / Var(z1 + z2) with s_i = sqrt(RV_i / v_i), here (2 + 2)^2 / 3^2, where the members' sums
    give (4 + 4) / (1 + 4)."""
    import numpy as np

    from foldviz.repair import _cluster_ratios

    net = nn.Sequential(nn.Linear(1, 2, bias=False), nn.BatchNorm1d(2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
        net[1].running_var.copy_(torch.tensor([4.0, 4.0]))
    x = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]])
    v = x.var()  # the estimator _cluster_ratios uses on the proxy (unbiased)
    s1, s2 = (4.0 / v).sqrt(), (4.0 / (4 * v)).sqrt()
    got = _cluster_ratios(net, x, {"1": np.array([0, 0])})["1"]
    expect = ((s1 + 2 * s2) ** 2 * v) / (9 * v)
    assert got.shape == (1,) and got[0].item() == pytest.approx(expect.item(), rel=1e-6)
    assert got[0].item() == pytest.approx(16 / 9 * 1 / v.item(), rel=1e-6)
    assert _cluster_ratios(net, x, {"1": np.array([0, 1])}) == {}  # nothing merged: no calibration needed


def test_normalized_bn_mismatch_is_measured_in_running_standard_deviations():
    from foldviz.synth import bn_mismatch

    bn = nn.BatchNorm1d(2, eps=0.0)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
        bn.running_var.copy_(torch.tensor([100.0, 0.01]))
    a = torch.tensor([[0.0, 1.0], [2.0, -1.0], [4.0, 1.0], [6.0, -1.0]])  # means (3, 0), biased variances (5, 1)
    raw = ((3 - 1) ** 2) ** 0.5 + ((5 - 100) ** 2 + (1 - 0.01) ** 2) ** 0.5
    norm = ((2 / 10) ** 2) ** 0.5 + ((5 / 100 - 1) ** 2 + (1 / 0.01 - 1) ** 2) ** 0.5
    assert bn_mismatch(a, bn).item() == pytest.approx(raw, rel=1e-6)
    assert bn_mismatch(a, bn, normalized=True).item() == pytest.approx(norm, rel=1e-6)
    x = bn_mismatch(torch.randn(8, 2, 3, 3), nn.BatchNorm2d(2), normalized=True)  # (N, C, H, W) inputs too
    assert x.dim() == 0 and torch.isfinite(x)


def test_low_resolution_synthesis_is_upsampled_and_smoother():
    from foldviz.synth import deep_inversion

    net = _net()
    kw = dict(num_classes=4, batch_size=4, iterations=3, seed=0)
    full = deep_inversion(net, (1, 16, 16), **kw)
    low = deep_inversion(net, (1, 16, 16), resolution=4, **kw)
    assert low.shape == full.shape == (4, 1, 16, 16) and torch.isfinite(low).all()

    def roughness(x):  # mean squared difference of neighbouring pixels, relative to the variance
        return float(((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() / x.var())

    assert roughness(low) < 0.25 * roughness(full)


def test_deep_inversion_proxy_for_feature_vector_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(tmp_path))
    P.clear_memory()
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[1].running_mean.fill_(2.0)
    stages = []
    x, info = P.get_proxy(net, P.proxy_spec((6,), {"proxy_steps": 4, "samples": 8}, num_classes=3),
                          progress=lambda s, d, t: stages.append((s, d, t)))
    noise = torch.randn((8, 6), generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 6) and info.source == "built" and stages[-1] == ("proxy", 4, 4)
    assert not torch.equal(x, noise)  # synthesised, not the starting noise
