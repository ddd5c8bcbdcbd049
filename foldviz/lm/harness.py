"""Zero-shot evaluation through the EleutherAI harness (``lm-eval``), an optional extra.

:class:`FoldvizLM` wraps any ``*ForCausalLM`` (a folded one included) and a tokenizer (``tokenizers.Tokenizer`` or
anything with ``encode(text)`` -> ids / ``.ids`` and ``decode(ids)``) as an ``lm_eval`` language model, so that every
harness task runs on it; :func:`run_tasks` runs tasks and returns per-task accuracies. Nothing is downloaded:
``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are set before the harness is imported, so tasks must read local data
(``dataset_path: json`` with local ``data_files``; see :func:`write_shakespeare_tasks`).

Scoring follows the harness's conventions: a continuation's log-likelihood is the sum of its tokens' log-probs
given the context (the context's trailing spaces are moved to the continuation; an empty context is replaced by
the end-of-text token); inputs longer than the context length keep their last tokens; rolling log-likelihoods
predict every token exactly once in windows of the context length with as much context as fits.

The local stand-in tasks (:func:`write_shakespeare_tasks`) are multiple-choice questions built from held-out plays,
shaped like the paper's zero-shot tasks (BoolQ, WinoGrande, ARC-e, ARC-c: two- and four-way choices scored by
log-likelihood); they are not those benchmarks, which need downloads and models far larger than the demos.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["HarnessMissingError", "require_harness", "FoldvizLM", "run_tasks", "write_shakespeare_tasks",
           "LOCAL_TASKS", "SHAKESPEARE", "parse_tasks", "zero_shot"]

#: the local stand-ins and the paper's task each mirrors in shape
LOCAL_TASKS = {"sh_real_line": "BoolQ (2-way)", "sh_cloze": "WinoGrande (2-way)",
               "sh_next_line": "ARC-e (4-way)", "sh_next_line_hard": "ARC-c (4-way)"}


#: the task name that stands for every task of :data:`LOCAL_TASKS`
SHAKESPEARE = "shakespeare"


class HarnessMissingError(ImportError):
    """``lm-eval`` is not installed."""


def require_harness():
    """Import ``lm_eval`` offline, or raise :class:`HarnessMissingError` with a one-line message."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM  # noqa: F401
    except ImportError:
        raise HarnessMissingError("zero-shot tasks need the EleutherAI harness: pip install lm-eval") from None
    import lm_eval

    return lm_eval


def _ids(enc) -> list[int]:
    return list(getattr(enc, "ids", enc))


def _lm_base():
    return require_harness().api.model.LM


