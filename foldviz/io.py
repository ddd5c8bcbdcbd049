"""Deprecated alias of :mod:`foldviz.persist` (renamed in 0.2; this alias goes away in the next release)."""
from .persist import *  # noqa: F401,F403
from .persist import load_folded, read_meta, read_safetensors_header, save_folded  # noqa: F401
