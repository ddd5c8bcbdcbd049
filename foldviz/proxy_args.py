"""Command-line flags of Fold-DFR's data-free proxy and of the proxy cache, without importing torch (``--help``
must stay fast). The proxy itself is :mod:`foldviz.proxy`."""
from __future__ import annotations

import argparse

from .argtypes import count as _seed, positive as _positive

__all__ = ["PROXY_KINDS", "PROXY_DEFAULTS", "add_proxy_args", "proxy_settings_from_args", "apply_cache_args"]

PROXY_KINDS = ("noise", "smooth", "di")
#: Fold-DFR's proxy when a plan's ``repair_settings`` do not say (README, "Fold-DFR's proxy"); "samples" is scaled
#: down for inputs larger than 32x32 unless set explicitly (foldviz.proxy.default_samples)
PROXY_DEFAULTS = {"proxy": "di", "samples": 32, "proxy_steps": 30, "proxy_seed": 0, "proxy_resolution": None}


def add_proxy_args(parser: argparse.ArgumentParser) -> None:
    """``--proxy``, ``--proxy-samples``, ``--proxy-steps``, ``--proxy-seed``, ``--cache-dir`` and ``--no-cache``."""
    g = parser.add_argument_group("data-free proxy (Fold-DFR)")
    g.add_argument("--proxy", choices=PROXY_KINDS,
                   help="proxy batch Fold-DFR re-estimates statistics on: di (Deep Inversion, the default), smooth "
                        "(blurred noise) or noise; both noise kinds cost nothing and repair less well")
    g.add_argument("--proxy-samples", type=_positive, metavar="N",
                   help=f"proxy inputs (default {PROXY_DEFAULTS['samples']} up to 32x32 inputs, 16 up to 128x128, "
                        "fewer above)")
    g.add_argument("--proxy-steps", type=_positive, metavar="N",
                   help=f"Deep-Inversion steps (default {PROXY_DEFAULTS['proxy_steps']})")
    g.add_argument("--proxy-seed", type=_seed, metavar="S",
                   help=f"seed of the proxy (default {PROXY_DEFAULTS['proxy_seed']}; independent of --seed, so "
                        "folds with other seeds reuse the same proxy)")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where built proxies are kept between runs (default: env FOLDVIZ_CACHE_DIR, else the "
                        "user cache directory, e.g. ~/.cache/foldviz)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the proxy cache")


def proxy_settings_from_args(args: argparse.Namespace) -> dict:
    """The ``repair_settings`` entries the proxy flags set (only those given: defaults stay implicit, so plans
    and sweep settings hashes do not change when nothing was asked for). Also applies the cache flags."""
    apply_cache_args(args)
    out = {}
    for flag, key in (("proxy", "proxy"), ("proxy_samples", "samples"), ("proxy_steps", "proxy_steps"),
                      ("proxy_seed", "proxy_seed")):
        v = getattr(args, flag, None)
        if v is not None:
            out[key] = v
    return out


def apply_cache_args(args: argparse.Namespace) -> None:
    """``--cache-dir`` / ``--no-cache`` for this process and the workers it starts."""
    from .cache import configure  # imports torch: only when a command runs

    if getattr(args, "cache_dir", None):
        configure(directory=args.cache_dir)
    if getattr(args, "no_cache", False):
        configure(enabled=False)