class _Wrapper:
    """Shared implementation; :func:`FoldvizLM` makes it an ``lm_eval`` LM subclass at call time, so importing
    this module never needs the harness."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                 eot_token_id: int | None = None, max_gen_toks: int = 64):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or getattr(model.config, "max_position_embeddings", 2048))
        eot = eot_token_id
        if eot is None:
            eot = getattr(model.config, "eos_token_id", None)
        if isinstance(eot, (list, tuple)):
            eot = eot[0] if eot else None
        if eot is None:
            raise ValueError("the model config has no eos_token_id; pass eot_token_id=")
        self.eot_token_id = int(eot)
        self.max_gen_toks = int(max_gen_toks)

    # --- tokenisation ------------------------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return _ids(self.tokenizer.encode(text))

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        cont = whole[len(ctx):]
        if not cont:                                   # the merge swallowed the boundary: encode separately
            cont = self.tok_encode(continuation)
        return ctx, cont

    # --- scoring -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether greedy decoding yields it) for (context, cont) id lists;
        inputs right-padded in batches (causal: padding never reaches earlier positions)."""
        dev = next(self.model.parameters()).device
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        was = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                seqs, spans = [], []
                for i in idx:
                    ctx, cont = pairs[i]
                    if not cont:
                        raise ValueError("empty continuation")
                    full = (ctx or [self.eot_token_id]) + cont
                    x = full[-(self.max_length + 1):][:-1]
                    seqs.append(x)
                    spans.append(len(cont))
                width = max(len(s) for s in seqs)
                batch = torch.zeros(len(seqs), width, dtype=torch.long)
                for r, s in enumerate(seqs):
                    batch[r, :len(s)] = torch.as_tensor(s)
                logp = F.log_softmax(self.model(input_ids=batch.to(dev), use_cache=False).logits.float(), dim=-1)
                for r, i in enumerate(idx):
                    n, m = len(seqs[r]), spans[r]
                    target = torch.as_tensor(pairs[i][1][-m:], device=dev)
                    lp = logp[r, n - m:n]
                    out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        finally:
            self.model.train(was)
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for r in requests:
            toks = self.tok_encode(r.args[0])
            full = [self.eot_token_id] + toks
            pairs = []
            # targets full[s:e] in chunks of max_length; inputs full[a:e-1], a = max(0, e-1-max_length)
            for s in range(1, len(full), self.max_length):
                e = min(len(full), s + self.max_length)
                a = max(0, e - 1 - self.max_length)
                pairs.append((full[a:s], full[s:e]))
            out.append(sum(ll for ll, _ in self._score(pairs)) if pairs else 0.0)
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        dev = next(self.model.parameters()).device
        res = []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 and r.args[1] else {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kw.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context) or [self.eot_token_id]
            new: list[int] = []
            text = ""
            for _ in range(limit):
                x = torch.tensor([(ids + new)[-self.max_length:]], device=dev)
                nxt = int(self.model(input_ids=x, use_cache=False).logits[0, -1].argmax())
                if nxt == self.eot_token_id:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(u and u in text for u in until):
                    break
            for u in until:
                if u and u in text:
                    text = text.split(u, 1)[0]
            res.append(text)
        return res


def FoldvizLM(model, tokenizer, **kw):  # noqa: N802 - a class factory used like a class
    """An ``lm_eval.api.model.LM`` for ``model`` + ``tokenizer`` (keyword options: ``batch_size``, ``max_length``
    (default: the model's context length), ``eot_token_id`` (default: ``config.eos_token_id``), ``max_gen_toks``).
    Raises :class:`HarnessMissingError` when ``lm-eval`` is not installed."""
    base = _lm_base()
    cls = type("FoldvizLM", (_Wrapper, base), {})
    return cls(model, tokenizer, **kw)


def run_tasks(model, tokenizer, tasks: list[str], *, limit: int | None = None, num_fewshot: int = 0,
              include_path: str | os.PathLike | list | None = None, include_defaults: bool | None = None,
              batch_size: int = 8, seed: int = 0) -> dict[str, dict]:
    """Run harness ``tasks`` on ``model``; returns ``{task: {"acc", "acc_norm" (or None), "n"}}``.

    ``include_path``: a directory (or a list of directories) of task YAML files (searched alone unless
    ``include_defaults``; default: the
    harness's built-in tasks only when no ``include_path`` is given). ``limit``: at most this many documents per
    task. Offline: datasets must be local.
    """
    lm_eval = require_harness()
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("TQDM_DISABLE", "1")       # no per-request progress bars on the console
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass

    if include_defaults is None:
        include_defaults = include_path is None
    paths = include_path if isinstance(include_path, (list, tuple)) else [include_path] if include_path else []
    tm = TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=include_defaults)
    lm = FoldvizLM(model, tokenizer, batch_size=batch_size)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=tm, log_samples=False, bootstrap_iters=0, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      verbosity="ERROR")
    except LookupError as e:    # the harness's unknown-task error is a KeyError with a quoted message
        where = f" in {', '.join(str(p) for p in paths)}" if paths else ""
        raise ValueError(f"unknown harness task{where}: {str(e).strip(chr(34))[:200]}") from None
    out = {}
    for name, metrics in (res or {}).get("results", {}).items():
        acc = metrics.get("acc,none")
        out[name] = {"acc": None if acc is None else float(acc),
                     "acc_norm": None if metrics.get("acc_norm,none") is None else float(metrics["acc_norm,none"]),
                     "n": int(res.get("n-samples", {}).get(name, {}).get("effective", 0))}
    missing = [t for t in tasks if t not in out]
    if missing:
        raise ValueError(f"the harness returned no result for {', '.join(missing)}")
    return out


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """Task names from a comma-separated string (or a list); :data:`SHAKESPEARE` becomes the names of
    :data:`LOCAL_TASKS`; duplicates dropped, order kept. One-line ``ValueError`` when none is left."""
    raw = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for t in (str(x).strip() for x in raw):
        for name in (LOCAL_TASKS if t == SHAKESPEARE else [t] if t else []):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"no zero-shot task named in {tasks!r}; give comma-separated task names (e.g. {SHAKESPEARE})")
    return names


