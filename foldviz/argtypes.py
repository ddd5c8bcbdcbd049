"""Command-line argument types shared by every subcommand (no torch import, so ``--help`` stays fast)."""
from __future__ import annotations

import argparse

__all__ = ["whole_number", "count", "positive"]


def whole_number(text: str, minimum: int) -> int:
    """``text`` as an int >= ``minimum``; an ``argparse`` error (one line) otherwise."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text}")
    return n


def count(text: str) -> int:
    """A whole number >= 0 (a count, a seed)."""
    return whole_number(text, 0)


def positive(text: str) -> int:
    """A whole number >= 1."""
    return whole_number(text, 1)
