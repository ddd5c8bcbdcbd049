"""Fold-DFR's data-free proxy batch: what it is (:class:`ProxySpec`), where it comes from (:func:`get_proxy`: this
process's memory, the persistent cache of :mod:`foldviz.cache`, or a fresh build) and how the command line sets it.

The proxy depends only on the ORIGINAL model's weights, the input shape, the number of classes and the proxy
settings (kind, sample count, steps, proxy seed, synthesis resolution), never on the fold plan's ratios or seed:
every fold of one model (other ratios, other seeds, the app's live estimate, every worker of a sweep) reuses it.

Progress: a build reports ``progress("proxy", step, total)`` after every synthesis step; a proxy found in memory
or in the cache reports ``progress("proxy-cached", 1, 1)`` once. :class:`ProxyInfo` (``FoldResult.proxy``) says
which it was and how long the build took.
"""
from __future__ import annotations

import copy
import sys
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from .cache import TensorCache, cache_key, default_cache, new_build_id
from .synth import deep_inversion, input_pixels
from .proxy_args import (PROXY_DEFAULTS, PROXY_KINDS, add_proxy_args, apply_cache_args,  # noqa: F401 (re-exported)
                         proxy_settings_from_args)
from .utils import Progress, state_dict_hash

__all__ = ["PROXY_KINDS", "PROXY_DEFAULTS", "ProxySpec", "ProxyInfo", "proxy_spec", "get_proxy", "install_proxy",
           "clear_memory", "add_proxy_args", "proxy_settings_from_args", "apply_cache_args", "proxy_progress",
           "describe_proxy"]

#: the Deep-Inversion objective of the proxy (a plan does not expose these): the learning rate and the BN loss in
#: running-standard-deviation units won on the cost x quality frontier (benchmarks/results/proxy_frontier.md)
DI_OBJECTIVE = {"lr": 0.25, "bn_weight": 1.0, "tv_weight": 1e-4, "l2_weight": 1e-5, "jitter": 1, "balanced": False,
                "normalized": True}
_RESEARCH = ("lr", "balanced", "normalized")  # objective options a Fold-DFR instance (not a plan) may change
# bump when the synthesis changes, so that entries built by an older foldviz are not reused
PROXY_VERSION = 2
#: proxies kept in this process's memory (a few MB each even at 224 x 224)
MEMORY_SIZE = 8
# pixels per Deep Inversion chunk of the proxy (2 images at 224x224; the 32x32 demos run in one chunk)
DI_CHUNK_PIXELS = 2 * 224 * 224


# Inputs larger than 32x32 carry more positions per sample in every BN statistic, and each Deep-Inversion step costs
# more. Measured (benchmarks/results/proxy_resolution.md: small VGG-BNs at 64 and 128 px, ratios 0.5 / 0.7, seeds
# 0-2): 16 samples is the knee at both sizes (4 samples lose 6-14 points at 64 px and 1-7 at 128 px, 8 lose 2-5,
# 32 and 64 gain nothing over 16), so unless a plan sets "samples", inputs up to 128x128 get LARGE_SAMPLES.
# Above 128x128 (not measured: no trained model at 224 px here) the count keeps the 128 px knee's positions per
# channel, 16 x 128 x 128, at least MIN_SAMPLES (5 at 224x224): the memory of the correction pass stays within
# the bound of benchmarks/bench_memory.py; the synthesis itself runs in chunks of 2 images.
LARGE_SAMPLES = 16
KNEE_PIXELS = 128 * 128
MIN_SAMPLES = 4
FULL_PIXELS = 32 * 32


def default_samples(input_shape, samples: int = PROXY_DEFAULTS["samples"]) -> int:
    """Proxy samples drawn for inputs of ``input_shape`` (C, H, W) or (features,) when a plan does not set them:
    ``samples`` up to 32x32 inputs, at most LARGE_SAMPLES up to 128x128, then as many positions as 16 at 128x128."""
    pixels = input_pixels(input_shape)
    n = int(samples)
    if pixels <= FULL_PIXELS:
        return n
    if pixels <= KNEE_PIXELS:
        return min(n, LARGE_SAMPLES)
    return min(n, max(MIN_SAMPLES, round(LARGE_SAMPLES * KNEE_PIXELS / pixels)))