def zero_shot(model, tokenizer, tasks: str | list[str], *, tasks_dir: str | os.PathLike | None = None,
              limit: int | None = None, work_dir: str | os.PathLike | None = None, batch_size: int = 8,
              seed: int = 0) -> dict:
    """Zero-shot accuracy of ``model`` on harness ``tasks`` and their average.

    Parameters
    ----------
    tasks : str or list of str
        Comma-separated names (see :func:`parse_tasks`); the local tasks of :data:`LOCAL_TASKS` (or
        ``shakespeare`` for all four) are written by :func:`write_shakespeare_tasks` into ``work_dir`` (default:
        a temporary directory).
    tasks_dir : path, optional
        A directory of local task YAML files. When it is given, or only local tasks are asked for, the harness
        searches these directories alone; otherwise its built-in tasks too (their data must be cached locally:
        nothing is downloaded).
    limit : int, optional
        At most this many documents per task.

    Returns
    -------
    dict
        ``{"tasks": {name: {"acc", "acc_norm", "n"}}, "average": mean acc over the named tasks (None when a task
        has no acc), "limit"}``.
    """
    import tempfile

    names = parse_tasks(tasks)
    if tasks_dir is not None and not Path(tasks_dir).expanduser().is_dir():
        raise ValueError(f"tasks directory not found: {tasks_dir}")
    require_harness()
    paths = [Path(tasks_dir).expanduser()] if tasks_dir is not None else []
    with tempfile.TemporaryDirectory(prefix="foldviz-tasks-") as tmp:
        if any(n in LOCAL_TASKS for n in names):
            local = Path(work_dir) if work_dir is not None else Path(tmp)
            write_shakespeare_tasks(local, n=max(int(limit or 0), 200), seed=seed)
            paths.append(local)
        only_local = tasks_dir is not None or all(n in LOCAL_TASKS for n in names)
        res = run_tasks(model, tokenizer, names, limit=limit, include_path=paths or None,
                        include_defaults=not only_local, batch_size=batch_size, seed=seed)
    accs = [res[n]["acc"] for n in names]
    avg = None if any(a is None for a in accs) else sum(accs) / len(accs)
    return {"tasks": {n: res[n] for n in names}, "average": avg, "limit": limit}


# ---------------------------------------------------------------------------------------------------------------
# local stand-in tasks
# ---------------------------------------------------------------------------------------------------------------
_SPEAKER = re.compile(r"^[A-Z][A-Z' ,\-]+\.$")


def _verse_lines(doc: str) -> list[tuple[int, str]]:
    """(index, line) of dialogue lines with at least 4 words: no speaker headings, stage directions or titles."""
    out = []
    for i, line in enumerate(doc.splitlines()):
        s = line.strip()
        if len(s.split()) < 4 or s.startswith("[") or _SPEAKER.match(s) or s.isupper():
            continue
        out.append((i, s))
    return out


def _task_yaml(name: str, data: Path, n_choices: int) -> str:
    return (f"task: {name}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {json.dumps(str(data))}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            "doc_to_text: \"{{context}}\"\n"
            "doc_to_choice: \"{{choices}}\"\n"
            "doc_to_target: \"{{label}}\"\n"
            "metric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
            f"metadata:\n  version: 1.0\n  choices: {n_choices}\n")


