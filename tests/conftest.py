"""Shared pytest setup for foldviz.

* makes the repository importable without installing it;
* ``repo_root`` / ``demo_names`` / ``demo_card`` fixtures;
* ``no_network``: makes any torch hub / torchvision weight download fail immediately.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEMO_NAMES = sorted(p.stem for p in (REPO_ROOT / "assets" / "models").glob("*.json"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def demo_names() -> list[str]:
    return list(DEMO_NAMES)


@pytest.fixture
def demo_card():
    """``demo_card(name)`` → the bundled card as a dict."""

    def _read(name: str) -> dict:
        return json.loads((REPO_ROOT / "assets" / "models" / f"{name}.json").read_text())

    return _read


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Weight downloads raise ``URLError`` (as on a machine without internet); the hub cache is empty."""
    import urllib.error

    import torch.hub
    import torchvision.models._api as tv_api

    def _offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: refusing to download {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", _offline)
    return _offline


@pytest.fixture(scope="session", autouse=True)
def _private_proxy_cache(tmp_path_factory):
    """Tests never read or fill the user's proxy cache (foldviz.cache): one private directory per session,
    exported so that worker processes (multiprocessing, Ray) use it too."""
    import os

    saved = os.environ.get("FOLDVIZ_CACHE_DIR")
    os.environ["FOLDVIZ_CACHE_DIR"] = str(tmp_path_factory.mktemp("foldviz-cache"))
    yield
    if saved is None:
        os.environ.pop("FOLDVIZ_CACHE_DIR", None)
    else:
        os.environ["FOLDVIZ_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def _cache_settings_do_not_leak():
    """``foldviz.cache.configure`` (the CLI's --cache-dir / --no-cache run in process) writes module state and the
    environment for worker processes; restore both after every test so no later test inherits a switched-off cache."""
    import os

    from foldviz import cache as C

    names = (C.CACHE_DIR_ENV, C.CACHE_SWITCH_ENV, C.CACHE_MAX_ENV)
    saved_env = {k: os.environ.get(k) for k in names}
    saved_config = dict(C._CONFIG)
    yield
    C._CONFIG.clear()
    C._CONFIG.update(saved_config)
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; run with -m cuda)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, on machines without a CUDA device."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in marked:
        item.add_marker(skip)