@dataclass(frozen=True)
class ProxySpec:
    """Everything a proxy batch depends on besides the model's weights."""

    kind: str                       # "noise", "smooth" or "di"
    samples: int
    input_shape: tuple
    steps: int = 30                 # Deep-Inversion steps ("di" only)
    seed: int = 0
    resolution: int | None = None   # synthesise at this side length and upsample ("di" on images only)
    num_classes: int | None = None
    lr: float = DI_OBJECTIVE["lr"]
    balanced: bool = DI_OBJECTIVE["balanced"]
    normalized: bool = DI_OBJECTIVE["normalized"]

    def __post_init__(self):
        if self.kind not in PROXY_KINDS:
            raise ValueError(f"unknown proxy kind {self.kind!r}; choose from {', '.join(PROXY_KINDS)}")
        if int(self.samples) < 2:
            raise ValueError(f"the proxy needs at least 2 samples (BatchNorm statistics), got {self.samples}")
        if self.kind == "di" and int(self.steps) < 1:
            raise ValueError(f"a Deep-Inversion proxy needs at least 1 step, got {self.steps}")

    def key(self, weights_sha256: str) -> str:
        """The cache key of this proxy for a model with these weights."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        if self.kind != "di":  # settings that do not change a noise batch do not split the cache
            d.update(steps=0, resolution=None, num_classes=None, lr=0.0, balanced=False, normalized=False)
        return cache_key("dfr-proxy", PROXY_VERSION, weights_sha256, d)

    @property
    def shape(self) -> tuple:
        return (int(self.samples), *self.input_shape)

    def describe(self) -> str:
        if self.kind != "di":
            return f"{self.samples} {'smoothed ' if self.kind == 'smooth' else ''}noise inputs"
        res = f" at {self.resolution}px, upsampled" if self.resolution else ""
        return f"{self.samples} Deep-Inversion inputs x {self.steps} steps{res}"


@dataclass
class ProxyInfo:
    """Where a proxy came from: ``source`` is "built" (synthesised in this call), "cache" (read from the
    persistent cache), "memory" (this process already had it), "shared" (handed over by a sweep's driver) or
    "given" (the caller passed a tensor). ``build_seconds`` is what building it cost (measured when it was
    built, whoever built it); ``seconds`` what obtaining it cost this time. Copies of one build share
    ``build_id``."""

    source: str
    seconds: float
    build_seconds: float
    build_id: str
    key: str
    kind: str
    samples: int
    steps: int
    description: str
    path: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


#: side length the proxy is synthesised at for images larger than 32x32 (then upsampled bilinearly): measured on
#: VGG-BNs at 64 and 128 px (benchmarks/results/proxy_frontier_large.md), synthesising at 32x32 beat the full
#: resolution by 10.5 / 4.9 points of mean accuracy and half the side by 2.1 at 128 px, at the same cost per step
PROXY_MIN_SIDE = 32


def proxy_resolution(input_shape) -> int | None:
    """The default synthesis side for inputs ``input_shape`` (C, H, W): None (full resolution) up to 32x32, else
    max(32, side / 4) (32 at 64 and 128 px, both measured; 56 at 224 px, extrapolated)."""
    if len(input_shape) != 3:
        return None
    side = min(int(input_shape[1]), int(input_shape[2]))
    return None if side <= PROXY_MIN_SIDE else max(PROXY_MIN_SIDE, side // 4)


def proxy_spec(input_shape, settings: dict | None = None, *, num_classes: int | None = None) -> ProxySpec:
    """The proxy a fold with ``settings`` (a plan's ``repair_settings``, or Fold-DFR options) uses.

    Unless ``samples`` is set explicitly, inputs larger than 32x32 get fewer samples
    (:func:`default_samples`); unless ``proxy_resolution`` is, they are synthesised at a lower
    resolution (:func:`proxy_resolution`)."""
    s = {**PROXY_DEFAULTS, **{k: v for k, v in (settings or {}).items() if k in PROXY_DEFAULTS or k in _RESEARCH}}
    samples = int(s["samples"]) if "samples" in (settings or {}) else default_samples(tuple(input_shape), s["samples"])
    kind = str(s["proxy"])
    if kind.startswith("di") and kind[2:].isdigit():  # "di20": 20 steps (research shorthand)
        kind, s["proxy_steps"] = "di", int(kind[2:])
    res = s.get("proxy_resolution") or proxy_resolution(input_shape)
    return ProxySpec(kind=kind, samples=samples, input_shape=tuple(int(d) for d in input_shape),
                     steps=int(s["proxy_steps"]), seed=int(s["proxy_seed"]),
                     resolution=int(res) if res else None, num_classes=num_classes,
                     lr=float(s.get("lr", DI_OBJECTIVE["lr"])),
                     balanced=bool(s.get("balanced", DI_OBJECTIVE["balanced"])),
                     normalized=bool(s.get("normalized", DI_OBJECTIVE["normalized"])))


# ---------------------------------------------------------------------------------------------------------------
# obtaining a proxy
# ---------------------------------------------------------------------------------------------------------------
_MEMORY: "OrderedDict[str, tuple[torch.Tensor, ProxyInfo]]" = OrderedDict()
_LOCK = threading.Lock()
_HASHES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def weights_hash(model: nn.Module) -> str:
    """:func:`foldviz.utils.state_dict_hash` of ``model``, remembered until a tensor of it changes (in-place
    writes bump a tensor's version counter; a new tensor has a new address)."""
    state = model.state_dict(keep_vars=True)
    stamp = tuple((k, v.data_ptr(), v._version, tuple(v.shape)) for k, v in state.items() if torch.is_tensor(v))
    with _LOCK:
        known = _HASHES.get(model)
    if known is not None and known[0] == stamp:
        return known[1]
    h = state_dict_hash(model)
    with _LOCK:
        _HASHES[model] = (stamp, h)
    return h


def _remember(key: str, x: torch.Tensor, info: ProxyInfo) -> None:
    with _LOCK:
        _MEMORY[key] = (x.detach().cpu(), info)
        _MEMORY.move_to_end(key)
        while len(_MEMORY) > MEMORY_SIZE:
            _MEMORY.popitem(last=False)


def clear_memory() -> None:
    """Forget the proxies kept in this process (the persistent cache is untouched)."""
    with _LOCK:
        _MEMORY.clear()


def install_proxy(x: torch.Tensor, info: ProxyInfo) -> None:
    """Make a proxy built elsewhere (a sweep's driver or another Ray task) available to this process."""
    if x.shape[0] != info.samples or not torch.isfinite(x).all():
        raise ValueError("install_proxy: the tensor does not match its description or has non-finite values")
    _remember(info.key, x, replace(info, source="shared", seconds=0.0))


def _build(model: nn.Module, spec: ProxySpec, progress: Progress, device=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(spec.seed))
    x = torch.randn(spec.shape, generator=gen)
    if spec.kind == "noise" or (spec.kind == "smooth" and x.dim() < 4):  # blurring needs images
        return x
    if spec.kind == "smooth":
        c = x.shape[1]
        k = torch.ones(c, 1, 3, 3) / 9.0
        for _ in range(2):
            x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
        return (x - x.mean()) / x.std()
    obj = {k: v for k, v in DI_OBJECTIVE.items() if k not in _RESEARCH}
    if device is not None and next(model.parameters()).device != torch.device(device):
        model = copy.deepcopy(model).to(device).eval()  # synthesise where the fold runs (a GPU is much faster)
    x = deep_inversion(model, spec.input_shape, num_classes=spec.num_classes, batch_size=spec.samples,
                       iterations=spec.steps, lr=spec.lr, balanced=spec.balanced, normalized=spec.normalized,
                       seed=spec.seed,
                       resolution=spec.resolution, chunk=max(1, DI_CHUNK_PIXELS // input_pixels(spec.input_shape)),
                       progress=progress, stage="proxy", **obj)
    return x.detach().cpu()


def get_proxy(model: nn.Module, spec: ProxySpec, *, progress: Progress = None,
              cache: TensorCache | None | str = "default", device=None) -> tuple[torch.Tensor, ProxyInfo]:
    """The proxy batch ``spec`` for ``model`` (the original, unfolded model; it is not modified) and where it
    came from: this process's memory, else ``cache`` ("default": :func:`foldviz.cache.default_cache`; None: no
    persistent cache), else a new build on ``device`` (default: the model's; stored in both). Noise proxies cost
    nothing and skip the disk. Returns the batch on the CPU."""
    t0 = time.perf_counter()
    key = spec.key(weights_hash(model))
    with _LOCK:
        hit = _MEMORY.get(key)
        if hit is not None:
            _MEMORY.move_to_end(key)
    if hit is not None:
        if progress:
            progress("proxy-cached", 1, 1)
        x, info = hit
        src = info.source if info.source == "shared" else "memory"
        return x.clone(), replace(info, source=src, seconds=time.perf_counter() - t0)
    store = default_cache("proxy") if cache == "default" else cache
    if spec.kind != "di":
        store = None

    def build() -> tuple[torch.Tensor, dict]:
        tb = time.perf_counter()
        x = _build(model, spec, progress, device)
        meta = {"build_seconds": f"{time.perf_counter() - tb:.3f}", "build_id": new_build_id(),
                "description": spec.describe()}
        return x, meta

    if store is None:
        x, meta = build()
        built, path = True, None
    else:
        hit, built = store.get_or_build(key, build, shape=spec.shape, dtype=torch.float32)
        x, meta, path = hit.tensor, hit.meta, str(hit.path)
        if not built and progress:
            progress("proxy-cached", 1, 1)
    info = ProxyInfo(source="built" if built else "cache", seconds=time.perf_counter() - t0,
                     build_seconds=_float(meta.get("build_seconds")), build_id=str(meta.get("build_id", "")),
                     key=key, kind=spec.kind, samples=spec.samples, steps=spec.steps if spec.kind == "di" else 0,
                     description=spec.describe(), path=path)
    _remember(key, x, info)
    return x.clone(), info


def _float(text) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return float("nan")
    return v if np.isfinite(v) else float("nan")


def describe_proxy(info: ProxyInfo | dict | None) -> str:
    """One line for people: what the proxy is and where it came from, e.g. "data-free proxy: 32 Deep-Inversion
    inputs x 30 steps, from cache (built in 4.3 s)"."""
    if info is None:
        return "no data-free proxy"
    d = info.as_dict() if isinstance(info, ProxyInfo) else dict(info)
    built = d.get("build_seconds")
    took = f"{built:.1f} s" if isinstance(built, (int, float)) and np.isfinite(built) else "unknown time"
    where = {"built": f"built in {took}", "cache": f"from cache (built in {took})",
             "memory": f"reused from this session (built in {took})",
             "shared": f"shared by the sweep (built once in {took})", "given": "given by the caller"}
    return f"data-free proxy: {d.get('description', '?')}, {where.get(d.get('source'), d.get('source'))}"


# ---------------------------------------------------------------------------------------------------------------
# command line (the flags themselves: foldviz.proxy_args, which imports no torch)
# ---------------------------------------------------------------------------------------------------------------
def proxy_progress(inner: Progress = None, *, stream=None, quiet: bool = False) -> Progress:
    """Wrap a ``progress(stage, done, total)`` callback so that the proxy's stages are told in words on
    ``stream`` (stderr): that it is being built and about how long it will take (from the rate of the first
    steps), or that it came from the cache. Other stages go to ``inner``."""
    state: dict = {}

    def out(text: str) -> None:
        if not quiet:
            print(text, file=stream or sys.stderr, flush=True)

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "proxy-cached":
            out("  proxy: from cache (no synthesis needed)")
        elif stage == "proxy":
            now = time.perf_counter()
            if done <= 1 or "t0" not in state:
                state.update(t0=now, first=done, marks=set())
                out(f"  proxy: building the data-free proxy ({total} Deep-Inversion steps; cached for later runs)")
                return
            rate = (now - state["t0"]) / max(1, done - state["first"])
            quarter = 4 * done // total
            if done == total:
                out(f"  proxy: built in {now - state['t0'] + rate:.1f} s")
            elif done - state["first"] == 2 or (quarter not in state["marks"] and quarter > 0):
                state["marks"].add(quarter)
                out(f"  proxy: step {done}/{total}, about {rate * (total - done):.0f} s left ({rate:.2f} s/step)")
        elif inner is not None:
            inner(stage, done, total)

    return progress