def write_shakespeare_tasks(out_dir: str | os.PathLike, docs: list[str] | None = None, *, n: int = 200,
                            seed: int = 0) -> list[str]:
    """Write the four local multiple-choice tasks of :data:`LOCAL_TASKS` (YAML + JSONL, ``n`` items each) built
    from ``docs`` (default: the held-out plays) into ``out_dir``; returns the task names.

    ``sh_real_line``       previous line -> the next line vs the same words shuffled (2-way).
    ``sh_cloze``           a line cut before a word of >= 4 letters -> that word vs a word of the same play (2-way).
    ``sh_next_line``       two previous lines -> the next line vs 3 lines from the other documents (4-way).
    ``sh_next_line_hard``  two previous lines -> the next line vs 3 lines within 30 lines of it (4-way).

    Distractor lines have the length of the true line within 25 %. Deterministic for ``docs``, ``n`` and ``seed``.
    """
    from .corpus import TEST_PLAYS, read_plays

    docs = read_plays(TEST_PLAYS) if docs is None else docs
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_doc = [_verse_lines(d) for d in docs]
    items: dict[str, list[dict]] = {k: [] for k in LOCAL_TASKS}
    pool = [(di, j) for di, lines in enumerate(per_doc) for j in range(2, len(lines))
            if lines[j][0] - lines[j - 2][0] <= 4]          # the two previous lines sit just before it
    rng.shuffle(pool)
    for di, j in pool:
        lines = per_doc[di]
        ctx2 = lines[j - 2][1] + "\n" + lines[j - 1][1] + "\n"
        ctx1 = lines[j - 1][1] + "\n"
        true = lines[j][1]
        words = true.split()
        if len(items["sh_real_line"]) < n:
            shuf = words[:]
            for _ in range(5):
                rng.shuffle(shuf)
                if shuf != words:
                    break
            if shuf != words:
                lab = rng.randrange(2)
                choices = [true, " ".join(shuf)] if lab == 0 else [" ".join(shuf), true]
                items["sh_real_line"].append({"context": ctx1, "choices": choices, "label": lab})
        if len(items["sh_cloze"]) < n:
            cand = [k for k, w in enumerate(words) if k > 0 and len(re.sub(r"\W", "", w)) >= 4 and w.isalpha()]
            vocab = [w for _, ln in lines for w in ln.split() if w.isalpha() and len(w) >= 4]
            if cand and vocab:
                k = rng.choice(cand)
                other = rng.choice([w for w in vocab if w.lower() != words[k].lower()] or vocab)
                lab = rng.randrange(2)
                choices = [" " + words[k], " " + other]
                items["sh_cloze"].append({"context": ctx1 + " ".join(words[:k]), "label": lab,
                                          "choices": choices if lab == 0 else choices[::-1]})
        # distractors of about the same length (within 25 %), so that summed log-probs compare like with like
        lo, hi = 0.75 * len(true), 1.25 * len(true)
        others = [ln for dj, ls in enumerate(per_doc) if dj != di for _, ln in ls if lo <= len(ln) <= hi]
        near = [ln for jj, (_, ln) in enumerate(lines) if 0 < abs(jj - j) <= 30 and ln != true and lo <= len(ln) <= hi]
        for name, src in (("sh_next_line", others), ("sh_next_line_hard", near)):
            if len(items[name]) < n and len(src) >= 3:
                choices = rng.sample(src, 3)
                lab = rng.randrange(4)
                choices.insert(lab, true)
                items[name].append({"context": ctx2, "choices": choices, "label": lab})
        if all(len(v) >= n for v in items.values()):
            break
    names = []
    for name, rows in items.items():
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (out / f"{name}.yaml").write_text(_task_yaml(name, data, len(rows[0]["choices"]) if rows else 0))
        names.append(name)
    return names
